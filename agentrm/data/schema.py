"""Trajectory schema and validated JSONL reading/writing.

One trajectory record per line::

    {"id": str, "task": str, "instruction": str,
     "steps": [{"action": str, "observation": str, "value": float | null}],
     "reward": float, "success": bool, "meta": {...}}

``instruction`` is the first user turn (task description plus the first observation);
each step is one assistant action (with its thought, if any) followed by the
environment's reply.  ``value`` is the step's value target (mean final reward of the
rollouts below it) and is optional: steps without one are not supervised by the
value loss.  ``meta`` is free-form; ``meta["group"]`` names the root trajectory a
branch belongs to, so train/validation splits never separate siblings.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


class DataError(ValueError):
    """Training data that cannot be trained on as given: a malformed record, labels that do not mean what
    the trainer needs, truncation that leaves nothing. The message is one line naming the file, line and
    field, or the option to change; commands print it as their error (exit code 2)."""


class DataFormatError(DataError):
    """A record in a data file is malformed. The message names file, line and field."""

    def __init__(self, path: str | os.PathLike, line: int, field_name: str, problem: str):
        self.path, self.line, self.field, self.problem = str(path), line, field_name, problem
        super().__init__(f"{path}:{line}: field '{field_name}': {problem}")


@dataclass
class Step:
    """One assistant action and the environment's reply to it.

    Attributes:
        action: the assistant's action (with its thought, if any).
        observation: the environment's reply.
        value: the step's value target (``None``: unsupervised).
        withheld: ``True`` only in the view an *outcome-blind* scorer gets of a step that ended the
            episode (:mod:`agentrm.search.blind`): what the environment returned is withheld and
            ``observation`` is empty. Each scorer documents how it reads such a step. Never set in data files.
    """

    action: str
    observation: str
    value: float | None = None
    withheld: bool = False

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"action": self.action, "observation": self.observation}
        if self.value is not None:
            d["value"] = self.value
        if self.withheld:
            d["withheld"] = True
        return d


@dataclass
class Trajectory:
    """A whole episode: instruction, steps, and the environment's final outcome."""

    id: str
    task: str
    instruction: str
    steps: list[Step]
    reward: float
    success: bool
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def group(self) -> str:
        """Root trajectory id shared by a trajectory and its branches (for splits)."""
        return str(self.meta.get("group", self.id))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["steps"] = [s.to_dict() for s in self.steps]
        if not self.meta:
            d.pop("meta")
        return d

    def to_messages(self) -> list[dict[str, str]]:
        """Chat messages: user instruction, then (assistant action, user observation) per step.

        The final observation is kept as a user turn so the reward model sees the
        environment's reply to the last action.
        """
        msgs = [{"role": "user", "content": self.instruction}]
        for s in self.steps:
            msgs.append({"role": "assistant", "content": s.action})
            msgs.append({"role": "user", "content": s.observation})
        return msgs


def _require(rec: dict, key: str, types: type | tuple[type, ...], path, line: int, prefix: str = ""):
    name = f"{prefix}{key}"
    if key not in rec:
        raise DataFormatError(path, line, name, "missing")
    val = rec[key]
    if isinstance(val, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise DataFormatError(path, line, name, f"expected {_tname(types)}, got bool")
    if not isinstance(val, types):
        raise DataFormatError(path, line, name, f"expected {_tname(types)}, got {type(val).__name__}")
    return val


def _tname(types) -> str:
    types = types if isinstance(types, tuple) else (types,)
    return " or ".join(t.__name__ for t in types)


def _finite(x: float, path, line: int, name: str) -> float:
    if not math.isfinite(x):
        raise DataFormatError(path, line, name, f"must be finite, got {x}")
    return float(x)


ValueRange = tuple[float, float]


def format_range(value_range: ValueRange) -> str:
    """``[0, 1]``: a value range as a user writes it."""
    return f"[{value_range[0]:g}, {value_range[1]:g}]"


def parse_value_range(value_range: object, option: str = "data.value_range") -> ValueRange:
    """Validate a declared value range: two finite numbers ``lo < hi``.

    Raises:
        ValueError: naming ``option`` and what is wrong.
    """
    if isinstance(value_range, (str, bytes)) or not hasattr(value_range, "__len__") or len(value_range) != 2:
        raise ValueError(f"{option} must be two numbers [low, high], got {value_range!r}")
    lo, hi = value_range
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) for v in (lo, hi)):
        raise ValueError(f"{option} must be two finite numbers [low, high], got {value_range!r}")
    if not lo < hi:
        raise ValueError(f"{option} must have low < high, got {format_range((lo, hi))}")
    return float(lo), float(hi)


def require_in_range(value: float, value_range: ValueRange | None, path, line: int, name: str) -> float:
    """``value`` unchanged if it lies in ``value_range`` (inclusive; ``None``: no range declared).

    Raises:
        DataFormatError: ``path:line: field 'steps[3].value': 7.0 is outside the declared value range [0, 1]``.
    """
    if value_range is not None and not value_range[0] <= value <= value_range[1]:
        raise DataFormatError(
            path, line, name,
            f"{value!r} is outside the declared value range {format_range(value_range)} (declare another "
            "with data.value_range; the loss must fit it)",
        )
    return value


def trajectory_from_dict(
    rec: Any, path: str | os.PathLike = "<dict>", line: int = 0, value_range: ValueRange | None = None
) -> Trajectory:
    """Validate one decoded record and build a :class:`Trajectory`.

    ``value_range`` (``(low, high)``, inclusive): every step value must lie in it (``None``: only finite).

    Raises:
        DataFormatError: naming ``path``, ``line`` and the offending field.
    """
    if not isinstance(rec, dict):
        raise DataFormatError(path, line, "<record>", f"expected a JSON object, got {type(rec).__name__}")
    tid = _require(rec, "id", (str, int), path, line)
    task = _require(rec, "task", str, path, line)
    instruction = _require(rec, "instruction", str, path, line)
    raw_steps = _require(rec, "steps", list, path, line)
    reward = _finite(_require(rec, "reward", (int, float), path, line), path, line, "reward")
    success = _require(rec, "success", bool, path, line)
    meta = rec.get("meta", {})
    if not isinstance(meta, dict):
        raise DataFormatError(path, line, "meta", f"expected object, got {type(meta).__name__}")
    steps = []
    for i, s in enumerate(raw_steps):
        p = f"steps[{i}]."
        if not isinstance(s, dict):
            raise DataFormatError(path, line, f"steps[{i}]", f"expected object, got {type(s).__name__}")
        action = _require(s, "action", str, path, line, p)
        obs = _require(s, "observation", str, path, line, p)
        value = s.get("value")
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise DataFormatError(path, line, p + "value", f"expected number or null, got {type(value).__name__}")
            value = require_in_range(_finite(value, path, line, p + "value"), value_range, path, line, p + "value")
        steps.append(Step(action=action, observation=obs, value=value))
    return Trajectory(
        id=str(tid), task=task, instruction=instruction, steps=steps, reward=reward, success=success, meta=meta
    )


def iter_jsonl(
    path: str | os.PathLike, skip_invalid: bool = False, value_range: ValueRange | None = None
) -> Iterator[Trajectory]:
    """Yield trajectories from a JSONL file, validating every record.

    Args:
        path: the ``.jsonl`` file.
        skip_invalid: when True, malformed records are skipped and a count is printed
            at the end; when False (default) the first one raises :class:`DataFormatError`.
        value_range: ``(low, high)`` every step value must lie in (``None``: any finite value).
    """
    skipped = 0
    with open(path, encoding="utf-8") as f:
        for lineno, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                try:
                    rec = json.loads(text)
                except json.JSONDecodeError as e:
                    raise DataFormatError(path, lineno, "<json>", f"invalid JSON: {e.msg} (column {e.colno})") from None
                yield trajectory_from_dict(rec, path, lineno, value_range)
            except DataFormatError as e:
                if not skip_invalid:
                    raise
                skipped += 1
                if skipped <= 5:
                    print(f"skipping: {e}")
    if skipped:
        print(f"{path}: skipped {skipped} malformed record(s)")


def read_jsonl(
    path: str | os.PathLike, skip_invalid: bool = False, value_range: ValueRange | None = None
) -> list[Trajectory]:
    """Read all trajectories of a JSONL file (see :func:`iter_jsonl`)."""
    return list(iter_jsonl(path, skip_invalid=skip_invalid, value_range=value_range))


def write_jsonl(path: str | os.PathLike, trajectories: Iterable[Trajectory], append: bool = False) -> int:
    """Write trajectories one per line, flushing each so a crash loses at most one record."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(path, "a" if append else "w", encoding="utf-8") as f:
        for t in trajectories:
            f.write(json.dumps(t.to_dict(), ensure_ascii=False) + "\n")
            f.flush()
            n += 1
    return n
