"""Labels checked against their meaning before training starts.

A reward model is only as good as what its labels say, so a training set is refused (one-line
:class:`~agentrm.data.schema.DataError` naming the option to change) when it cannot teach the
model anything:

* records without an outcome label are labelled only by a declared rule
  (:func:`apply_unlabeled_policy`: ``error``, ``success``, ``success_values`` or ``ignore``);
* a value RM needs step values (:func:`check_step_values`), an implicit PRM outcomes
  (:func:`check_outcomes`), both of two kinds (not one class) and at least ``min_labels`` of them,
  unless ``allow_degenerate`` says to train anyway;
* truncation at ``max_length`` that leaves nothing to train on is an error naming ``max_length``
  (:func:`check_steps_left`), one that drops more than a threshold a warning
  (:func:`truncation_warning`).

The checks read tokenised items, after truncation: what is counted is what the model will see.
"""

from __future__ import annotations

from typing import Literal

from agentrm.data.schema import DataError, Trajectory
from agentrm.data.tokenize import TokenizedTrajectory, TruncationCounts

UnlabeledPolicy = Literal["error", "success", "success_values", "ignore"]
UNLABELED_POLICIES: tuple[str, ...] = ("error", "success", "success_values", "ignore")
OVERRIDE = "pass --data.allow_degenerate true to train anyway"


class LabelError(DataError):
    """The labels cannot train the model: none, too few, one class, or a rule that gives none."""


class TruncationError(DataError):
    """``max_length`` truncation leaves nothing to train on; the message names ``data.max_length``."""


def apply_unlabeled_policy(
    trajs: list[Trajectory], path: str, policy: str, top_value: float = 1.0
) -> list[Trajectory]:
    """Refuse, label, or keep records without an outcome label (``meta["unlabeled"]``), in place.

    Policies:
        ``error``: refuse (reward models need outcome labels).
        ``success``: every such record is a successful demonstration: reward 1, success; its steps
            get no value (a value RM refuses such data, :func:`check_step_values`).
        ``success_values``: as ``success``, and every step without a value gets ``top_value`` (the top
            of the declared value range): a demonstration that reached the goal from every state it
            visited. Demonstrations alone are one class; the value RM still needs failures.
        ``ignore``: keep them as they are (reward 0, not a success): for policy SFT, which uses no labels.

    Raises:
        LabelError: (``error``) naming the file, how many records lack a label and the options.
        ValueError: an unknown policy.
    """
    if policy not in UNLABELED_POLICIES:
        raise ValueError(f"data.unlabeled must be one of {', '.join(UNLABELED_POLICIES)}; got {policy!r}")
    missing = [t for t in trajs if t.meta.get("unlabeled")]
    if not missing or policy == "ignore":
        return trajs
    if policy == "error":
        raise LabelError(
            f"{path}: {len(missing)} of {len(trajs)} records have no 'reward' (e.g. {missing[0].id!r}; an AgentGym "
            f"AgentTraj file?); reward models need outcome labels: add 'reward' to each record, or pass "
            f"--data.unlabeled success if every record is a successful demonstration (success_values to also "
            f"give each of its steps the value {top_value:g} for a value RM)"
        )
    for t in missing:
        t.reward, t.success = 1.0, True
        if policy == "success_values":
            for s in t.steps:
                if s.value is None:
                    s.value = float(top_value)
    return trajs


def check_unlabeled_for(
    trains_on: str, policy: str, unlabeled: int, source: str, top_value: float = 1.0
) -> None:
    """Refuse outcome-less records under a policy that gives the reward model wrong or no labels.

    Args:
        trains_on: ``step_values`` (value RM) or ``outcomes`` (implicit PRM).
        unlabeled: how many loaded records had no outcome label.

    Raises:
        LabelError: ``ignore`` (they would be learnt as failures), or ``success`` for a value RM (no values).
    """
    if not unlabeled:
        return
    if policy == "ignore":
        better = "success_values" if trains_on == "step_values" else "success"
        raise LabelError(
            f"{source}: data.unlabeled=ignore keeps {unlabeled} records without an outcome label as failures with "
            f"reward 0, and a reward model would learn and be validated on them as failures; pass --data.unlabeled "
            f"{better} if they are successful demonstrations, or leave those files out"
        )
    if policy == "success" and trains_on == "step_values":
        raise LabelError(
            f"{source}: data.unlabeled=success makes {unlabeled} records without an outcome label successes but gives "
            f"their steps no value, and a value RM trains on step values (demonstrations alone are also one class); "
            f"pass --data.unlabeled success_values to give every demonstration step the value {top_value:g}, mix in "
            f"trajectories with values (python -m agentrm.collect / agentrm.trees), or train the implicit PRM"
        )


def check_steps_left(counts: TruncationCounts, source: str, max_length: int | None) -> None:
    """Refuse a training split whose steps truncation all dropped.

    Raises:
        TruncationError: ``data.max_length=64 drops every step of ...; raise it``.
    """
    if counts.steps and not counts.steps_kept:
        raise TruncationError(
            f"data.max_length={max_length} drops every step of the training split ({counts.steps:,} steps of "
            f"{counts.trajectories:,} trajectories of {source}): not even a trajectory's newest step fits next to its "
            f"instruction; raise it"
        )


def check_step_values(
    items: list[TokenizedTrajectory], counts: TruncationCounts, source: str, max_length: int | None,
    min_labels: int, allow_degenerate: bool, policy_note: str = "",
) -> None:
    """What a value RM needs of its training split: step values, at least ``min_labels``, not all equal.

    Args:
        items: the tokenised training items (after truncation); ``counts``: their :class:`TruncationCounts`.
        source: the training files, for the messages.
        policy_note: appended to the one-value message (e.g. what ``success_values`` assigned).

    Raises:
        LabelError: no values, fewer than ``min_labels`` or a single value (the last two unless
            ``allow_degenerate``).
        TruncationError: values exist but truncation dropped them all.
    """
    if not counts.labels:
        raise LabelError(
            f"none of the {counts.trajectories:,} training trajectories ({source}) has a step value target ('value' "
            "on a step); collect them with python -m agentrm.collect (Monte-Carlo values) or python -m agentrm.trees"
        )
    if not counts.labels_kept:
        raise TruncationError(
            f"data.max_length={max_length} drops every labelled step of the training split ({counts.labels:,} of "
            f"{counts.labels:,} labels of {source}): not even the newest labelled step fits next to its instruction; "
            "raise it"
        )
    if allow_degenerate:
        return
    kept = counts.labels_kept
    if kept < min_labels:
        lost = f", {counts.labels_dropped:,} more dropped by data.max_length={max_length}" if counts.labels_dropped else ""
        raise LabelError(
            f"only {kept:,} labelled steps in the training split ({source}){lost}, fewer than data.min_labels="
            f"{min_labels}: a value RM fit on so few learns noise; add data, lower data.min_labels, or {OVERRIDE}"
        )
    values = {v for it in items for v in it.step_values if v == v}
    if len(values) == 1:
        (only,) = values
        raise LabelError(
            f"every labelled step of the training split ({kept:,} steps of {source}) has the value {only:g}: a value "
            f"RM would learn a constant{policy_note}; add trajectories with other values, or {OVERRIDE}"
        )


def check_outcomes(
    items: list[TokenizedTrajectory], source: str, min_labels: int, allow_degenerate: bool,
    success_rule: str | None = None,
) -> None:
    """What an implicit PRM needs of its training split: at least ``min_labels`` trajectories with a kept
    step, and both successes and failures among them (unless ``allow_degenerate``).

    Args:
        success_rule: how AgentGym files decided success (e.g. ``success = reward >= 1.0``), if any was
            loaded; named when partial rewards made every trajectory a failure.

    Raises:
        LabelError: naming the counts and the options.
    """
    if allow_degenerate:
        return
    usable = [it for it in items if it.step_end_idx]
    if len(usable) < min_labels:
        raise LabelError(
            f"only {len(usable):,} training trajectories with a step ({source}), fewer than data.min_labels="
            f"{min_labels}: a reward model fit on so few outcomes learns noise; add data, lower data.min_labels, "
            f"or {OVERRIDE}"
        )
    wins = sum(it.success for it in usable)
    if wins in (0, len(usable)):
        kind, other = ("success", "failures") if wins else ("failure", "successes")
        hint = ""
        partial = sum(0.0 < it.reward < 1.0 for it in usable)
        if not wins and partial and success_rule:
            hint = (f" ({partial:,} of them have a partial reward 0 < reward < 1, a failure by '{success_rule}': set "
                    "--data.success_threshold or --data.success_field)")
        raise LabelError(
            f"every one of the {len(usable):,} training trajectories ({source}) is a {kind}{hint}: outcome labels of "
            f"one class teach nothing; add {other}, or {OVERRIDE}"
        )


def truncation_warning(
    counts: TruncationCounts, split: str, max_length: int | None, threshold: float, what: str = "labels"
) -> str | None:
    """A warning when truncation dropped more than ``threshold`` of the split's ``labels`` (or ``steps``), else ``None``."""
    frac = counts.fraction(what)
    if frac <= threshold:
        return None
    dropped = counts.labels_dropped if what == "labels" else counts.steps_dropped
    total = counts.labels if what == "labels" else counts.steps
    return (
        f"data.max_length={max_length} drops {dropped:,} of {total:,} {'labelled steps' if what == 'labels' else 'steps'} "
        f"({100 * frac:.1f}%) of the {split} split (the oldest steps of {counts.truncated:,} trajectories), above "
        f"data.truncation_warning={threshold:g}; raise max_length to train on them"
    )
