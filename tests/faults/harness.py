"""The fault-injection harness: table-driven cases run through the real command-line entry points.

Each :class:`FaultCase` names its input (files written by ``setup`` into a fresh directory), the command
(``python -m <module> <args>`` in a subprocess, as a user starts it), the expected exit code, a pattern the
last line of stderr must match (the one-line error) and the files that must be intact afterwards (their
bytes unchanged, or present and valid). Cases that kill a process and resume it use ``run`` instead of a
single command. ``python -m tests.faults`` prints the table of cases and what they cover; the tests in
``tests/faults/test_faults.py`` run every case.

Case modules (``tests/faults/cases_*.py``) each define ``CASES: list[FaultCase]``; :func:`all_cases` collects
them. Ids are ``<command>/<what>`` and unique.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from agentrm.paths import PROJECT_ROOT

Setup = Callable[[Path], None]


@dataclass
class Outcome:
    """What a case's command did: its exit code, stdout and stderr."""

    returncode: int
    stdout: str
    stderr: str

    @property
    def last_line(self) -> str:
        lines = self.stderr.strip().splitlines()
        return lines[-1] if lines else ""


@dataclass
class FaultCase:
    """One bad input or fault, and what must happen.

    Attributes:
        id: ``<command>/<what>`` (unique).
        covers: the failure it guards against, in a few words (shown in the summary).
        module: the command's module (``agentrm.fit``, ``agentrm.search``...).
        args: its arguments; ``{d}`` is replaced by the case's directory.
        setup: writes the inputs into the case's directory before the command runs.
        exit_code: the expected exit code (2: a one-line usage/data error; 0: recovered).
        message: regex that stderr's last line must match (``None``: not checked).
        intact: paths (relative to the case's directory) whose bytes must be the same after the command.
        check: further assertions on ``(directory, outcome)``.
        run: replaces the single command (kill-and-resume cases); returns the outcome to check.
        env: extra environment variables.
        timeout: seconds before the command is killed (a hang fails the case).
    """

    id: str
    covers: str
    module: str = ""
    args: list[str] = field(default_factory=list)
    setup: Setup | None = None
    exit_code: int = 2
    message: str | None = None
    intact: list[str] = field(default_factory=list)
    check: Callable[[Path, Outcome], None] | None = None
    run: Callable[[Path], Outcome] | None = None
    env: dict[str, str] = field(default_factory=dict)
    timeout: float = 300.0

    @property
    def command(self) -> str:
        return self.id.split("/", 1)[0]


def command_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment commands run in: offline, one thread, no traceback unless asked."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "AGENTRM_DEBUG": "", "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1", **(extra or {})}


def run_module(module: str, args: list[str], directory: Path, env: dict[str, str] | None = None,
               timeout: float = 300.0) -> Outcome:
    """``python -m module args`` from the project root (``{d}`` in args = ``directory``)."""
    argv = [a.replace("{d}", str(directory)) for a in args]
    proc = subprocess.run([sys.executable, "-m", module, *argv], cwd=PROJECT_ROOT, env=command_env(env),
                          capture_output=True, text=True, timeout=timeout)
    return Outcome(proc.returncode, proc.stdout, proc.stderr)


def snapshot(directory: Path, paths: list[str]) -> dict[str, bytes | None]:
    return {p: (directory / p).read_bytes() if (directory / p).is_file() else None for p in paths}


def execute(case: FaultCase, directory: Path) -> Outcome:
    """Run ``case`` in ``directory`` and assert everything it expects (raises ``AssertionError``)."""
    directory.mkdir(parents=True, exist_ok=True)
    if case.setup:
        case.setup(directory)
    before = snapshot(directory, case.intact)
    missing = [p for p, b in before.items() if b is None]
    assert not missing, f"{case.id}: setup did not create {missing}"
    out = case.run(directory) if case.run else run_module(case.module, case.args, directory, case.env, case.timeout)
    tail = out.stderr[-3000:]
    assert out.returncode == case.exit_code, f"{case.id}: exit {out.returncode}, expected {case.exit_code}\n{tail}"
    if case.message is not None:
        assert re.search(case.message, out.last_line), f"{case.id}: last stderr line {out.last_line!r} !~ {case.message!r}\n{tail}"
        if case.exit_code == 2:
            assert "Traceback" not in out.stderr, f"{case.id}: a traceback instead of one line\n{tail}"
    after = snapshot(directory, case.intact)
    changed = [p for p in case.intact if after[p] != before[p]]
    assert not changed, f"{case.id}: {changed} changed or vanished"
    if case.check:
        case.check(directory, out)
    return out


def all_cases() -> list[FaultCase]:
    """Every case of every ``tests/faults/cases_*.py`` module, ids checked unique."""
    cases: list[FaultCase] = []
    pkg = Path(__file__).parent
    for info in sorted(pkgutil.iter_modules([str(pkg)]), key=lambda m: m.name):
        if info.name.startswith("cases_"):
            cases.extend(importlib.import_module(f"tests.faults.{info.name}").CASES)
    ids = [c.id for c in cases]
    dup = {i for i in ids if ids.count(i) > 1}
    assert not dup, f"duplicate fault case ids: {sorted(dup)}"
    return cases


def summary_table(cases: list[FaultCase], results: dict[str, bool] | None = None) -> str:
    """Markdown: one row per case (command, id, expected exit, what it covers[, result]) and the totals."""
    head = "| command | case | exit | covers |" + (" result |" if results is not None else "")
    rule = "|---|---|---:|---|" + ("---|" if results is not None else "")
    rows = [head, rule]
    for c in cases:
        row = f"| {c.command} | `{c.id}` | {c.exit_code} | {c.covers} |"
        if results is not None:
            row += f" {'passed' if results.get(c.id) else 'FAILED' if c.id in results else 'not run'} |"
        rows.append(row)
    by_cmd: dict[str, int] = {}
    for c in cases:
        by_cmd[c.command] = by_cmd.get(c.command, 0) + 1
    total = f"\n{len(cases)} cases: " + ", ".join(f"{k} {v}" for k, v in sorted(by_cmd.items()))
    if results is not None:
        total += f"; {sum(results.values())} passed, {sum(not v for v in results.values())} failed"
    return "\n".join(rows) + total
