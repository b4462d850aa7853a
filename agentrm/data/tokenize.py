"""Tokenise trajectories with the tokenizer's chat template and exact step-end indices.

The chat template renders ``Trajectory.to_messages()``.  A step is one assistant action
and the environment's reply, so step ``i`` spans

* its **action**: from the first token of the assistant content to the token closing
  the assistant turn (``step_start_idx .. action_end_idx``); the implicit PRM sums
  log-ratios over these tokens, the tokens the policy generated;
* its **end** (``step_end_idx``): the token closing the observation turn that follows.
  The value RM reads its value there: the step's value target is the value of the
  state the step reached, which that observation describes.

Boundaries are found by rendering the conversation up to each point and checking that
the rendering is a prefix of the whole conversation; the boundary token is the last
token that starts before the prefix ends (for Llama-3 templates, the ``<|eot_id|>``
closing the turn).  Offsets, not a string search for a separator, map characters to
tokens, so the indices are exact for any fast tokenizer.
"""

from __future__ import annotations

import bisect
import hashlib
import math
from dataclasses import dataclass, field

from agentrm.data.schema import Trajectory


class ChatTemplateError(ValueError):
    """The tokenizer cannot render trajectories with exact step boundaries."""


@dataclass
class TokenizedTrajectory:
    """One trajectory as token ids with step-end positions.

    Attributes:
        input_ids: ``[T]`` token ids (``T <= max_length`` after truncation).
        step_start_idx: ``[S]`` index of each surviving step's first action token (the
            assistant content, after the template's turn header).
        action_end_idx: ``[S]`` index of the token closing each step's assistant turn.
        step_end_idx: ``[S]`` index of the token closing each step's observation turn.
        step_values: ``[S]`` value targets, ``nan`` where the step has none.
        step_parent: ``[S]`` 63-bit hash of everything before the step (siblings share it).
        step_action: ``[S]`` 63-bit hash of the step's action (siblings differ in it).
        success / reward: the trajectory's final outcome.
        task_key: 63-bit hash of the trajectory's task type (``Trajectory.task``), for per-type metrics.
    """

    id: str
    group: str
    input_ids: list[int]
    step_start_idx: list[int]
    action_end_idx: list[int]
    step_end_idx: list[int]
    step_values: list[float]
    step_parent: list[int] = field(default_factory=list)
    step_action: list[int] = field(default_factory=list)
    success: bool = False
    reward: float = 0.0
    num_steps_total: int = 0
    first_step: int = 0
    """Index in the trajectory of the first kept step (> 0 when truncation dropped the oldest steps)."""
    labels_dropped: int = 0
    """Step values (labels) lost with the steps truncation dropped."""
    task_key: int = 0

    def __post_init__(self) -> None:
        n = len(self.step_end_idx)
        assert len(self.step_values) == n == len(self.step_start_idx) == len(self.action_end_idx) == len(self.step_parent) == len(self.step_action), (
            "labels must match surviving steps"
        )


def _hash63(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little") >> 1


def render(tokenizer, messages: list[dict[str, str]], generation_prompt: bool = False) -> str:
    """The chat template's rendering of ``messages`` (text, not tokens)."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)



def require_chat_tokenizer(tokenizer) -> None:
    """Raise :class:`ChatTemplateError` unless ``tokenizer`` is fast (offsets) and has a chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateError(
            f"tokenizer {type(tokenizer).__name__} has no chat_template; set one (see agentrm/assets/tiny_tokenizer)"
        )
    if not getattr(tokenizer, "is_fast", False):
        raise ChatTemplateError("a fast tokenizer (with offset mapping) is required for exact step ends")


def last_token_before(token_starts: list[int], char: int, what: str = "boundary") -> int:
    """Index of the last token starting before character ``char`` (the token that closes a turn ending there).

    Args:
        token_starts: ``[T]`` character offset where each token starts (from ``return_offsets_mapping``).
    """
    j = bisect.bisect_left(token_starts, char) - 1
    if j < 0:
        raise ChatTemplateError(f"{what} at char {char} maps to no token")
    return j


def head_tokens(tokenizer, messages: list[dict[str, str]], token_starts: list[int]) -> int:
    """Length in tokens of the *head* (BOS, system prompt, the instruction turn) of a rendering."""
    return last_token_before(token_starts, len(render(tokenizer, messages[:1]).rstrip()), "head end") + 1


def step_char_spans(tokenizer, traj: Trajectory) -> tuple[str, list[int], list[int], list[int]]:
    """Render the trajectory; return ``(text, starts, action_ends, step_ends)`` in characters.

    The start is where the assistant content begins (the rendering of the conversation
    before the step with ``add_generation_prompt=True``); the action end is where the
    rendering up to and including the assistant turn ends, the step end where the
    rendering up to and including the following observation ends (trailing whitespace
    excluded).

    Raises:
        ChatTemplateError: when the tokenizer has no chat template or its rendering of a
            shorter conversation is not a prefix of the full rendering.
    """
    require_chat_tokenizer(tokenizer)
    messages = traj.to_messages()
    full = render(tokenizer, messages)
    starts, action_ends, ends = [], [], []
    for i in range(len(traj.steps)):
        head = tokenizer.apply_chat_template(messages[: 1 + 2 * i], tokenize=False, add_generation_prompt=True)
        action = render(tokenizer, messages[: 2 + 2 * i])  # user, (assistant, user)*i, assistant
        step = render(tokenizer, messages[: 3 + 2 * i])  # ... assistant, user (observation)
        for what, text in (("before", head), ("up to the action of", action), ("up to", step)):
            if not full.startswith(text):
                raise ChatTemplateError(
                    f"trajectory {traj.id}: chat template rendering {what} step {i} is not a prefix of the full "
                    "conversation; step boundaries cannot be located exactly with this template"
                )
        starts.append(len(head))
        action_ends.append(len(action.rstrip()))
        ends.append(len(step.rstrip()))
    return full, starts, action_ends, ends


def oldest_steps_to_drop(n_tokens: int, head_len: int, block_starts: list[int], budget: int) -> int:
    """The one truncation rule (training, trajectory scoring and candidate scoring share it).

    Keep the *head* (BOS, system prompt, the instruction turn: tokens ``[0, head_len)``), drop the
    oldest whole steps and keep the most recent ones.  Step ``i`` occupies tokens
    ``[block_starts[i], block_starts[i+1])`` (the last one runs to ``n_tokens``).

    Returns:
        ``k``, the smallest number of oldest steps whose removal makes ``head_len + n_tokens -
        block_starts[k] <= budget``; ``len(block_starts)`` when even the newest step alone does not fit.
    """
    for k, start in enumerate(block_starts):
        if head_len + n_tokens - start <= budget:
            return k
    return len(block_starts)


def tokenize_trajectory(tokenizer, traj: Trajectory, max_length: int | None = None) -> TokenizedTrajectory:
    """Tokenise one trajectory; over ``max_length`` tokens, drop the oldest whole steps.

    Truncation (:func:`oldest_steps_to_drop`): the head (BOS, system, instruction turn) is kept,
    the oldest whole steps are dropped with their labels, the most recent ones kept, so labels and
    step ends stay aligned and the value read at the last step is the trajectory's real last
    state.  When not even the last step fits next to the head, the sequence is cut on the right
    with zero steps.  A trajectory with zero steps yields empty step lists.
    """
    require_chat_tokenizer(tokenizer)
    text, char_starts, char_action_ends, char_ends = step_char_spans(tokenizer, traj)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)  # truncated below, by steps
    ids: list[int] = enc["input_ids"]
    starts = [s for s, _ in enc["offset_mapping"]]

    what = f"trajectory {traj.id}: step boundary"
    ends_tok = [last_token_before(starts, c, what) for c in char_ends]
    action_ends_tok = [last_token_before(starts, c, what) for c in char_action_ends]
    starts_tok = [min(bisect.bisect_left(starts, c), e) for c, e in zip(char_starts, action_ends_tok)]

    parents, actions = [], []
    ctx = f"{traj.task}\x00{traj.instruction}"
    for s in traj.steps:
        parents.append(_hash63(ctx))
        actions.append(_hash63(s.action))
        ctx += f"\x00{s.action}\x00{s.observation}"
    values = [math.nan if s.value is None else float(s.value) for s in traj.steps]

    first = 0
    if max_length is not None and len(ids) > max_length and ends_tok:
        ids = ids[: ends_tok[-1] + 1]  # the template's trailing tokens carry no label: cut them first
    if max_length is not None and len(ids) > max_length:
        head_len = head_tokens(tokenizer, traj.to_messages(), starts)
        blocks = [head_len] + [e + 1 for e in ends_tok[:-1]]
        first = oldest_steps_to_drop(len(ids), head_len, blocks, max_length)
        if first < len(blocks):
            shift = blocks[first] - head_len
            ids = ids[:head_len] + ids[blocks[first] :]
            ends_tok = [e - shift for e in ends_tok]
            action_ends_tok = [a - shift for a in action_ends_tok]
            starts_tok = [s - shift for s in starts_tok]
        else:  # not even the newest step fits next to the head
            ids = ids[:max_length]
    keep = slice(first, len(traj.steps))
    out = TokenizedTrajectory(
        id=traj.id,
        group=traj.group,
        input_ids=ids,
        step_start_idx=starts_tok[keep],
        action_end_idx=action_ends_tok[keep],
        step_end_idx=ends_tok[keep],
        step_values=values[keep],
        step_parent=parents[keep],
        step_action=actions[keep],
        success=bool(traj.success),
        reward=float(traj.reward),
        num_steps_total=len(traj.steps),
        first_step=min(first, len(traj.steps)),
        labels_dropped=sum(not math.isnan(v) for v in values[: min(first, len(traj.steps))]),
        task_key=_hash63(traj.task),
    )
    n = len(out.step_end_idx)
    assert len(out.step_values) == n and (not n or out.step_end_idx[-1] < len(ids) <= (max_length or len(ids)))
    return out


@dataclass
class TruncationCounts:
    """What ``max_length`` truncation dropped from a set of tokenised trajectories.

    Attributes:
        trajectories / truncated: trajectories, and those that lost at least one step.
        steps / steps_dropped: steps before truncation, and those dropped.
        labels / labels_dropped: steps with a value target before truncation, and those dropped.
    """

    trajectories: int = 0
    truncated: int = 0
    steps: int = 0
    steps_dropped: int = 0
    labels: int = 0
    labels_dropped: int = 0

    @classmethod
    def of(cls, items: list[TokenizedTrajectory]) -> TruncationCounts:
        c = cls(trajectories=len(items))
        for it in items:
            kept_labels = sum(not math.isnan(v) for v in it.step_values)
            c.truncated += it.first_step > 0
            c.steps += it.num_steps_total
            c.steps_dropped += it.first_step
            c.labels += kept_labels + it.labels_dropped
            c.labels_dropped += it.labels_dropped
        return c

    @property
    def steps_kept(self) -> int:
        return self.steps - self.steps_dropped

    @property
    def labels_kept(self) -> int:
        return self.labels - self.labels_dropped

    def fraction(self, what: str = "labels") -> float:
        """Fraction of ``labels`` (or ``steps``) dropped; 0 when there were none."""
        total, dropped = (self.labels, self.labels_dropped) if what == "labels" else (self.steps, self.steps_dropped)
        return dropped / total if total else 0.0

    def summary(self) -> str:
        """``1,234 steps (693 labelled) of 555 trajectories; truncation dropped 12 steps (1.0%) and 8 labels (1.2%) from 4``."""
        s = f"{self.steps:,} steps ({self.labels:,} labelled) of {self.trajectories:,} trajectories; truncation dropped "
        if not self.truncated:
            return s + "nothing"
        return (s + f"{self.steps_dropped:,} steps ({100 * self.fraction('steps'):.1f}%) and {self.labels_dropped:,} "
                f"labels ({100 * self.fraction('labels'):.1f}%) from {self.truncated:,} trajectories")

    def as_metrics(self, prefix: str) -> dict[str, float]:
        """``{prefix}/steps``, ``{prefix}/steps_dropped``, ``{prefix}/labels``, ``{prefix}/labels_dropped``..."""
        names = ("trajectories", "truncated", "steps", "steps_dropped", "labels", "labels_dropped")
        return {f"{prefix}/{n}": float(getattr(self, n)) for n in names}


def tokenize_initial_state(tokenizer, traj: Trajectory, max_length: int | None = None) -> TokenizedTrajectory:
    """The initial state of ``traj``'s episode as one unlabeled "step" ending at the instruction turn.

    The value RM reads a state at the token closing the user turn that describes it; the initial state
    (task and first observation) is described by the instruction turn, so its value is read at the token
    closing that turn (the last token of the head, see :func:`head_tokens`). Used where a state before
    any step must be scored (an outcome-blind view of a one-step episode, :mod:`agentrm.search.blind`).
    Over ``max_length`` the head is cut on the right and the value is read at its last kept token.

    Returns:
        A :class:`TokenizedTrajectory` with ``input_ids`` = the head and one step whose start, action end
        and end are all the head's last token (for value reading only: it has no action tokens).
    """
    require_chat_tokenizer(tokenizer)
    messages = traj.to_messages()[:1]
    text = render(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)  # cut to the head below
    starts = [s for s, _ in enc["offset_mapping"]]
    ids = enc["input_ids"][: head_tokens(tokenizer, messages, starts)]
    if max_length is not None:
        ids = ids[:max_length]
    end = len(ids) - 1
    if end < 0:
        raise ChatTemplateError(f"trajectory {traj.id}: the instruction turn renders to no token")
    return TokenizedTrajectory(
        id=traj.id, group=traj.group, input_ids=ids, step_start_idx=[end], action_end_idx=[end],
        step_end_idx=[end], step_values=[math.nan], step_parent=[_hash63(f"{traj.task}\x00{traj.instruction}")],
        step_action=[0], success=bool(traj.success), reward=float(traj.reward), num_steps_total=0, first_step=0,
        task_key=_hash63(traj.task),
    )
