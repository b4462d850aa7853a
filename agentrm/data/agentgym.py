"""Load AgentGym conversation records into :class:`Trajectory` objects.

AgentGym stores trajectories as ``{"item_id", "conversations": [{"from": "human"|"gpt",
"value", "loss"?}], "reward"?}``.  The turns before the first trained (``loss`` not
false) ``gpt`` turn form the instruction (AgentGym opens with a task prompt, an
untrained "OK" from gpt, then the task itself); every later ``gpt`` turn is one step
and the ``human`` turn after it is the environment's observation.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from agentrm.data.schema import DataFormatError, Step, Trajectory, _require, iter_jsonl


def agentgym_to_trajectory(
    rec: Any, path: str | os.PathLike = "<dict>", line: int = 0, success_threshold: float = 1.0
) -> Trajectory:
    """Validate one AgentGym record and convert it. Errors name file, line and field."""
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
    task = str(item_id).rsplit("_", 1)[0] if "_" in str(item_id) else "agentgym"
    return Trajectory(
        id=str(item_id),
        task=task,
        instruction=instruction,
        steps=steps,
        reward=float(reward),
        success=float(reward) >= success_threshold,
        meta={} if labeled else {"unlabeled": True},
    )


def iter_agentgym(path: str | os.PathLike, skip_invalid: bool = False) -> Iterator[Trajectory]:
    """Yield trajectories from an AgentGym ``.json`` (array) or ``.jsonl`` file.

    For a JSON array the reported "line" is the 1-based record index.
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
            yield agentgym_to_trajectory(rec, path, lineno)
        except DataFormatError:
            if not skip_invalid:
                raise
            skipped += 1
    if skipped:
        print(f"{path}: skipped {skipped} malformed AgentGym record(s)")


def load_trajectories(path: str | os.PathLike, skip_invalid: bool = False) -> list[Trajectory]:
    """Load a file in either format: native trajectory JSONL or AgentGym conversations.

    The format is decided from the first record (``conversations`` key → AgentGym).
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"trajectory file not found: {p}")
    head = p.read_text(encoding="utf-8").lstrip()[:4096]
    if head.startswith("[") or '"conversations"' in head.split("\n", 1)[0]:
        return list(iter_agentgym(p, skip_invalid=skip_invalid))
    return list(iter_jsonl(p, skip_invalid=skip_invalid))
