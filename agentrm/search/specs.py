"""The specs of the models a search uses: the acting policy and the scorers (config dataclasses, no I/O).

A spec goes one way, once: **checked** (:meth:`PolicySpec.check` / :meth:`ScorerSpec.check`: kinds, ranges,
what each kind needs; pure, no file or device is touched), **resolved** (:mod:`agentrm.search.resolve`:
paths, placement, reachability, the RM's recorded settings, a weights fingerprint) and **built**
(:mod:`agentrm.search.build`: the model loaded, the policy or scorer made). Nothing downstream goes back.

Every local model (value RM, implicit PRM, local judge, ``hf`` policy) takes ``device``, ``dtype``,
``quantization`` and ``attn_implementation`` (:func:`agentrm.models.placement.resolve_placement`:
CUDA and bf16 when available, else CPU and fp32).
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import Literal

from agentrm.checks import at_least, fail, in_range, one_of
from agentrm.scoring.cache import parse_bytes

LOAD_FIELDS = ("device", "dtype", "quantization")
POLICY_KINDS = ("expert", "scripted", "random", "hf", "openai")
SCORER_KINDS = ("value_rm", "implicit_prm", "judge", "oracle", "remote")
AGGREGATES = ("last", "min", "mean", "max", "sum")


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
        request_deadline_s, timeout, connect_timeout, max_retries, ready_timeout_s: ``openai``: the total time
            one request may take, retries included; the per-attempt read and connect timeouts; retries of a
            failed attempt; the time each replica has to answer the readiness check made before any episode
            (``GET /models``; see :mod:`agentrm.policies.endpoint`). A server that stops answering fails the
            run with one line after ``request_deadline_s``, never a silent wait.
        batch_requests: ``hf``: generate the replies of many requests (beams, Best-of-N samples in
            lock-step, and the episodes running at once with ``concurrency``, through a shared
            :class:`~agentrm.policies.batcher.GenerateBatcher`) in batches of ``batch_size`` rows, each
            reply from its own seeded stream (:class:`~agentrm.policies.hf.HFPolicy`); off by default,
            which keeps the per-call stream the recorded figures used.
        batch_size: ``hf``: replies per ``generate`` call.
        device, dtype, quantization, attn_implementation: ``hf``: where and how the LM is loaded
            (default: CUDA in bf16 when available, else CPU in fp32; ``quantization`` ``nf4``/``int8``
            through bitsandbytes, on a CUDA GPU or the CPU); see :mod:`agentrm.models.placement`.
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
    request_deadline_s: float = 180.0
    timeout: float = 60.0
    connect_timeout: float = 10.0
    max_retries: int = 5
    ready_timeout_s: float = 15.0
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
            at ``judge_base_url`` serving ``judge_model``, or a local causal LM at ``judge_model``),
            ``oracle`` (Monte-Carlo ground truth from the environment: an upper bound), or ``remote`` (a
            value RM or implicit PRM served by ``python -m agentrm.serve`` at ``url``; see docs/serving.md).
        name: label in the tables (default: ``kind``).
        aggregate: trajectory aggregation (default: the one recorded in the export, else value RM ``last``,
            implicit PRM ``min``).
        outcome_blind: the scorer never sees what a step that ended the episode returned (the environment's
            last reply may state the outcome): the search layer withholds it in Best-of-N and beam search,
            for every environment family (:mod:`agentrm.search.blind`). Default (``None``): blind for
            ``value_rm``, ``implicit_prm`` and ``judge``; the ``oracle`` reads the ground truth by design and
            cannot be blind. ``false`` makes an outcome-reading baseline (label it as such).
        exclude_final_step: deprecated name of ``outcome_blind`` (kept so older configs run; a warning says so).
        cache_bytes: value RM / implicit PRM: the prefix KV cache's byte budget (an int or a size such as
            ``"4GiB"``; ``0`` keeps nothing; default ``None``: a quarter of the free GPU memory on CUDA, 1 GiB on
            the CPU; :class:`agentrm.scoring.cache.PrefixCache`); evictions are counted in the search summary.
        max_length, batch_size: RM scoring context budget (default: the ``max_length`` the RM was trained with,
            recorded in its export; 1024 for an export that predates the record; a smaller value warns) and
            batch size.
        judge_mode, judge_samples, judge_temperature: see :class:`agentrm.judge.JudgeScorer`; ``judge_temperature``
            ``None`` (the default) is greedy decoding (0) for one sample (one sampled reply is a noisy rating), and
            1.0 when several samples are averaged; a sampling judge seeds each request by its prompt, so its scores
            are reproducible on resume and with concurrent episodes.
        judge_max_tokens: the longest judge reply (tokens); a judge that reasons at length needs more.
        oracle_rollouts, oracle_error_rate: rollouts per candidate and the error rate of the rollout
            policy (the environment's expert).
        base: value RM / implicit PRM saved as a LoRA adapter: load the adapter on this base model
            (a local copy of the recorded base, say) instead of the one recorded in the directory.
        url: ``remote``: the server's base URL (``http://host:port``).
        api_key_env: ``remote``: the environment variable holding the server's API key (never the key itself).
        request_deadline_s: ``remote``: one call's total time, retries included (a server restarted within it
            answers the retry); the server must also be ready within it at startup.
        device, dtype, quantization, attn_implementation: value RM, implicit PRM and local judge:
            where and how the model is loaded (default: CUDA in bf16 when available, else CPU in fp32;
            ``quantization`` ``nf4``/``int8`` through bitsandbytes, on a CUDA GPU or the CPU; the value
            head and the LM head stay unquantised); see :mod:`agentrm.models.placement`.
    """

    kind: Literal["value_rm", "implicit_prm", "judge", "oracle", "remote"] = "value_rm"
    path: str | None = None
    name: str | None = None
    aggregate: str | None = None
    outcome_blind: bool | None = None
    exclude_final_step: bool | None = None
    max_length: int | None = None
    batch_size: int = 16
    cache_bytes: int | str | None = None
    judge_mode: Literal["pointwise", "listwise"] = "pointwise"
    judge_samples: int = 1
    judge_temperature: float | None = None
    judge_max_tokens: int = 256
    judge_base_url: str | None = None
    judge_model: str | None = None
    oracle_rollouts: int = 1
    oracle_error_rate: float = 0.0
    base: str | None = None
    url: str | None = None
    api_key_env: str | None = None
    request_deadline_s: float = 120.0
    device: str | None = None
    dtype: str | None = None
    quantization: str | None = None
    attn_implementation: str = "auto"

    @property
    def label(self) -> str:
        return self.name or self.kind

    @property
    def is_local(self) -> bool:
        """Whether a model is loaded in this process (an RM, or a judge without a server)."""
        return self.kind in ("value_rm", "implicit_prm") or (self.kind == "judge" and not self.judge_base_url)

    @property
    def blind(self) -> bool:
        """The effective ``outcome_blind`` (see the class doc; the deprecated alias counts when given)."""
        if self.kind == "oracle":
            return False
        if self.outcome_blind is not None:
            return self.outcome_blind
        return True if self.exclude_final_step is None else self.exclude_final_step

    @property
    def judge_decoding_temperature(self) -> float:
        """The judge's effective temperature: ``judge_temperature``, or by default greedy (0) for one sample and
        1.0 for several (averaging samples needs them to differ)."""
        if self.judge_temperature is not None:
            return self.judge_temperature
        return 0.0 if self.judge_samples == 1 else 1.0


def _refuse_loading_options(spec: PolicySpec | ScorerSpec, what: str) -> None:
    """Loading options (device, dtype, quantization, attention) apply to a locally loaded model only."""
    given = [f for f in LOAD_FIELDS if getattr(spec, f) is not None]
    if given or spec.attn_implementation != "auto":
        names = ", ".join(given or ["attn_implementation"])
        fail(what, f"{names} applies to a locally loaded model; kind {spec.kind!r} loads none")


def check_policy(spec: PolicySpec, what: str = "policy") -> None:
    """Check the fields of ``spec`` (no I/O); a :class:`~agentrm.checks.ConfigError` names ``what.<field>``."""
    one_of(spec.kind, POLICY_KINDS, f"{what}.kind")
    in_range(spec.error_rate, 0.0, 1.0, f"{what}.error_rate")
    at_least(spec.temperature, 0.0, f"{what}.temperature")
    if isinstance(spec.top_p, bool) or not 0.0 < spec.top_p <= 1.0:
        fail(f"{what}.top_p", f"must be in (0, 1], got {spec.top_p!r}")
    for name in ("max_new_tokens", "max_concurrency", "batch_size"):
        at_least(getattr(spec, name), 1, f"{what}.{name}")
    at_least(spec.max_resample, 0, f"{what}.max_resample")
    at_least(spec.max_retries, 0, f"{what}.max_retries")
    for name in ("request_deadline_s", "timeout", "connect_timeout", "ready_timeout_s"):
        value = getattr(spec, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            fail(f"{what}.{name}", f"must be a number of seconds > 0, got {value!r}")
    one_of(spec.prompt, ("plain", "react"), f"{what}.prompt")
    if spec.kind != "hf":
        _refuse_loading_options(spec, what)
    if spec.kind in ("hf", "openai") and not spec.model:
        fail(f"{what}.model", f"policy kind {spec.kind!r} needs the model (a directory, known name or hub id)")
    if spec.kind == "openai" and not spec.base_url:
        fail(f"{what}.base_url", "policy kind 'openai' needs the server's base URL (or a list of replicas)")


def check_scorer(spec: ScorerSpec, what: str = "scorer") -> None:
    """Check the fields of ``spec`` (no I/O); a :class:`~agentrm.checks.ConfigError` names ``what.<field>``."""
    one_of(spec.kind, SCORER_KINDS, f"{what}.kind")
    if spec.kind == "oracle" and (spec.outcome_blind or spec.exclude_final_step):
        fail(f"{what}.outcome_blind", "the oracle reads the environment's ground truth by design; it cannot be "
                                      "outcome-blind (drop the option)")
    if spec.exclude_final_step is not None:
        if spec.outcome_blind is not None and spec.outcome_blind != spec.exclude_final_step:
            fail(what, f"exclude_final_step={spec.exclude_final_step} contradicts outcome_blind={spec.outcome_blind}; "
                       "keep outcome_blind only")
        warnings.warn(f"{what}.exclude_final_step is deprecated: write outcome_blind: "
                      f"{str(spec.exclude_final_step).lower()}", FutureWarning, stacklevel=3)
    if spec.aggregate is not None:
        one_of(spec.aggregate, AGGREGATES, f"{what}.aggregate")
    at_least(spec.max_length, 1, f"{what}.max_length", allow_none=True)
    try:
        parse_bytes(spec.cache_bytes, f"{what}.cache_bytes")
    except ValueError as e:
        fail(f"{what}.cache_bytes", str(e))
    for name in ("batch_size", "judge_samples", "judge_max_tokens", "oracle_rollouts"):
        at_least(getattr(spec, name), 1, f"{what}.{name}")
    at_least(spec.judge_temperature, 0.0, f"{what}.judge_temperature", allow_none=True)
    in_range(spec.oracle_error_rate, 0.0, 1.0, f"{what}.oracle_error_rate")
    one_of(spec.judge_mode, ("pointwise", "listwise"), f"{what}.judge_mode")
    if spec.kind in ("value_rm", "implicit_prm") and not spec.path:
        fail(f"{what}.path", f"scorer kind {spec.kind!r} needs the exported RM directory")
    if spec.kind == "judge" and not (spec.judge_base_url or spec.judge_model):
        fail(what, "scorer kind 'judge' needs 'judge_base_url' (a server) or a local 'judge_model'")
    if spec.kind == "remote" or spec.url is not None or spec.api_key_env is not None:
        _check_remote(spec, what)
    if not spec.is_local:
        _refuse_loading_options(spec, what)


def _check_remote(spec: ScorerSpec, what: str) -> None:
    """``kind: remote`` needs an http(s) ``url``; the model's settings are the server's (refused here)."""
    if spec.kind != "remote":
        fail(f"{what}.url", f"url and api_key_env apply to scorer kind 'remote', not {spec.kind!r}")
    if not isinstance(spec.url, str) or not spec.url.startswith(("http://", "https://")):
        fail(f"{what}.url", f"scorer kind 'remote' needs the server's http(s) base URL, got {spec.url!r}")
    if spec.api_key_env is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", spec.api_key_env):
        fail(f"{what}.api_key_env", f"must name an environment variable (the key itself never goes in a config), "
                                    f"got {spec.api_key_env!r}")
    for name in ("path", "aggregate", "max_length", "base", "judge_base_url", "judge_model"):
        if getattr(spec, name) is not None:
            fail(f"{what}.{name}", "a remote scorer's model and scoring settings are the server's "
                                   "(python -m agentrm.serve options); drop it here")
    if isinstance(spec.request_deadline_s, bool) or not isinstance(spec.request_deadline_s, (int, float)) \
            or spec.request_deadline_s <= 0:
        fail(f"{what}.request_deadline_s", f"must be a number of seconds > 0, got {spec.request_deadline_s!r}")
