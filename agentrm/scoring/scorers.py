"""The reward-model scorers: value RM (state value after a step) and implicit PRM (step log-ratio).

Both run on the driver of :mod:`agentrm.scoring.driver` (cached, packed or plain path) and read their
heads inside module forwards (:mod:`agentrm.models.head_call`), so sharded weights are gathered.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from agentrm.data.schema import Trajectory
from agentrm.kernels import step_logratio, token_logprobs
from agentrm.models.head_call import causal_lm_head
from agentrm.models.implicit_prm import ImplicitPRM
from agentrm.models.value_rm import AGGREGATIONS, ValueRewardModel, aggregate_steps
from agentrm.scoring.cache import cache_kwarg
from agentrm.scoring.driver import CandidateScorer, PackMode, ScoringPath
from agentrm.scoring.layouts import ScoringLayout, model_inputs, scored_rows
from agentrm.scoring.tokens import Candidate


def _check_aggregate(aggregate: str) -> None:
    if aggregate not in AGGREGATIONS + ("sum",):
        raise ValueError(f"aggregate must be one of {AGGREGATIONS + ('sum',)}; got {aggregate!r}")


class ValueRMScorer(CandidateScorer):
    """Scores candidates by the value RM's value of the state each candidate step reaches.

    As in training (``tokenize_trajectory``), the value is read at the token closing the
    observation turn that follows the action, so candidates must be :class:`Step` objects
    carrying the observation the environment returned (beam search steps a clone of the
    environment for every candidate before scoring).

    Args:
        model: a :class:`ValueRewardModel` (set to eval mode).
        tokenizer, max_length, pack, batch_size, path, cache_entries, fold_tokens: see
            :class:`~agentrm.scoring.driver.CandidateScorer`.
        aggregate: trajectory aggregation of step values for :meth:`score_trajectories` (``"last"``).
        exclude_final_step: score whole trajectories without their final step, so the
            environment's last reply (which may state the outcome, e.g. "Mission complete.")
            cannot be read: the score is the value of the state before the final action.  The
            search harness turns it on by default (``ScorerSpec.exclude_final_step``: search must not
            choose by the outcome the environment reports).  Candidate scoring reads what it is given;
            beam search withholds an episode-ending reply from an outcome-blind scorer
            (:func:`agentrm.search.beam.beam_search`).
    """

    def __init__(
        self,
        model: ValueRewardModel,
        tokenizer,
        max_length: int | None = None,
        pack: PackMode = "auto",
        batch_size: int = 16,
        aggregate: str = "last",
        exclude_final_step: bool = False,
        path: ScoringPath | None = None,
        cache_entries: int = 64,
        fold_tokens: int = 16,
        cache_bytes: int | str | None = None,
    ):
        super().__init__(tokenizer, max_length, pack, batch_size, path, cache_entries, fold_tokens, cache_bytes)
        _check_aggregate(aggregate)
        self.model = model.eval()
        self.aggregate = aggregate
        self.exclude_final_step = exclude_final_step

    def score_trajectories(self, trajs: Sequence[Trajectory]) -> Tensor:
        """``[N]`` whole-trajectory scores (see ``exclude_final_step``)."""
        if self.exclude_final_step:
            trajs = [dataclasses.replace(t, steps=t.steps[:-1]) for t in trajs]
        return super().score_trajectories(trajs)

    def _prepare_candidates(self, candidates: Sequence[Candidate]) -> list[Candidate]:
        bare = [i for i, c in enumerate(candidates) if isinstance(c, str)]
        if bare:
            raise ValueError(
                f"candidate {bare[0]} is a bare action: the value RM scores the state a step reaches, read at "
                "the end of its observation; pass Step(action, observation) after stepping the environment"
            )
        return list(candidates)

    def _configs(self) -> list:
        return [self.model.backbone.config]

    def _device(self) -> torch.device:
        return next(self.model.value_head.parameters()).device

    def choose_path(self, toks) -> str:
        """As :meth:`CandidateScorer.choose_path`; a non-causal backbone (``ValueRewardModel.causal`` false: a
        bidirectional encoder) always takes the plain path: one row per candidate that ends at its step end, so
        no token sees another candidate or anything after the state it scores (a prefix cache or a packed row
        would let the prefix attend to the candidates)."""
        if getattr(self.model, "causal", True):
            return super().choose_path(toks)
        if self.path in ("cached", "packed"):
            raise ValueError(f"path={self.path!r}: the value RM's backbone is non-causal (a bidirectional encoder); "
                             "only the plain path (one row per candidate) keeps later tokens out of a state")
        return "plain"

    def _cache_models(self) -> list[tuple[str, Any]]:
        return [("backbone", self.model.backbone)]

    def _prefix_forward(self, key: str, input_ids: Tensor, attention_mask: Tensor, past: Any) -> None:
        bb = self.model.backbone
        bb(input_ids=input_ids, attention_mask=attention_mask, use_cache=True, **{cache_kwarg(bb): past})

    def _score_layout(self, layout: ScoringLayout, n_prefix_steps: int, pasts: dict[str, Any] | None) -> Tensor:
        backbone = self.model.backbone
        out = backbone(**model_inputs(backbone, layout, pasts and pasts["backbone"]))
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        sigmoid = self.model.value_activation == "sigmoid"
        if not getattr(self.model, "causal", True):  # plain rows, one candidate each: pooled as the model reads
            return self.model.rows_values(hidden, layout.attention_mask_2d, layout.end_idx % hidden.shape[1], sigmoid)
        # the head's weights are read inside its forward (sharded inference); an MLP head on the gathered rows
        return self.model.head_values(hidden.reshape(-1, hidden.shape[-1]), layout.end_idx, sigmoid)

    def _model_score_trajectory(self, batch: dict[str, Tensor]) -> Tensor:
        return self.model.score_trajectory(batch, self.aggregate)


class ImplicitPRMScorer(CandidateScorer):
    """Scores candidates by the implicit PRM's rewards ``r_i = beta * sum over step i's action tokens of log(pi/pi_ref)``.

    Candidates of different beams have different prefixes, so a candidate's own step reward is
    not comparable across beams; the comparable quantity is the cumulative ``Q_t = sum_{i<=t} r_i``
    (the implicit PRM's value of the partial trajectory).  Hence the defaults: ``include_prefix``
    with ``candidate_aggregate="sum"`` ranks beams by ``Q_t`` (the prefix's steps are forwarded, so
    this takes the packed or plain path; ``include_prefix=False`` scores ``r_t`` alone and can use
    the cache).  Under truncation the sum covers the steps that survive (the instruction and the
    newest steps; see :mod:`agentrm.data.tokenize`).

    Trajectory aggregation for Best-of-N (:meth:`score_trajectories`, ``aggregate``): ``min`` (the
    weakest step, the usual PRM choice and the default), ``sum`` (``Q_T``: the implicit outcome
    reward the PRM was trained on), ``last`` (the last step's reward), ``mean``, ``max``.

    On the cached path both the policy's and the reference's prefix keys/values are cached (a LoRA
    reference, i.e. the policy with its adapter disabled, under its own cache key).

    Args:
        model: an :class:`ImplicitPRM` (policy set to eval mode).
        aggregate: trajectory aggregation for :meth:`score_trajectories` (default ``min``).
        include_prefix: ``True`` (default): a candidate's score aggregates the prefix's step rewards
            and its own with ``candidate_aggregate`` (packed or plain path); ``False``: its own
            step reward ``r_t`` only.
        candidate_aggregate: ``sum`` (default, ``Q_t``) or any trajectory aggregation.
        tokenizer, max_length, pack, batch_size, path, cache_entries, fold_tokens: as :class:`ValueRMScorer`.
    """

    _passes_per_forward = 2

    def __init__(
        self,
        model: ImplicitPRM,
        tokenizer,
        aggregate: str = "min",
        include_prefix: bool = True,
        max_length: int | None = None,
        pack: PackMode = "auto",
        batch_size: int = 16,
        path: ScoringPath | None = None,
        cache_entries: int = 64,
        fold_tokens: int = 16,
        candidate_aggregate: str = "sum",
        cache_bytes: int | str | None = None,
    ):
        super().__init__(tokenizer, max_length, pack, batch_size, path, cache_entries, fold_tokens, cache_bytes)
        _check_aggregate(aggregate)
        _check_aggregate(candidate_aggregate)
        self.model = model
        model.policy.eval()
        self.aggregate = aggregate
        self.candidate_aggregate = candidate_aggregate
        self.include_prefix = include_prefix
        self._with_prefix_steps = include_prefix

    def _prepare_candidates(self, candidates: Sequence[Candidate]) -> list[Candidate]:
        # the step reward covers the action tokens only; observations would be computed for nothing
        return [c if isinstance(c, str) else c.action for c in candidates]

    def _configs(self) -> list:
        ref = self.model.reference
        return [self.model.policy.config] + ([] if ref is None else [ref.config])

    def _device(self) -> torch.device:
        return next(self.model.policy.parameters()).device

    def _cache_models(self) -> list[tuple[str, Any]]:
        return [("policy", self.model.policy), ("reference", self.model.reference)]

    def _reference(self, device: torch.device):
        """``(context, model)`` computing reference log-probs (adapter disabled, or the separate copy)."""
        if self.model.reference is None:
            return self.model.policy.disable_adapter(), self.model.policy
        model = self.model.reference
        if next(model.parameters()).device != device:
            model.to(device)
        return contextlib.nullcontext(), model

    def _prefix_forward(self, key: str, input_ids: Tensor, attention_mask: Tensor, past: Any) -> None:
        ctx, model = (contextlib.nullcontext(), self.model.policy) if key == "policy" else self._reference(input_ids.device)
        with ctx:
            model(
                input_ids=input_ids, attention_mask=attention_mask, use_cache=True, logits_to_keep=1,
                **{cache_kwarg(model): past},
            )

    def _reference_logprobs(self, layout: ScoringLayout, past: Any) -> Tensor:
        """``[M]`` reference log-probs of the scored tokens."""
        ctx, model = self._reference(layout.input_ids.device)
        with ctx:
            return causal_lm_head(
                model,
                lambda head, h: token_logprobs(scored_rows(h, layout), head.weight, layout.targets),
                **model_inputs(model, layout, past),
            )

    def _score_layout(self, layout: ScoringLayout, n_prefix_steps: int, pasts: dict[str, Any] | None) -> Tensor:
        pasts = pasts or {}
        ref_logp = self._reference_logprobs(layout, pasts.get("reference"))
        policy = self.model.policy
        r = causal_lm_head(  # the LM head is read inside its forward (see agentrm.models.head_call)
            policy,
            lambda head, h: step_logratio(
                scored_rows(h, layout), head.weight, layout.targets, layout.step_ids, ref_logp,
                self.model.beta, layout.num_steps,
            ),
            **model_inputs(policy, layout, pasts.get("policy")),
        )  # [n_prefix_steps + k]
        cand = r[n_prefix_steps:]
        if not self.include_prefix:
            return cand
        steps = torch.cat([r[:n_prefix_steps].expand(len(cand), -1), cand[:, None]], dim=1)  # [k, S_p + 1]
        return aggregate_steps(steps, self.candidate_aggregate)

    def _model_score_trajectory(self, batch: dict[str, Tensor]) -> Tensor:
        return self.model.score_trajectory(batch, self.aggregate)
