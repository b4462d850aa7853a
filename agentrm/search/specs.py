"""Config dataclasses for the evaluation harness and the factories that build policies and scorers from them.

Every local model (value RM, implicit PRM, local judge, ``hf`` policy) takes ``device``, ``dtype``,
``quantization`` and ``attn_implementation`` (:func:`agentrm.models.placement.resolve_placement`:
CUDA and bf16 when available, else CPU and fp32). :func:`check_policy_spec` and
:func:`check_scorer_spec` check them, and that the model is there, before anything is loaded.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from agentrm.models.placement import Placement, resolve_placement
from agentrm.paths import check_model_reachable, load_tokenizer, resolve_path
from agentrm.policies.base import Policy
from agentrm.scoring import Scorer

LOAD_FIELDS = ("device", "dtype", "quantization")


@dataclass
class PolicySpec:
    """The acting policy.

    Attributes:
        kind: ``expert`` (each environment's own scripted expert with ``error_rate``; ``scripted``
            is an alias), ``random``, ``hf`` (local causal LM at ``model``) or ``openai``
            (OpenAI-compatible server at ``base_url`` serving ``model``).
        error_rate: expert policy: probability of replacing the expert's action by another valid one.
        temperature, top_p, max_new_tokens: LM sampling (greedy runs use temperature 0).
        prompt: LM policies: ``plain`` renders the episode as in training (``history.to_messages()``,
            what an SFT policy saw); ``react`` the paper-style prompt
            (:class:`~agentrm.policies.prompt.AgentPrompt`: rules, valid actions, the environment's
            in-context example, ``Thought:``/``Action:`` replies) for instruct models used zero-shot.
        max_resample: LM policies: redraws of a reply without a valid action when sampling.
        base_url: ``openai``: the server's base URL, or a list of replicas serving the same model.
        max_concurrency: ``openai``: requests in flight at once per policy (beams, samples).
        batch_requests: ``hf``: generate the replies of many requests (beams, Best-of-N samples in
            lock-step, and the episodes running at once with ``concurrency``, through a shared
            :class:`~agentrm.policies.batcher.GenerateBatcher`) in batches of ``batch_size`` rows, each
            reply from its own seeded stream (:class:`~agentrm.policies.hf.HFPolicy`); off by default,
            which keeps the per-call stream the recorded figures used.
        batch_size: ``hf``: replies per ``generate`` call.
        device, dtype, quantization, attn_implementation: ``hf``: where and how the LM is loaded
            (default: CUDA in bf16 when available, else CPU in fp32; ``quantization`` ``nf4``/``int8``
            needs CUDA and bitsandbytes); see :mod:`agentrm.models.placement`.
    """

    kind: Literal["expert", "scripted", "random", "hf", "openai"] = "expert"
    error_rate: float = 0.7
    model: str | None = None
    base_url: str | list[str] | None = None
    api_key: str | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 32
    prompt: Literal["plain", "react"] = "plain"
    max_resample: int = 2
    max_concurrency: int = 4
    batch_requests: bool = False
    batch_size: int = 8
    device: str | None = None
    dtype: str | None = None
    quantization: str | None = None
    attn_implementation: str = "auto"


@dataclass
class ScorerSpec:
    """A scorer to guide Best-of-N and beam search.

    Attributes:
        kind: ``value_rm`` / ``implicit_prm`` (HF directory at ``path``), ``judge`` (LLM judge: a server
            at ``judge_base_url`` serving ``judge_model``, or a local causal LM at ``judge_model``), or
            ``oracle`` (Monte-Carlo ground truth from the environment: an upper bound).
        name: label in the tables (default: ``kind``).
        aggregate: trajectory aggregation (default: the one recorded in the export, else value RM ``last``,
            implicit PRM ``min``).
        outcome_blind: the scorer never sees what a step that ended the episode returned (the environment's
            last reply may state the outcome): the search layer withholds it in Best-of-N and beam search,
            for every environment family (:mod:`agentrm.search.blind`). Default (``None``): blind for
            ``value_rm``, ``implicit_prm`` and ``judge``; the ``oracle`` reads the ground truth by design and
            cannot be blind. ``false`` makes an outcome-reading baseline (label it as such).
        exclude_final_step: deprecated name of ``outcome_blind`` (kept so older configs run; a warning says so).
        max_length, batch_size: RM scoring context budget (default: the ``max_length`` the RM was trained with,
            recorded in its export; 1024 for an export that predates the record; a smaller value warns) and
            batch size.
        judge_mode, judge_samples, judge_temperature: see :class:`agentrm.judge.JudgeScorer`.
        judge_max_tokens: the longest judge reply (tokens); a judge that reasons at length needs more.
        oracle_rollouts, oracle_error_rate: rollouts per candidate and the error rate of the rollout
            policy (the environment's expert).
        base: value RM / implicit PRM saved as a LoRA adapter: load the adapter on this base model
            (a local copy of the recorded base, say) instead of the one recorded in the directory.
        device, dtype, quantization, attn_implementation: value RM, implicit PRM and local judge:
            where and how the model is loaded (default: CUDA in bf16 when available, else CPU in fp32;
            ``quantization`` ``nf4``/``int8`` needs CUDA and bitsandbytes; the value head and the
            LM head stay unquantised); see :mod:`agentrm.models.placement`.
    """

    kind: Literal["value_rm", "implicit_prm", "judge", "oracle"] = "value_rm"
    path: str | None = None
    name: str | None = None
    aggregate: str | None = None
    outcome_blind: bool | None = None
    exclude_final_step: bool | None = None
    max_length: int | None = None
    batch_size: int = 16
    judge_mode: Literal["pointwise", "listwise"] = "pointwise"
    judge_samples: int = 1
    judge_temperature: float | None = None
    judge_max_tokens: int = 256
    judge_base_url: str | None = None
    judge_model: str | None = None
    oracle_rollouts: int = 1
    oracle_error_rate: float = 0.0
    base: str | None = None
    device: str | None = None
    dtype: str | None = None
    quantization: str | None = None
    attn_implementation: str = "auto"

    @property
    def label(self) -> str:
        return self.name or self.kind

    @property
    def blind(self) -> bool:
        """The effective ``outcome_blind`` (see the class doc; the deprecated alias counts when given)."""
        if self.kind == "oracle":
            return False
        if self.outcome_blind is not None:
            return self.outcome_blind
        return True if self.exclude_final_step is None else self.exclude_final_step


def _placement(spec: PolicySpec | ScorerSpec, what: str, local: bool) -> Placement | None:
    """The checked placement of a local model; ``None`` (after refusing loading options) for other kinds."""
    if local:
        return resolve_placement(spec.device, spec.dtype, spec.quantization, spec.attn_implementation, what)
    given = [f for f in LOAD_FIELDS if getattr(spec, f) is not None]
    if given or spec.attn_implementation != "auto":
        names = ", ".join(given or ["attn_implementation"])
        raise ValueError(f"{what}: {names} applies to a locally loaded model; kind {spec.kind!r} loads none")
    return None


def check_policy_spec(spec: PolicySpec, what: str = "policy") -> Placement | None:
    """Check ``spec`` without loading anything: fields, the local model's placement and reachability.

    Returns:
        The placement of an ``hf`` policy's LM (``None`` for other kinds).
    """
    if spec.kind not in ("expert", "scripted", "random", "hf", "openai"):
        raise ValueError(f"{what}.kind: unknown policy kind {spec.kind!r}")
    placement = _placement(spec, what, spec.kind == "hf")
    if spec.kind in ("expert", "scripted", "random"):
        return placement
    if not spec.model:
        raise ValueError(f"{what}: policy kind {spec.kind!r} needs 'model'")
    if spec.prompt not in ("plain", "react"):
        raise ValueError(f"{what}.prompt must be 'plain' or 'react', got {spec.prompt!r}")
    if spec.kind == "openai" and not spec.base_url:
        raise ValueError(f"{what}: policy kind 'openai' needs 'base_url'")
    if spec.kind == "hf":
        check_model_reachable(spec.model, f"{what}.model")
    return placement


def _reward_model_dir(spec: ScorerSpec, what: str) -> tuple[Path, dict]:
    """The RM directory of ``spec`` and its ``agentrm_config.json``, checked (for an adapter, its base too)."""
    if not spec.path:
        raise ValueError(f"{what}: scorer kind {spec.kind!r} needs 'path' (an exported HF directory)")
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
        raise ValueError(f"{what}: {cfg_file} holds a {cfg.get('model_class')!r}, kind {spec.kind!r} needs a {want!r}")
    adapter_dir = d if spec.kind == "value_rm" else d / "policy"
    if (adapter_dir / "adapter_config.json").exists():
        from agentrm.models.adapters import resolve_adapter_base

        base = spec.base or resolve_adapter_base(adapter_dir, cfg)
        check_model_reachable(base, f"{what}.base" if spec.base else f"{what}: the LoRA base model")
    return d, cfg


FALLBACK_MAX_LENGTH = 1024
"""Scoring context of an RM exported before its training ``max_length`` was recorded."""


def scoring_defaults(spec: ScorerSpec, cfg: dict, what: str) -> dict:
    """``max_length`` and ``aggregate`` for a scorer: the spec's where given, else what the RM was trained with.

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


def _check_blindness(spec: ScorerSpec, what: str) -> None:
    """Refuse contradictory blindness settings; warn about the deprecated name."""
    if spec.kind == "oracle" and (spec.outcome_blind or spec.exclude_final_step):
        raise ValueError(f"{what}.outcome_blind: the oracle reads the environment's ground truth by design; "
                         "it cannot be outcome-blind (drop the option)")
    if spec.exclude_final_step is not None:
        if spec.outcome_blind is not None and spec.outcome_blind != spec.exclude_final_step:
            raise ValueError(f"{what}: exclude_final_step={spec.exclude_final_step} contradicts "
                             f"outcome_blind={spec.outcome_blind}; keep outcome_blind only")
        warnings.warn(f"{what}.exclude_final_step is deprecated: write outcome_blind: "
                      f"{str(spec.exclude_final_step).lower()}", FutureWarning, stacklevel=3)


def check_scorer_spec(spec: ScorerSpec, what: str = "scorer") -> Placement | None:
    """Check ``spec`` without loading anything: fields, the model's placement and that it is there.

    Returns:
        The placement of a local model (value RM, implicit PRM, local judge), else ``None``.
    """
    if spec.kind not in ("value_rm", "implicit_prm", "judge", "oracle"):
        raise ValueError(f"{what}.kind: unknown scorer kind {spec.kind!r}")
    _check_blindness(spec, what)
    local = spec.kind in ("value_rm", "implicit_prm") or (spec.kind == "judge" and not spec.judge_base_url)
    placement = _placement(spec, what, local)
    if spec.kind in ("value_rm", "implicit_prm"):
        _reward_model_dir(spec, what)  # the directory, its config and an adapter's base
    elif spec.kind == "judge":
        if not spec.judge_base_url and not spec.judge_model:
            raise ValueError(f"{what}: scorer kind 'judge' needs 'judge_base_url' or a local 'judge_model'")
        if local:
            check_model_reachable(spec.judge_model, f"{what}.judge_model")
    return placement


def policy_factory(spec: PolicySpec) -> Callable[[int, bool], Policy]:
    """``make(seed, greedy) -> Policy``; an LM is loaded once and shared by the policies it makes."""
    placement = check_policy_spec(spec)
    if spec.kind in ("expert", "scripted"):
        from agentrm.policies.expert import EnvExpertPolicy

        return lambda seed, greedy: EnvExpertPolicy(spec.error_rate, seed=seed)
    if spec.kind == "random":
        from agentrm.policies.random_policy import RandomPolicy

        return lambda seed, greedy: RandomPolicy(seed=seed)
    from agentrm.policies.prompt import AgentPrompt

    prompt = AgentPrompt() if spec.prompt == "react" else None
    if spec.kind == "hf":
        from agentrm.models.backbone import build_backbone
        from agentrm.policies.batcher import GenerateBatcher
        from agentrm.policies.hf import HFPolicy

        model = build_backbone(str(resolve_path(spec.model, must_exist=False)), causal_lm=True,
                               **placement.load_kwargs())
        tok = load_tokenizer(spec.model)
        # one batcher for every policy made here: concurrently running episodes share generate calls
        batcher = GenerateBatcher(max_rows=spec.batch_size) if spec.batch_requests else None
        return lambda seed, greedy: HFPolicy(
            model,
            tok,
            temperature=0.0 if greedy else spec.temperature,
            top_p=spec.top_p,
            max_new_tokens=spec.max_new_tokens,
            seed=seed,
            prompt=prompt,
            max_resample=spec.max_resample,
            batch_size=spec.batch_size,
            batch_requests=spec.batch_requests,
            batcher=batcher,
        )
    if spec.kind == "openai":
        from agentrm.policies.openai_compat import OpenAIChatPolicy

        return lambda seed, greedy: OpenAIChatPolicy(
            spec.base_url,
            spec.model,
            api_key=spec.api_key,
            temperature=0.0 if greedy else spec.temperature,
            top_p=spec.top_p,
            max_tokens=spec.max_new_tokens,
            seed=seed,
            prompt=prompt,
            max_resample=spec.max_resample,
            max_concurrency=spec.max_concurrency,
        )
    raise ValueError(f"unknown policy kind {spec.kind!r}")


def build_scorer(spec: ScorerSpec, seed: int = 0) -> Scorer:
    """Check ``spec`` (:func:`check_scorer_spec`), then load the model (if any) and build the scorer it describes."""
    placement = check_scorer_spec(spec, f"scorer {spec.label!r}")
    if spec.kind in ("value_rm", "implicit_prm"):
        path, cfg = _reward_model_dir(spec, f"scorer {spec.label!r}")
        defaults = scoring_defaults(spec, cfg, f"scorer {spec.label!r}")
        load = {**placement.load_kwargs(), "base": spec.base}
        tok = load_tokenizer(str(path))
        if spec.kind == "value_rm":
            from agentrm.models.value_rm import ValueRewardModel
            from agentrm.scoring import ValueRMScorer

            return ValueRMScorer(
                ValueRewardModel.from_pretrained(path, **load),
                tok,
                batch_size=spec.batch_size,
                outcome_blind=spec.blind,
                **defaults,
            )
        from agentrm.models.implicit_prm import ImplicitPRM
        from agentrm.scoring import ImplicitPRMScorer

        return ImplicitPRMScorer(
            ImplicitPRM.from_pretrained(path, **load),
            tok,
            outcome_blind=spec.blind,
            batch_size=spec.batch_size,
            **defaults,
        )
    if spec.kind == "judge":
        from agentrm.judge import JudgeScorer

        if spec.judge_base_url:
            from agentrm.policies.openai_compat import OpenAIChatPolicy

            client = OpenAIChatPolicy(
                spec.judge_base_url, spec.judge_model or "default", max_tokens=spec.judge_max_tokens, seed=seed
            )
        elif spec.judge_model:
            from agentrm.models.backbone import build_backbone
            from agentrm.policies.hf import HFPolicy

            model = build_backbone(str(resolve_path(spec.judge_model, must_exist=False)), causal_lm=True,
                                   **placement.load_kwargs())
            client = HFPolicy(model, load_tokenizer(spec.judge_model), max_new_tokens=spec.judge_max_tokens, seed=seed)
        return JudgeScorer(client, spec.judge_mode, spec.judge_samples, spec.judge_temperature,
                           outcome_blind=spec.blind)
    if spec.kind == "oracle":
        from agentrm.policies.expert import EnvExpertPolicy
        from agentrm.search.oracle import OracleScorer

        return OracleScorer(None, EnvExpertPolicy(spec.oracle_error_rate, seed=seed), rollouts=spec.oracle_rollouts)
    raise ValueError(f"unknown scorer kind {spec.kind!r}")
