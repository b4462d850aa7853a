"""Building policies and scorers from resolved specs (:mod:`agentrm.search.resolve`): the models are loaded here.

A spec (:class:`~agentrm.search.specs.PolicySpec` / :class:`~agentrm.search.specs.ScorerSpec`) is accepted too,
and resolved first, for callers that hold no resolved one.
"""

from __future__ import annotations

from collections.abc import Callable

from agentrm.paths import load_tokenizer
from agentrm.policies.base import Policy
from agentrm.scoring import Scorer
from agentrm.search.resolve import (
    ResolvedPolicy,
    ResolvedScorer,
    remote_api_key,
    resolve_policy,
    resolve_scorer,
)
from agentrm.search.specs import PolicySpec, ScorerSpec

PolicyFactory = Callable[[int, bool], Policy]
"""``make(seed, greedy) -> Policy``."""


def policy_factory(policy: ResolvedPolicy | PolicySpec) -> PolicyFactory:
    """``make(seed, greedy) -> Policy``; an LM is loaded once and shared by the policies it makes."""
    resolved = policy if isinstance(policy, ResolvedPolicy) else resolve_policy(policy)
    spec = resolved.spec
    if spec.kind in ("expert", "scripted"):
        from agentrm.policies.expert import EnvExpertPolicy

        return lambda seed, greedy: EnvExpertPolicy(spec.error_rate, seed=seed)
    if spec.kind == "random":
        from agentrm.policies.random_policy import RandomPolicy

        return lambda seed, greedy: RandomPolicy(seed=seed)
    from agentrm.policies.prompt import AgentPrompt

    prompt = AgentPrompt() if spec.prompt == "react" else None
    if spec.kind == "hf":
        return _hf_policy_factory(resolved, prompt)
    from agentrm.policies.openai_compat import OpenAIChatPolicy, RequestLimits, check_endpoints_ready

    # every replica answers and serves the model, before any episode (one line naming the URL otherwise)
    check_endpoints_ready(spec.base_url, spec.model, spec.api_key, timeout_s=spec.ready_timeout_s)
    limits = RequestLimits(connect_timeout=spec.connect_timeout, read_timeout=spec.timeout,
                           deadline_s=spec.request_deadline_s, max_retries=spec.max_retries)
    return lambda seed, greedy: OpenAIChatPolicy(
        spec.base_url, spec.model, api_key=spec.api_key, temperature=0.0 if greedy else spec.temperature,
        top_p=spec.top_p, max_tokens=spec.max_new_tokens, seed=seed, prompt=prompt,
        max_resample=spec.max_resample, max_concurrency=spec.max_concurrency, limits=limits,
        ready_timeout_s=spec.ready_timeout_s,
    )


def _hf_policy_factory(resolved: ResolvedPolicy, prompt) -> PolicyFactory:
    from agentrm.models.backbone import build_backbone
    from agentrm.policies.batcher import GenerateBatcher
    from agentrm.policies.hf import HFPolicy

    spec = resolved.spec
    model = build_backbone(spec.model, causal_lm=True, **resolved.placement.load_kwargs())
    tok = load_tokenizer(spec.model)
    # one batcher for every policy made here: concurrently running episodes share generate calls
    batcher = GenerateBatcher(max_rows=spec.batch_size) if spec.batch_requests else None
    return lambda seed, greedy: HFPolicy(
        model, tok, temperature=0.0 if greedy else spec.temperature, top_p=spec.top_p,
        max_new_tokens=spec.max_new_tokens, seed=seed, prompt=prompt, max_resample=spec.max_resample,
        batch_size=spec.batch_size, batch_requests=spec.batch_requests, batcher=batcher,
    )


def build_scorer(scorer: ResolvedScorer | ScorerSpec, seed: int = 0) -> Scorer:
    """Load the model (if any) and build the scorer a resolved spec describes."""
    resolved = scorer if isinstance(scorer, ResolvedScorer) else resolve_scorer(scorer, f"scorer {scorer.label!r}")
    spec = resolved.spec
    if spec.kind in ("value_rm", "implicit_prm"):
        load = {**resolved.placement.load_kwargs(), "base": spec.base}
        tok = load_tokenizer(str(resolved.path))
        common = dict(batch_size=spec.batch_size, outcome_blind=spec.blind, cache_bytes=spec.cache_bytes,
                      **resolved.settings)
        if spec.kind == "value_rm":
            from agentrm.models.value_rm import ValueRewardModel
            from agentrm.scoring import ValueRMScorer

            return ValueRMScorer(ValueRewardModel.from_pretrained(resolved.path, **load), tok, **common)
        from agentrm.models.implicit_prm import ImplicitPRM
        from agentrm.scoring import ImplicitPRMScorer

        return ImplicitPRMScorer(ImplicitPRM.from_pretrained(resolved.path, **load), tok, **common)
    if spec.kind == "judge":
        return _judge(resolved, seed)
    if spec.kind == "remote":
        from agentrm.scoring.remote import RemoteScorer

        return RemoteScorer(spec.url, remote_api_key(spec, f"scorer {spec.label!r}"), outcome_blind=spec.blind,
                            request_deadline_s=spec.request_deadline_s, info=resolved.config.get("server"))
    from agentrm.policies.expert import EnvExpertPolicy
    from agentrm.search.oracle import OracleScorer

    return OracleScorer(None, EnvExpertPolicy(spec.oracle_error_rate, seed=seed), rollouts=spec.oracle_rollouts)


def _judge(resolved: ResolvedScorer, seed: int) -> Scorer:
    from agentrm.judge import JudgeScorer

    spec = resolved.spec
    if spec.judge_base_url:
        from agentrm.policies.openai_compat import OpenAIChatPolicy, RequestLimits, check_endpoints_ready

        model = spec.judge_model or "default"
        check_endpoints_ready(spec.judge_base_url, model, label="judge")
        client = OpenAIChatPolicy(spec.judge_base_url, model, max_tokens=spec.judge_max_tokens, seed=seed,
                                  limits=RequestLimits(label="judge"))
    else:
        from agentrm.models.backbone import build_backbone
        from agentrm.policies.hf import HFPolicy

        path = str(resolved.path) if resolved.path else spec.judge_model
        model = build_backbone(path, causal_lm=True, **resolved.placement.load_kwargs())
        client = HFPolicy(model, load_tokenizer(path), max_new_tokens=spec.judge_max_tokens, seed=seed)
    return JudgeScorer(client, spec.judge_mode, spec.judge_samples, spec.judge_decoding_temperature,
                       outcome_blind=spec.blind)
