"""Resolving a spec, once: checked fields, the model's local path, its placement, its recorded settings, a fingerprint.

:func:`resolve_policy` and :func:`resolve_scorer` do every check that needs the filesystem or the machine
(is the model there, can this device hold it in this dtype, is the RM directory an export of the right
kind, is an adapter's base reachable), read what the exported RM recorded (its training ``max_length`` and
``aggregate``) and fingerprint the weights (:func:`agentrm.models.fingerprint.model_fingerprint`), before
anything is loaded. The result is what :mod:`agentrm.search.build` builds from; nothing resolves it again.
Evaluation and tree outputs record the fingerprints and refuse to resume with a different model.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from agentrm.checks import ConfigError
from agentrm.models.fingerprint import model_fingerprint
from agentrm.models.placement import Placement, resolve_placement
from agentrm.paths import check_model_reachable, resolve_path
from agentrm.search.specs import PolicySpec, ScorerSpec, check_policy, check_scorer

FALLBACK_MAX_LENGTH = 1024
"""Scoring context of an RM exported before its training ``max_length`` was recorded."""


@dataclass(frozen=True)
class ResolvedPolicy:
    """A checked policy spec, ready to build.

    Attributes:
        spec: the spec, an ``hf`` model's name replaced by its local directory.
        placement: the ``hf`` LM's placement (``None`` for other kinds).
        fingerprint: the ``hf`` LM's weights fingerprint, ``<model>@<urls>`` for a served one, ``None`` otherwise.
    """

    spec: PolicySpec
    placement: Placement | None = None
    fingerprint: str | None = None


@dataclass(frozen=True)
class ResolvedScorer:
    """A checked scorer spec, ready to build.

    Attributes:
        spec: the spec.
        path: the RM directory (value RM, implicit PRM) or the local judge's directory.
        config: the RM's ``agentrm_config.json``.
        placement: a local model's placement.
        settings: what the scorer is built with beyond the spec: ``max_length`` and ``aggregate`` (the
            spec's where given, else what the RM recorded, see :func:`scoring_settings`).
        fingerprint: the weights fingerprint (and its adapter base's), or ``<model>@<url>`` for a served judge;
            for a remote scorer the served model's fingerprint (from the server's ``/info``) with its kind and
            scoring settings, so a resume against a server now serving another model is refused.
    """

    spec: ScorerSpec
    path: Path | None = None
    config: dict[str, Any] = field(default_factory=dict)
    placement: Placement | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    fingerprint: str | None = None

    @property
    def label(self) -> str:
        return self.spec.label


def _placement(spec: PolicySpec | ScorerSpec, what: str) -> Placement:
    return resolve_placement(spec.device, spec.dtype, spec.quantization, spec.attn_implementation, what)


def local_model_dir(name: str) -> Path | None:
    """The local directory holding model ``name`` (a path, a known imported model, a hub-cache snapshot)."""
    try:
        return resolve_path(name)
    except FileNotFoundError:
        pass
    from agentrm.models.import_gguf import KNOWN_MODELS, resolve_model

    if name in KNOWN_MODELS:
        return Path(resolve_model(name))
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(name, "config.json")
    return Path(cached).parent if isinstance(cached, str) else None


def _fingerprint_of(name: str) -> str:
    d = local_model_dir(name)
    return model_fingerprint(d) if d is not None else f"name:{name}"


def resolve_policy(spec: PolicySpec, what: str = "policy") -> ResolvedPolicy:
    """Check ``spec`` fully (fields, then the local LM's placement and reachability) and fingerprint its model."""
    check_policy(spec, what)
    if spec.kind == "hf":
        placement = _placement(spec, what)
        check_model_reachable(spec.model, f"{what}.model")
        local = local_model_dir(spec.model)
        model = str(local) if local is not None else spec.model
        fingerprint = model_fingerprint(local) if local is not None else f"name:{spec.model}"
        return ResolvedPolicy(replace(spec, model=model), placement, fingerprint)
    if spec.kind == "openai":
        urls = spec.base_url if isinstance(spec.base_url, list) else [spec.base_url]
        return ResolvedPolicy(spec, None, f"{spec.model}@{','.join(urls)}")
    return ResolvedPolicy(spec)


def _rm_dir(spec: ScorerSpec, what: str) -> tuple[Path, dict[str, Any], str | None]:
    """The RM directory, its ``agentrm_config.json`` and, for a LoRA adapter, its base (checked reachable)."""
    try:
        d = resolve_path(spec.path)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{what}.path: {e}") from None
    cfg_file = d / "agentrm_config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"{what}.path {str(d)!r} is not an exported agentrm reward model: "
                                "agentrm_config.json missing")
    cfg = json.loads(cfg_file.read_text())
    want = "ValueRewardModel" if spec.kind == "value_rm" else "ImplicitPRM"
    if cfg.get("model_class") != want:
        raise ConfigError(f"{what}: {cfg_file} holds a {cfg.get('model_class')!r}, kind {spec.kind!r} needs a {want!r}")
    adapter_dir = d if spec.kind == "value_rm" else d / "policy"
    base = None
    if (adapter_dir / "adapter_config.json").exists():
        from agentrm.models.adapters import resolve_adapter_base

        base = spec.base or resolve_adapter_base(adapter_dir, cfg)
        check_model_reachable(base, f"{what}.base" if spec.base else f"{what}: the LoRA base model")
    return d, cfg, base


def scoring_settings(spec: ScorerSpec, cfg: dict[str, Any], what: str) -> dict[str, Any]:
    """``max_length`` and ``aggregate``: the spec's where given, else what the RM was trained with.

    The export's ``agentrm_config.json`` records the training ``max_length`` (the data module's) and the
    implicit PRM's ``aggregate``; the chat template comes with the exported tokenizer. A ``max_length`` below
    the training one drops older steps the RM was trained to read, so it is warned about.
    """
    trained = cfg.get("max_length")
    if spec.max_length is not None and trained is not None and spec.max_length < trained:
        warnings.warn(f"{what}.max_length={spec.max_length} is below the {trained} tokens the RM was trained with: "
                      "older steps it was trained to read are dropped", UserWarning, stacklevel=3)
    default_aggregate = "last" if spec.kind == "value_rm" else "min"
    return {"max_length": spec.max_length or trained or FALLBACK_MAX_LENGTH,
            "aggregate": spec.aggregate or cfg.get("aggregate") or default_aggregate}


def remote_api_key(spec: ScorerSpec, what: str = "scorer") -> str | None:
    """A remote scorer's API key, read from the environment variable its spec names (``None``: none named)."""
    if spec.api_key_env is None:
        return None
    key = os.environ.get(spec.api_key_env)
    if not key:
        raise ConfigError(f"{what}.api_key_env: the environment variable {spec.api_key_env} is not set "
                          "(it should hold the server's API key)")
    return key


def resolve_scorer(spec: ScorerSpec, what: str = "scorer") -> ResolvedScorer:
    """Check ``spec`` fully, read the RM's recorded settings and fingerprint its weights (nothing is loaded)."""
    check_scorer(spec, what)
    placement = _placement(spec, what) if spec.is_local else None
    if spec.kind in ("value_rm", "implicit_prm"):
        d, cfg, base = _rm_dir(spec, what)
        fingerprint = model_fingerprint(d) + ("" if base is None else f"+{_fingerprint_of(base)}")
        return ResolvedScorer(spec, d, cfg, placement, scoring_settings(spec, cfg, what), fingerprint)
    if spec.kind == "remote":
        from agentrm.scoring.remote import server_info

        info = server_info(spec.url, remote_api_key(spec, what), ready_timeout_s=spec.request_deadline_s)
        settings = {"max_length": info.get("max_length"), "aggregate": info.get("aggregate")}
        fingerprint = (f"{info['fingerprint']} ({info['kind']}, max_length={settings['max_length']}, "
                       f"aggregate={settings['aggregate']})")
        return ResolvedScorer(spec, config={"server": info}, settings=settings, fingerprint=fingerprint)
    if spec.kind == "judge":
        if spec.judge_base_url:
            return ResolvedScorer(spec, fingerprint=f"{spec.judge_model or 'default'}@{spec.judge_base_url}")
        check_model_reachable(spec.judge_model, f"{what}.judge_model")
        local = local_model_dir(spec.judge_model)
        return ResolvedScorer(spec, local, placement=placement,
                              fingerprint=model_fingerprint(local) if local else f"name:{spec.judge_model}")
    return ResolvedScorer(spec)
