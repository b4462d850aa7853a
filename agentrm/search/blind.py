"""Outcome-blindness, in one place: what a scorer may see of a step that ended the episode.

The environment's last reply often states the outcome ("Mission complete.", "*** The End *** You scored
5 out of a possible 5", a ScienceWorld completion message). A search that let its scorer read it would
choose by the ground truth, not by the scorer's judgement. So every search method (greedy scores nothing;
Best-of-N and step-level beam search score through this module and nowhere else) shows a scorer whose
:attr:`~agentrm.scoring.Scorer.outcome_blind` is ``True`` each step that ended the episode as
``Step(action, "", withheld=True)``:

* *which* step ended the episode is decided by the environment's ``done`` flag (beam search: the candidate's
  own step; Best-of-N: the last step of a finished trajectory, ``meta["ended"]``, see
  :func:`agentrm.search.episode.finish`), never by matching phrases, so it holds for every family;
* the action stays visible (the implicit PRM rewards its tokens, a judge rates it); the reply does not;
* the reward and success flag never reach any scorer (they are not part of what is scored).

How each scorer reads a withheld step (the same in Best-of-N and beam search, so both make the same choice
for the same candidate):

* value RM: the value of the state *before* the step, the last state it can see (at the end of the
  previous observation; for a first step, at the end of the instruction turn, the initial state);
* implicit PRM: unchanged: its step reward covers the action's tokens, which precede the reply;
* LLM judge: the action is shown without a result.

A scorer with ``outcome_blind = False`` (the MC oracle; a value RM configured with ``outcome_blind: false``
as an outcome-reading baseline) gets the steps as the environment returned them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from torch import Tensor

from agentrm.data.schema import Step, Trajectory
from agentrm.scoring import Scorer, score_many


def is_blind(scorer: Scorer) -> bool:
    """The scorer's declared blindness (a required field of the protocol; no default is assumed)."""
    blind = scorer.outcome_blind
    if not isinstance(blind, bool):
        raise TypeError(f"{type(scorer).__name__}.outcome_blind must be a bool, got {blind!r}")
    return blind


def withheld(step: Step) -> Step:
    """``step`` with what the environment returned withheld (its value target dropped too)."""
    return Step(action=step.action, observation="", withheld=True)


def finished_view(traj: Trajectory) -> Trajectory:
    """What a blind scorer sees of a trajectory: its last step withheld when the episode ended there.

    ``traj.meta["ended"]`` (set by :func:`~agentrm.search.episode.finish` from ``done``) says whether it
    did; a trajectory without the key counts as ended (Best-of-N ranks finished trajectories).
    """
    if not traj.steps or not traj.meta.get("ended", True):
        return traj
    return dataclasses.replace(traj, steps=[*traj.steps[:-1], withheld(traj.steps[-1])])


def candidate_view(step: Step, done: bool, blind: bool) -> Step:
    """A candidate step as a scorer sees it: withheld when it ended the episode and the scorer is blind."""
    return withheld(step) if blind and done else step


def score_finished(scorer: Scorer, trajs: Sequence[Trajectory]) -> Tensor:
    """``[N]`` scores of finished trajectories (Best-of-N), through the scorer's blindness."""
    if is_blind(scorer):
        trajs = [finished_view(t) for t in trajs]
    return scorer.score_trajectories(list(trajs))


def score_children(
    scorer: Scorer, requests: Sequence[tuple[Trajectory, Sequence[tuple[Step, bool]]]]
) -> list[Tensor]:
    """``[K_i]`` scores of each prefix's candidate steps (beam search), through the scorer's blindness.

    Args:
        requests: per prefix, its candidates as ``(step, done)``: the action with the environment's reply
            to it, and whether that step ended the episode.
    """
    blind = is_blind(scorer)
    shown = [(prefix, [candidate_view(s, done, blind) for s, done in cands]) for prefix, cands in requests]
    return score_many(scorer, shown)
