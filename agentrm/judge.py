"""LLM-as-a-judge behind the :class:`~agentrm.scoring.Scorer` interface.

Two prompt styles:

* **pointwise**: each candidate action (or finished trajectory) is shown alone and the
  judge rates it 0-10; the rating is parsed robustly and averaged over ``samples``
  replies, then divided by 10 (scores in [0, 1]; ``nan`` if no reply had a number).
* **listwise**: all candidates are shown together, numbered, and the judge names the
  best one; a candidate's score is the fraction of replies that picked it.

The judge is any :class:`~agentrm.policies.chat.ChatClient` (``chat(messages, n,
temperature) -> list[str]``): :class:`~agentrm.policies.openai_compat.OpenAIChatPolicy`
for a vLLM / OpenAI-compatible server, :class:`~agentrm.policies.hf.HFPolicy` for a
local model.

Outcome-blindness is the search layer's job (:mod:`agentrm.search.blind`): a judge declared
``outcome_blind`` (the default in the search harness) gets each step that ended the episode as a withheld
step, which it shows as the action without a result, whatever the environment family.

Replies that do not follow the format (no rating, no index) are the fallback case: they are
counted in ``unparsed`` (the first one is also printed as a warning, verbatim); a prompt whose
replies all fail scores ``nan``, which Best-of-N and beam search rank lowest (so an unparsed
candidate is never preferred over a rated one, and all-``nan`` falls back to the tie-break).

Counters: ``forward_passes`` counts chat requests and ``forward_tokens`` estimates the
prompt tokens sent (characters / 4, a rough count independent of the judge's tokenizer).
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from agentrm.data.schema import Step, Trajectory
from agentrm.policies.chat import ChatClient
from agentrm.scoring import ScoringCounters

JudgeMode = Literal["pointwise", "listwise"]

SYSTEM = (
    "You are an expert evaluator of agents acting in text environments. "
    "Judge whether the agent's behaviour makes progress towards completing the task."
)
_RATING_PATTERNS = [
    re.compile(r"(?:rating|score)\s*(?:is|of)?\s*[:=]?\s*\**\s*(\d+(?:\.\d+)?)", re.IGNORECASE),
    re.compile(r"(\d+(?:\.\d+)?)\s*(?:/|out of)\s*10\b", re.IGNORECASE),
]
_NUMBER = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)(?![\w.])")
_INDEX_PATTERNS = [
    re.compile(r"best\s*(?:candidate|option|trajectory)?\s*(?:is)?\s*[:=]?\s*\[?#?(\d+)\]?", re.IGNORECASE),
    re.compile(r"(?:candidate|option|trajectory)\s*\[?#?(\d+)\]?", re.IGNORECASE),
    re.compile(r"\[(\d+)\]"),
]


def parse_rating(text: str, low: float = 0.0, high: float = 10.0) -> float:
    """The 0-10 rating in a judge reply (``nan`` if none).

    Tries ``Rating: 7`` / ``Score = 7.5``, then ``7/10`` / ``7 out of 10``, then the last bare
    number in ``[low, high]``.  Values are clamped to ``[low, high]``.
    """
    for pat in _RATING_PATTERNS:
        m = pat.findall(text)
        if m:
            return min(high, max(low, float(m[-1])))
    nums = [float(x) for x in _NUMBER.findall(text) if low <= float(x) <= high]
    return nums[-1] if nums else float("nan")


def parse_index(text: str, n: int) -> int | None:
    """The candidate index (``0..n-1``) named in a listwise judge reply, or ``None``."""
    for pat in _INDEX_PATTERNS:
        for m in reversed(pat.findall(text)):
            if 0 <= int(m) < n:
                return int(m)
    nums = [int(x) for x in re.findall(r"(?<!\d)(\d+)(?!\d)", text) if int(x) < n]
    return nums[-1] if nums else None


def render_transcript(traj: Trajectory) -> str:
    """Plain-text transcript: the task, then ``Action:`` / ``Observation:`` lines (none for a withheld step)."""
    lines = [f"Task: {traj.instruction}"]
    for i, s in enumerate(traj.steps):
        lines.append(f"Action {i + 1}: {s.action}")
        if not s.withheld:
            lines.append(f"Observation {i + 1}: {s.observation}")
    return "\n".join(lines)


def _candidate_text(c: str | Step) -> str:
    """A candidate as shown to the judge: the action, plus ``(result: <observation>)`` for a Step whose
    result is not withheld."""
    if isinstance(c, str):
        return c
    if c.withheld:
        return c.action
    return f"{c.action} (result: {c.observation})"


class JudgeScorer:
    """Scores candidates and trajectories by asking an LLM.

    Args:
        client: the judge (any :class:`ChatClient`).
        mode: ``"pointwise"`` (rate each, 0-10) or ``"listwise"`` (pick the best of all).
        samples: replies per prompt (``n`` of the chat call); pointwise ratings are averaged,
            listwise picks are counted.
        temperature: judge sampling temperature (``None``: the client's default).
        outcome_blind: the declared blindness (:attr:`agentrm.scoring.Scorer.outcome_blind`): the search
            layer then withholds what an episode-ending step returned.
    """

    def __init__(
        self,
        client: ChatClient,
        mode: JudgeMode = "pointwise",
        samples: int = 1,
        temperature: float | None = None,
        outcome_blind: bool = True,
    ):
        if mode not in ("pointwise", "listwise"):
            raise ValueError(f"mode must be 'pointwise' or 'listwise', got {mode!r}")
        if samples < 1:
            raise ValueError(f"samples must be >= 1, got {samples}")
        self.client = client
        self.mode = mode
        self.samples = samples
        self.temperature = temperature
        self.outcome_blind = outcome_blind
        self.counters = ScoringCounters()
        self.replies = 0
        self.unparsed = 0

    # ---------------------------------------------------------------- Scorer protocol
    def score_candidates(self, prefix: Trajectory, candidates: Sequence[str | Step]) -> Tensor:
        """``[K]`` scores of each candidate as the next action after ``prefix``.

        A :class:`Step` candidate is shown with the observation it led to, unless that is withheld.
        """
        self.counters.candidates += len(candidates)
        if not candidates:
            return torch.zeros(0)
        candidates = [_candidate_text(c) for c in candidates]
        history = render_transcript(prefix)
        if self.mode == "listwise":
            options = "\n".join(f"[{i}] {c}" for i, c in enumerate(candidates))
            prompt = (
                f"{history}\n\nCandidate next actions:\n{options}\n\n"
                "Which candidate is the best next action for completing the task? "
                "Think briefly, then answer on the last line as 'Best: <index>'."
            )
            return self._listwise(prompt, len(candidates))
        return torch.tensor(
            [
                self._pointwise(
                    f"{history}\n\nProposed next action: {c}\n\n"
                    "How good is this action for completing the task? Rate it from 0 (useless or harmful) "
                    "to 10 (certainly the right action). Answer on the last line as 'Rating: <number>'."
                )
                for c in candidates
            ],
            dtype=torch.float32,
        )

    def score_trajectories(self, trajs: Sequence[Trajectory]) -> Tensor:
        """``[N]`` scores of whole trajectories (did the agent complete the task?)."""
        self.counters.trajectories += len(trajs)
        if not trajs:
            return torch.zeros(0)
        texts = [render_transcript(t) for t in trajs]
        if self.mode == "listwise":
            body = "\n\n".join(f"=== Trajectory [{i}] ===\n{t}" for i, t in enumerate(texts))
            prompt = (
                f"{body}\n\nWhich trajectory is most likely to have completed its task? "
                "Think briefly, then answer on the last line as 'Best: <index>'."
            )
            return self._listwise(prompt, len(trajs))
        return torch.tensor(
            [
                self._pointwise(
                    f"{t}\n\nHow likely is it that the agent completed the task? Rate from 0 (certainly not) "
                    "to 10 (certainly). Answer on the last line as 'Rating: <number>'."
                )
                for t in texts
            ],
            dtype=torch.float32,
        )

    # ------------------------------------------------------------------ helpers
    def _ask(self, prompt: str) -> list[str]:
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]
        self.counters.forward_passes += 1
        self.counters.forward_tokens += (len(SYSTEM) + len(prompt)) // 4
        # keyed by the prompt: sampled replies are then a function of the prompt (and the client's seed), not of
        # the order in which concurrent or resumed episodes reach the judge
        return self.client.chat(messages, n=self.samples, temperature=self.temperature, key=prompt)

    def _note(self, replies: list[str], parsed: list) -> None:
        self.replies += len(replies)
        bad = [t for t, p in zip(replies, parsed) if p is None or (isinstance(p, float) and math.isnan(p))]
        if bad and not self.unparsed:
            warnings.warn(f"judge reply without the requested format (scored nan, counted in unparsed): {bad[0][:200]!r}",
                          stacklevel=3)
        self.unparsed += len(bad)

    def _pointwise(self, prompt: str) -> float:
        replies = self._ask(prompt)
        parsed = [parse_rating(t) for t in replies]
        self._note(replies, parsed)
        ratings = [r for r in parsed if not math.isnan(r)]
        return sum(ratings) / len(ratings) / 10.0 if ratings else float("nan")

    def _listwise(self, prompt: str, n: int) -> Tensor:
        votes = torch.zeros(n)
        replies = self._ask(prompt)
        picks = [parse_index(t, n) for t in replies]
        self._note(replies, picks)
        valid = [p for p in picks if p is not None]
        for p in valid:
            votes[p] += 1
        return votes / len(valid) if valid else torch.full((n,), float("nan"))
