"""Config dataclasses for the evaluation harness and the factories that build policies and scorers from them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from agentrm.paths import load_tokenizer, resolve_path
from agentrm.policies.base import Policy
from agentrm.scoring import Scorer


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


@dataclass
class ScorerSpec:
    """A scorer to guide Best-of-N and beam search.

    Attributes:
        kind: ``value_rm`` / ``implicit_prm`` (HF directory at ``path``), ``judge`` (LLM judge: a server
            at ``judge_base_url`` serving ``judge_model``, or a local causal LM at ``judge_model``), or
            ``oracle`` (Monte-Carlo ground truth from the environment: an upper bound).
        name: label in the tables (default: ``kind``).
        aggregate: trajectory aggregation (value RM default ``last``, implicit PRM ``min``).
        exclude_final_step: value RM, outcome-blind (the default): Best-of-N scores trajectories
            without their final step and beam search withholds an episode-ending reply, since the
            environment's last reply may state the outcome.  ``false`` lets the RM read it (see
            :class:`agentrm.scoring.ValueRMScorer`).
        max_length, batch_size: RM scoring context budget and batch size.
        judge_mode, judge_samples, judge_temperature: see :class:`agentrm.judge.JudgeScorer`.
        oracle_rollouts, oracle_error_rate: rollouts per candidate and the error rate of the rollout
            policy (the environment's expert).
    """

    kind: Literal["value_rm", "implicit_prm", "judge", "oracle"] = "value_rm"
    path: str | None = None
    name: str | None = None
    aggregate: str | None = None
    exclude_final_step: bool = True
    max_length: int | None = 1024
    batch_size: int = 16
    judge_mode: Literal["pointwise", "listwise"] = "pointwise"
    judge_samples: int = 1
    judge_temperature: float | None = None
    judge_base_url: str | None = None
    judge_model: str | None = None
    oracle_rollouts: int = 1
    oracle_error_rate: float = 0.0

    @property
    def label(self) -> str:
        return self.name or self.kind


def policy_factory(spec: PolicySpec) -> Callable[[int, bool], Policy]:
    """``make(seed, greedy) -> Policy``; an LM is loaded once and shared by the policies it makes."""
    if spec.kind in ("expert", "scripted"):
        from agentrm.policies.expert import EnvExpertPolicy

        return lambda seed, greedy: EnvExpertPolicy(spec.error_rate, seed=seed)
    if spec.kind == "random":
        from agentrm.policies.random_policy import RandomPolicy

        return lambda seed, greedy: RandomPolicy(seed=seed)
    if not spec.model:
        raise ValueError(f"policy kind {spec.kind!r} needs 'model'")
    if spec.prompt not in ("plain", "react"):
        raise ValueError(f"policy.prompt must be 'plain' or 'react', got {spec.prompt!r}")
    from agentrm.policies.prompt import AgentPrompt

    prompt = AgentPrompt() if spec.prompt == "react" else None
    if spec.kind == "hf":
        from agentrm.models.backbone import build_backbone
        from agentrm.policies.hf import HFPolicy

        model = build_backbone(str(resolve_path(spec.model, must_exist=False)), causal_lm=True)
        tok = load_tokenizer(spec.model)
        return lambda seed, greedy: HFPolicy(
            model,
            tok,
            temperature=0.0 if greedy else spec.temperature,
            top_p=spec.top_p,
            max_new_tokens=spec.max_new_tokens,
            seed=seed,
            prompt=prompt,
            max_resample=spec.max_resample,
        )
    if spec.kind == "openai":
        from agentrm.policies.openai_compat import OpenAIChatPolicy

        if not spec.base_url:
            raise ValueError("policy kind 'openai' needs 'base_url'")
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
    """Load the model (if any) and build the scorer ``spec`` describes."""
    if spec.kind in ("value_rm", "implicit_prm"):
        if not spec.path:
            raise ValueError(f"scorer kind {spec.kind!r} needs 'path' (an exported HF directory)")
        path = resolve_path(spec.path)
        tok = load_tokenizer(str(path))
        if spec.kind == "value_rm":
            from agentrm.models.value_rm import ValueRewardModel
            from agentrm.scoring import ValueRMScorer

            return ValueRMScorer(
                ValueRewardModel.from_pretrained(path),
                tok,
                max_length=spec.max_length,
                batch_size=spec.batch_size,
                aggregate=spec.aggregate or "last",
                exclude_final_step=spec.exclude_final_step,
            )
        from agentrm.models.implicit_prm import ImplicitPRM
        from agentrm.scoring import ImplicitPRMScorer

        return ImplicitPRMScorer(
            ImplicitPRM.from_pretrained(path),
            tok,
            aggregate=spec.aggregate or "min",
            max_length=spec.max_length,
            batch_size=spec.batch_size,
        )
    if spec.kind == "judge":
        from agentrm.judge import JudgeScorer

        if spec.judge_base_url:
            from agentrm.policies.openai_compat import OpenAIChatPolicy

            client = OpenAIChatPolicy(
                spec.judge_base_url, spec.judge_model or "default", max_tokens=256, seed=seed
            )
        elif spec.judge_model:
            from agentrm.models.backbone import build_backbone
            from agentrm.policies.hf import HFPolicy

            model = build_backbone(str(resolve_path(spec.judge_model, must_exist=False)), causal_lm=True)
            client = HFPolicy(model, load_tokenizer(spec.judge_model), max_new_tokens=256, seed=seed)
        else:
            raise ValueError("scorer kind 'judge' needs 'judge_base_url' or a local 'judge_model'")
        return JudgeScorer(client, spec.judge_mode, spec.judge_samples, spec.judge_temperature)
    if spec.kind == "oracle":
        from agentrm.policies.expert import EnvExpertPolicy
        from agentrm.search.oracle import OracleScorer

        return OracleScorer(None, EnvExpertPolicy(spec.oracle_error_rate, seed=seed), rollouts=spec.oracle_rollouts)
    raise ValueError(f"unknown scorer kind {spec.kind!r}")
