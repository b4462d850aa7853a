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

from agentrm.data.collate import collate_trajectories
from agentrm.data.schema import Step, Trajectory
from agentrm.data.tokenize import tokenize_initial_state
from agentrm.kernels import step_logratio, token_logprobs
from agentrm.models.head_call import causal_lm_head
from agentrm.models.implicit_prm import ImplicitPRM
from agentrm.models.value_rm import AGGREGATIONS, ValueRewardModel, aggregate_steps
from agentrm.scoring.cache import cache_kwarg
from agentrm.scoring.driver import CandidateScorer, PackMode, ScoringPath
from agentrm.scoring.layouts import ScoringLayout, model_inputs, scored_rows
from agentrm.scoring.tokens import Candidate


def _is_withheld(c: Candidate) -> bool:
    return isinstance(c, Step) and c.withheld


def _readable(traj: Trajectory) -> Trajectory:
    """``traj`` without a trailing withheld step (the value RM reads the state before it)."""
    if traj.steps and traj.steps[-1].withheld:
        return dataclasses.replace(traj, steps=traj.steps[:-1])
    return traj


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
        tokenizer, max_length, pack, batch_size, path, cache_entries, fold_tokens, cache_bytes: see
            :class:`~agentrm.scoring.driver.CandidateScorer`.
        aggregate: trajectory aggregation of step values for :meth:`score_trajectories` (``"last"``).
        outcome_blind: the declared blindness (:attr:`agentrm.scoring.Scorer.outcome_blind`): the search
            layer then withholds what an episode-ending step returned (:mod:`agentrm.search.blind`).

    A **withheld step** (``Step.withheld``: the outcome-blind view of a step that ended the episode) has no
    observation to read a value at, so it is read as the state before it, the last state the RM can see:

    * :meth:`score_trajectories` drops a trailing withheld step; a trajectory left with no step scores the
      initial state, read at the token closing the instruction turn
      (:func:`~agentrm.data.tokenize.tokenize_initial_state`), never ``nan``;
    * :meth:`score_candidates` scores a withheld candidate with the value of ``prefix`` itself (its last
      step's state, or the initial state), so Best-of-N and beam search read the same state for the same
      episode-ending step. All withheld candidates of one prefix therefore tie: the value RM cannot tell
      episode-ending actions apart without their result (the implicit PRM and the judge can).
    """

    def __init__(
        self,
        model: ValueRewardModel,
        tokenizer,
        max_length: int | None = None,
        pack: PackMode = "auto",
        batch_size: int = 16,
        aggregate: str = "last",
        outcome_blind: bool = True,
        path: ScoringPath | None = None,
        cache_entries: int = 64,
        fold_tokens: int = 16,
        cache_bytes: int | str | None = None,
    ):
        super().__init__(tokenizer, max_length, pack, batch_size, path, cache_entries, fold_tokens, cache_bytes)
        _check_aggregate(aggregate)
        self.model = model.eval()
        self.aggregate = aggregate
        self.outcome_blind = outcome_blind

    @torch.no_grad()
    def score_trajectories(self, trajs: Sequence[Trajectory]) -> Tensor:
        """``[N]`` whole-trajectory scores; a trailing withheld step is read as the state before it (class doc)."""
        visible = [_readable(t) for t in trajs]
        scores = super().score_trajectories(visible)
        initial = [i for i, t in enumerate(visible) if not t.steps]
        if initial:
            scores[initial] = self._initial_state_values([visible[i] for i in initial])
        return scores

    @torch.no_grad()
    def score_candidates_many(self, requests: Sequence[tuple[Trajectory, Sequence[Candidate]]]) -> list[Tensor]:
        """As :meth:`CandidateScorer.score_candidates_many`; a withheld candidate scores its prefix's value."""
        shown = [(prefix, [c for c in cands if not _is_withheld(c)]) for prefix, cands in requests]
        scores = super().score_candidates_many(shown)
        held = [i for i, (_, cands) in enumerate(requests) if any(_is_withheld(c) for c in cands)]
        values = self.score_trajectories([requests[i][0] for i in held]).tolist() if held else []
        prefix_value = dict(zip(held, values))
        out = []
        for i, (_, cands) in enumerate(requests):
            if i not in prefix_value:
                out.append(scores[i])
                continue
            visible = iter(scores[i].tolist())
            out.append(torch.tensor([prefix_value[i] if _is_withheld(c) else next(visible) for c in cands],
                                    dtype=torch.float32))
        return out

    def _initial_state_values(self, trajs: Sequence[Trajectory]) -> Tensor:
        """``[N]`` values of the initial states (read at the end of each instruction turn)."""
        dev = self._device()
        items = [tokenize_initial_state(self.tokenizer, t, self.max_length) for t in trajs]
        batch = {k: v.to(dev) for k, v in collate_trajectories(items, self._pad_id()).items()}
        self._count(1, int(batch["attention_mask"].sum()), batch["input_ids"].numel())
        return self._model_score_trajectory(batch).float().cpu()

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
        outcome_blind: the declared blindness (:attr:`agentrm.scoring.Scorer.outcome_blind`). A withheld
            step (the outcome-blind view of a step that ended the episode) is rendered with an empty reply;
            its reward, over the action's tokens, does not depend on the reply, which comes after them.
        tokenizer, max_length, pack, batch_size, path, cache_entries, fold_tokens, cache_bytes: as
            :class:`ValueRMScorer`.
    """

    _passes_per_forward = 2

    def __init__(
        self,
        model: ImplicitPRM,
        tokenizer,
        aggregate: str = "min",
        outcome_blind: bool = True,
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
        self.outcome_blind = outcome_blind

    @torch.no_grad()
    def score_trajectories(self, trajs: Sequence[Trajectory]) -> Tensor:
        """``[N]`` trajectory scores (``aggregate`` of the step rewards); a trajectory with no step scores
        ``Q_0 = 0``, the implicit value of the empty prefix (no ``nan``)."""
        scores = super().score_trajectories(trajs)
        empty = [i for i, t in enumerate(trajs) if not t.steps]
        scores[empty] = 0.0
        return scores

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
