"""Load AgentGym conversation records into :class:`Trajectory` objects.

AgentGym stores trajectories as ``{"item_id", "conversations": [{"from": "human"|"gpt",
"value", "loss"?}], "reward"?}``.  The turns before the first trained (``loss`` not
false) ``gpt`` turn form the instruction (AgentGym opens with a task prompt, an
untrained "OK" from gpt, then the task itself); every later ``gpt`` turn is one step
and the ``human`` turn after it is the environment's observation.

Success is declared, never guessed: ``reward >= success_threshold`` (default 1.0, AgentGym's full
reward), or the boolean field ``success_field`` of each record when one is named. Environments with
partial rewards (WebShop, ScienceWorld scores) need one of them set; :func:`outcome_summary` reports
per file how many records the rule counts as successes, failures and partial rewards.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from agentrm.data.schema import DataFormatError, Step, Trajectory, ValueRange, _require, iter_jsonl


def success_rule(success_threshold: float = 1.0, success_field: str | None = None) -> str:
    """The rule deciding an AgentGym record's success, in words (``success = reward >= 1.0``)."""
    return f"success = the record's {success_field!r} field" if success_field else f"success = reward >= {success_threshold:g}"


def agentgym_to_trajectory(
    rec: Any, path: str | os.PathLike = "<dict>", line: int = 0, success_threshold: float = 1.0,
    success_field: str | None = None,
) -> Trajectory:
    """Validate one AgentGym record and convert it. Errors name file, line and field.

    Success is ``reward >= success_threshold``, or, when ``success_field`` names one, that boolean field
    of the record (its reward then defaults to 1.0/0.0 when the record has none). A record with neither
    a ``reward`` nor the success field is marked ``meta["unlabeled"]`` (reward 0, not a success).
    """
    if not isinstance(rec, dict):
        raise DataFormatError(path, line, "<record>", f"expected a JSON object, got {type(rec).__name__}")
    item_id = _require(rec, "item_id", (str, int), path, line)
    convs = _require(rec, "conversations", list, path, line)
    turns: list[tuple[str, str, bool]] = []
    for i, c in enumerate(convs):
        p = f"conversations[{i}]."
        if not isinstance(c, dict):
            raise DataFormatError(path, line, f"conversations[{i}]", "expected object")
        role = _require(c, "from", str, path, line, p)
        if role not in ("human", "gpt"):
            raise DataFormatError(path, line, p + "from", f"expected 'human' or 'gpt', got {role!r}")
        value = _require(c, "value", str, path, line, p)
        loss = c.get("loss", True)
        if loss is not None and not isinstance(loss, bool):
            raise DataFormatError(path, line, p + "loss", f"expected bool, got {type(loss).__name__}")
        turns.append((role, value, loss is not False))
    if not turns or turns[0][0] != "human":
        raise DataFormatError(path, line, "conversations[0].from", "the first turn must be 'human'")
    first = next((i for i, (r, _, trained) in enumerate(turns) if r == "gpt" and trained), len(turns))
    instruction = "\n\n".join(v for _, v, _ in turns[:first])
    steps: list[Step] = []
    i = first
    while i < len(turns):
        role, value, _ = turns[i]
        if role != "gpt":
            raise DataFormatError(path, line, f"conversations[{i}].from", "expected 'gpt' (turns must alternate)")
        obs = ""
        if i + 1 < len(turns):
            if turns[i + 1][0] != "human":
                raise DataFormatError(path, line, f"conversations[{i + 1}].from", "expected 'human' (turns must alternate)")
            obs = turns[i + 1][1]
        steps.append(Step(action=value, observation=obs))
        i += 2
    labeled = "reward" in rec
    reward = rec.get("reward", 0.0)
    if isinstance(reward, bool) or not isinstance(reward, (int, float)):
        raise DataFormatError(path, line, "reward", f"expected number, got {type(reward).__name__}")
    if not math.isfinite(reward):
        raise DataFormatError(path, line, "reward", f"must be finite, got {reward}")
    success = float(reward) >= success_threshold
    if success_field:
        if success_field in rec:
            success = rec[success_field]
            if not isinstance(success, bool):
                raise DataFormatError(path, line, success_field,
                                      f"expected bool (data.success_field), got {type(success).__name__}")
            reward = rec.get("reward", float(success))
            labeled = True
        elif labeled:
            raise DataFormatError(path, line, success_field,
                                  "missing (data.success_field names it; this record has only a 'reward')")
    task = str(item_id).rsplit("_", 1)[0] if "_" in str(item_id) else "agentgym"
    return Trajectory(
        id=str(item_id),
        task=task,
        instruction=instruction,
        steps=steps,
        reward=float(reward),
        success=bool(success),
        meta={} if labeled else {"unlabeled": True},
    )


def iter_agentgym(
    path: str | os.PathLike, skip_invalid: bool = False, success_threshold: float = 1.0,
    success_field: str | None = None,
) -> Iterator[Trajectory]:
    """Yield trajectories from an AgentGym ``.json`` (array) or ``.jsonl`` file.

    For a JSON array the reported "line" is the 1-based record index. ``success_threshold`` /
    ``success_field``: see :func:`agentgym_to_trajectory`.
    """
    text = Path(path).read_text(encoding="utf-8")
    skipped = 0
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataFormatError(path, e.lineno, "<json>", f"invalid JSON: {e.msg}") from None
        numbered = list(enumerate(records, start=1))
    else:
        numbered = []
        for lineno, ln in enumerate(text.splitlines(), start=1):
            if ln.strip():
                try:
                    numbered.append((lineno, json.loads(ln)))
                except json.JSONDecodeError as e:
                    if not skip_invalid:
                        raise DataFormatError(path, lineno, "<json>", f"invalid JSON: {e.msg}") from None
                    skipped += 1
    for lineno, rec in numbered:
        try:
            yield agentgym_to_trajectory(rec, path, lineno, success_threshold, success_field)
        except DataFormatError:
            if not skip_invalid:
                raise
            skipped += 1
    if skipped:
        print(f"{path}: skipped {skipped} malformed AgentGym record(s)")


def is_agentgym_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds AgentGym conversations (a JSON array, or a first record with ``conversations``)."""
    with open(path, encoding="utf-8") as f:
        head = f.read(4096).lstrip()
    return head.startswith("[") or '"conversations"' in head.split("\n", 1)[0]


def load_trajectories(
    path: str | os.PathLike, skip_invalid: bool = False, *, value_range: ValueRange | None = None,
    success_threshold: float = 1.0, success_field: str | None = None,
) -> list[Trajectory]:
    """Load a file in either format: native trajectory JSONL or AgentGym conversations.

    The format is decided from the first record (``conversations`` key → AgentGym). ``value_range``
    bounds step values (native files; AgentGym records have none); ``success_threshold`` and
    ``success_field`` decide AgentGym successes (native records carry ``success``).
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"trajectory file not found: {p}")
    if is_agentgym_file(p):
        return list(iter_agentgym(p, skip_invalid, success_threshold, success_field))
    return list(iter_jsonl(p, skip_invalid=skip_invalid, value_range=value_range))


def outcome_summary(path: str | os.PathLike, trajs: list[Trajectory], rule: str | None = None) -> str:
    """One line for the fit log: a file's records, successes, failures, partial rewards and step values.

    ``rule`` (e.g. :func:`success_rule`'s) says how success was decided; with a rule, the line also counts the
    partial rewards (``0 < reward < 1``) and how many of them the rule counted as successes. Without one (files
    that record success themselves, e.g. BabyAI's shaped rewards below 1 on success) that count says nothing.
    """
    wins = sum(t.success for t in trajs)
    partial = [t for t in trajs if 0.0 < t.reward < 1.0]
    steps = sum(len(t.steps) for t in trajs)
    valued = sum(s.value is not None for t in trajs for s in t.steps)
    unlabeled = sum(bool(t.meta.get("unlabeled")) for t in trajs)
    how = f" ({rule})" if rule else ""
    line = f"{path}{how}: {len(trajs)} records: {wins} successes, {len(trajs) - wins} failures"
    if partial and rule:
        line += f"; {len(partial)} partial rewards (0 < reward < 1), {sum(t.success for t in partial)} counted as successes"
    if unlabeled:
        line += f"; {unlabeled} without an outcome label"
    return line + f"; {steps} steps, {valued} with a value"
