"""Resolve data/tokenizer paths given relative to the working directory or the project root."""

from __future__ import annotations

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
        raise FileNotFoundError(f"not found: {path} (looked in {Path.cwd()} and {PROJECT_ROOT})")
    return p


def load_tokenizer(name_or_path: str):
    """``AutoTokenizer`` from a local path (resolved as above), a known model name or a hub id.

    Known names (``smollm2-135m-instruct``, ``gemma3-270m``) resolve to their imported
    directory (:mod:`agentrm.models.import_gguf`; a tokenizer-only import on first use when the
    weights have not been imported yet).
    """
    from transformers import AutoTokenizer

    from agentrm.models.import_gguf import resolve_model

    name_or_path = resolve_model(str(name_or_path), tokenizer_only=True)
    try:
        local = resolve_path(name_or_path)
    except FileNotFoundError:
        local = None
    tok = AutoTokenizer.from_pretrained(str(local) if local else name_or_path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok
