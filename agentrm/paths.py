"""Resolve data/tokenizer paths given relative to the working directory or the project root.

:func:`check_model_reachable` says, before anything is fetched, whether a model name can be loaded:
a local directory, a known imported model, a hub id already in the Hugging Face cache, or a hub id
with the hub reachable (one short request instead of transformers' ~45 s of download retries).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = PACKAGE_DIR.parent


def resolve_path(path: str | Path, must_exist: bool = True) -> Path:
    """Return ``path`` if it exists as given, else relative to the project root (checkout).

    Shipped assets are referenced as ``agentrm/assets/...`` in configs, so the default
    run works from any working directory.  Hub ids are not paths: callers decide.
    """
    p = Path(path).expanduser()
    if p.exists() or p.is_absolute():
        if must_exist and not p.exists():
            raise FileNotFoundError(f"not found: {p}")
        return p
    for base in (PROJECT_ROOT, PACKAGE_DIR.parent):
        if (base / p).exists():
            return base / p
    if must_exist:
        where = " and ".join(dict.fromkeys(str(b) for b in (Path.cwd(), PROJECT_ROOT)))
        raise FileNotFoundError(f"not found: {path} (looked in {where})")
    return p


def load_tokenizer(name_or_path: str):
    """``AutoTokenizer`` from a local path (resolved as above), a known model name or a hub id.

    Known names (``smollm2-135m-instruct``, ``gemma3-270m``) resolve to their imported
    directory (:mod:`agentrm.models.import_gguf`; a tokenizer-only import on first use when the
    weights have not been imported yet).
    """
    from transformers import AutoTokenizer

    from agentrm.models.import_gguf import resolve_model

    check_model_reachable(str(name_or_path), "tokenizer")
    name_or_path = resolve_model(str(name_or_path), tokenizer_only=True)
    try:
        local = resolve_path(name_or_path)
    except FileNotFoundError:
        local = None
    tok = AutoTokenizer.from_pretrained(str(local) if local else name_or_path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


class ModelUnreachable(FileNotFoundError):
    """A model name that is neither local, known, cached nor fetchable now."""


def _truthy(value: str | None) -> bool:
    return (value or "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set in the environment."""
    return _truthy(os.environ.get("HF_HUB_OFFLINE")) or _truthy(os.environ.get("TRANSFORMERS_OFFLINE"))


def _is_repo_id(name: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return not name.startswith((".", "~", "/"))


def _in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return any(isinstance(try_to_load_from_cache(repo_id, f), str)
               for f in ("config.json", "tokenizer_config.json", "adapter_config.json"))


@functools.lru_cache(maxsize=8)
def _hub_error(endpoint: str, repo_id: str, timeout: float) -> str | None:
    """``None`` if ``endpoint`` answers (any HTTP status: access rights are transformers' business), else why not."""
    import httpx

    try:
        httpx.head(f"{endpoint}/api/models/{repo_id}", timeout=timeout, follow_redirects=True)
    except httpx.HTTPError as e:
        return f"{type(e).__name__}: {e}"
    return None


def check_model_reachable(name_or_path: str | Path, field: str = "model", timeout: float = 5.0) -> None:
    """Raise :class:`ModelUnreachable` at once if ``name_or_path`` cannot be loaded from here.

    Passes for an existing local path (as given or under the project root), a known model
    (:data:`agentrm.models.import_gguf.KNOWN_MODELS`, imported on first use), a hub id in the local
    Hugging Face cache, and a hub id when ``HF_HUB_OFFLINE`` is unset and the hub answers one request
    within ``timeout`` seconds. ``field`` names the config field in the message.
    """
    from agentrm.models.import_gguf import KNOWN_MODELS

    name = str(name_or_path)
    if name in KNOWN_MODELS:
        return
    try:
        resolve_path(name)
        return
    except FileNotFoundError:
        pass
    where = "looked in " + " and ".join(dict.fromkeys(str(p) for p in (Path.cwd(), PROJECT_ROOT)))
    if not _is_repo_id(name):
        raise ModelUnreachable(f"{field} {name!r}: no such file or directory ({where})")
    if _in_hub_cache(name):
        return
    known = ", ".join(KNOWN_MODELS)
    lead = (f"{field} {name!r} is not a local directory ({where}), a known model ({known}) or a hub id "
            "in the Hugging Face cache")
    if hub_offline():
        raise ModelUnreachable(f"{lead}, and HF_HUB_OFFLINE is set; download it where the hub is reachable "
                               "(huggingface-cli download) or point at a local directory")
    from huggingface_hub import constants

    err = _hub_error(constants.ENDPOINT, name, timeout)
    if err is not None:
        raise ModelUnreachable(f"{lead}, and {constants.ENDPOINT} cannot be reached ({err}); download it where "
                               "the hub is reachable (huggingface-cli download) or point at a local directory")
