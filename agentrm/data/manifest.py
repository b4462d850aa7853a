"""The manifest beside a resumable trajectory file: what it holds per task type, how it was made, what it cost.

``<out>.manifest.json`` (written by ``python -m agentrm.collect`` next to every output)::

    {"out": "runs/x.jsonl", "settings": {"envs": [...], "error_rate": 0.3, "rollouts": 4, "policy": "...", ...},
     "jobs": {"total": 120, "done": 80, "complete": false},
     "totals": {"episodes": 80, "records": 160, "labelled_states": 1290, ...},
     "tasks": {"babyai/GoToLocal": {"specs": [...], "episodes": 40, "success_rate": 0.55, ...}, ...},
     "specs": {"babyai:GoToLocal?max_steps=24": {"episodes": 40, ...}, ...},
     "runs": [{"started": "...", "jobs_before": 0, "jobs_after": 80, "wall_s": 61.2, "cpu_s": 110.4,
               "load_avg_start": [...], "load_avg_end": [...], "workers": 2}, ...],
     "wall_s": 61.2, "cpu_s": 110.4}

Counts come from the records themselves (:class:`TaskCounts`); a resumed run recounts the complete
blocks the file already holds and appends its own entry to ``runs`` (the earlier entries are kept when
the settings that determine the records are the same; ``--overwrite`` starts the list anew).  The
manifest is rewritten atomically every few seconds while a run goes, so a killed run leaves its time
and progress behind.

*Labelled states* are distinct states with a value target: every valued step of a main record plus,
per sibling branch, its own valued step (a branch repeats its main record's prefix, values included;
those repeats are counted in ``labelled_steps``, which is what a trainer reads).

CPU time is the user + system time of this process and its descendants: the reaped ones through
``getrusage(RUSAGE_CHILDREN)``, the live ones (worker processes, the JVMs and game interpreters they
own) through psutil; the figure kept is the largest seen, since a descendant reaped by a process that
never waited for its own children can drop out of both counts.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import resource
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MANIFEST_SUFFIX = ".manifest.json"
WRITE_EVERY_S = 10.0


def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int = 2) -> None:
    """Write ``obj`` as JSON to ``path`` through a temporary file and a rename: a reader (or a kill) never sees
    half a file. The parent directory is created."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text(json.dumps(obj, indent=indent) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def manifest_path(out: str | os.PathLike) -> Path:
    """``<out>.manifest.json``."""
    return Path(f"{out}{MANIFEST_SUFFIX}")


@dataclass
class TaskCounts:
    """What the records of one task type (or of a whole file) hold.

    Attributes:
        episodes: main records (one per job).
        records: all records (main + branches).
        branch_records: sibling branch records.
        steps: distinct steps played (a branch's repeated prefix is not counted again).
        main_steps: steps of the main records.
        labelled_states: distinct states with a value target (see the module doc).
        labelled_steps: steps with a value target over all records (branch prefixes counted again).
        successes: successful main records.
        reward_sum: sum of the main records' final rewards.
        specs: the env specs the records came from (``meta.env``).
    """

    episodes: int = 0
    records: int = 0
    branch_records: int = 0
    steps: int = 0
    main_steps: int = 0
    labelled_states: int = 0
    labelled_steps: int = 0
    successes: int = 0
    reward_sum: float = 0.0
    specs: list[str] = field(default_factory=list)

    def add(self, rec: dict[str, Any]) -> None:
        """Count one record (a parsed JSON line of the trajectory schema)."""
        steps = rec.get("steps") or []
        meta = rec.get("meta") or {}
        valued = [s.get("value") is not None for s in steps]
        self.records += 1
        self.labelled_steps += sum(valued)
        env = meta.get("env")
        if env is not None and env not in self.specs:
            self.specs.append(env)
        if "branch_at" in meta:
            t = int(meta["branch_at"])
            self.branch_records += 1
            self.steps += len(steps) - t
            self.labelled_states += sum(valued[t:])
        else:
            self.episodes += 1
            self.steps += len(steps)
            self.main_steps += len(steps)
            self.labelled_states += sum(valued)
            self.successes += bool(rec.get("success"))
            self.reward_sum += float(rec.get("reward") or 0.0)

    def as_dict(self) -> dict[str, Any]:
        """The counts plus per-episode means (``success_rate``, ``mean_reward``, ``mean_steps``,
        ``labelled_states_per_episode``; ``None`` without an episode)."""
        out = asdict(self)
        out["reward_sum"] = round(self.reward_sum, 4)
        n = self.episodes
        out["success_rate"] = round(self.successes / n, 4) if n else None
        out["mean_reward"] = round(self.reward_sum / n, 4) if n else None
        out["mean_steps"] = round(self.main_steps / n, 2) if n else None
        out["labelled_states_per_episode"] = round(self.labelled_states / n, 2) if n else None
        return out


class RecordCounter:
    """Per-task-type, per-spec and total :class:`TaskCounts` over records."""

    def __init__(self) -> None:
        self.tasks: dict[str, TaskCounts] = {}
        self.specs: dict[str, TaskCounts] = {}
        self.total = TaskCounts()

    def add(self, rec: dict[str, Any]) -> None:
        self.tasks.setdefault(str(rec.get("task")), TaskCounts()).add(rec)
        self.specs.setdefault(str((rec.get("meta") or {}).get("env")), TaskCounts()).add(rec)
        self.total.add(rec)

    def add_lines(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.add(json.loads(line))

    @classmethod
    def of_file(cls, path: str | os.PathLike) -> RecordCounter:
        """Counts of every record in a JSONL file (complete lines only)."""
        counter = cls()
        if Path(path).exists():
            with open(path, encoding="utf-8") as f:
                for line in f:
                    if line.endswith("\n") and line.strip():
                        counter.add(json.loads(line))
        return counter


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its descendants, reaped and live (see the module doc)."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        r = resource.getrusage(who)
        total += r.ru_utime + r.ru_stime
    try:
        import psutil

        for p in psutil.Process().children(recursive=True):
            try:
                t = p.cpu_times()  # children_*: what this live process has reaped (e.g. a game generator)
                total += t.user + t.system + t.children_user + t.children_system
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                pass
    except ImportError:  # psutil is a dependency of lightning; without it only reaped children count
        pass
    return total


class RunClock:
    """Wall and CPU seconds since construction, and the load average at the start and now."""

    def __init__(self) -> None:
        self.wall0, self.cpu0, self.cpu_max = time.perf_counter(), cpu_seconds(), 0.0
        self.load0 = _load()
        self.started = _now()

    def snapshot(self) -> dict[str, Any]:
        self.cpu_max = max(self.cpu_max, cpu_seconds() - self.cpu0)
        return {"started": self.started, "wall_s": round(time.perf_counter() - self.wall0, 2),
                "cpu_s": round(self.cpu_max, 2), "load_avg_start": self.load0, "load_avg_end": _load()}


def _load() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class Manifest:
    """The manifest of one output file, kept up to date while a run writes it.

    Args:
        out: the output JSONL file (the manifest is ``<out>.manifest.json``).
        command: the command that writes the file (``agentrm.collect``).
        settings: everything that determines the records (compared with the previous manifest's
            ``settings`` to decide whether its ``runs`` belong to this file) plus descriptive fields.
        run_info: fields recorded with this run only (``workers``, ``episodes``, ``limit``...).
        jobs_total: the jobs of the whole run (for ``complete``).
        fresh: the file was started anew (``--overwrite``): earlier runs are dropped.
        same_file_keys: the keys of ``settings`` whose equality means the earlier runs wrote this file.
    """

    def __init__(self, out: str | os.PathLike, command: str, settings: dict[str, Any], run_info: dict[str, Any],
                 jobs_total: int, fresh: bool, same_file_keys: Sequence[str]):
        self.out, self.path = Path(out), manifest_path(out)
        self.command, self.settings, self.run_info, self.jobs_total = command, settings, run_info, jobs_total
        self.previous_runs: list[dict[str, Any]] = []
        if not fresh and self.path.exists():
            try:
                old = json.loads(self.path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                old = {}
            old_settings = old.get("settings") or {}
            if all(old_settings.get(k) == settings.get(k) for k in same_file_keys):
                self.previous_runs = list(old.get("runs") or [])
        self.counter = RecordCounter()
        self.jobs_before = 0
        self.clock: RunClock | None = None
        self._last_write = 0.0

    def begin(self) -> None:
        """Count what the file holds now (complete blocks only: call it after the resumable writer cut the
        file) and start this run's clock."""
        self.counter = RecordCounter.of_file(self.out)
        self.jobs_before = self.counter.total.episodes
        self.clock = RunClock()
        self.write()

    def add(self, lines: Iterable[str]) -> None:
        """Count one job's records (already written); rewrite the manifest every :data:`WRITE_EVERY_S`."""
        self.counter.add_lines(lines)
        if time.perf_counter() - self._last_write >= WRITE_EVERY_S:
            self.write()

    def to_dict(self) -> dict[str, Any]:
        run = {**(self.clock.snapshot() if self.clock else {}), "jobs_before": self.jobs_before,
               "jobs_after": self.counter.total.episodes, **self.run_info}
        runs = [*self.previous_runs, run]
        done = self.counter.total.episodes
        return {
            "command": self.command,
            "out": str(self.out),
            "updated": _now(),
            "settings": self.settings,
            "jobs": {"total": self.jobs_total, "done": done, "complete": done >= self.jobs_total},
            "totals": {**self.counter.total.as_dict(), "task_types": len(self.counter.tasks)},
            "tasks": {k: v.as_dict() for k, v in sorted(self.counter.tasks.items())},
            "specs": {k: {n: x for n, x in v.as_dict().items() if n != "specs"}
                      for k, v in sorted(self.counter.specs.items())},
            "runs": runs,
            "wall_s": round(sum(r.get("wall_s", 0.0) for r in runs), 2),
            "cpu_s": round(sum(r.get("cpu_s", 0.0) for r in runs), 2),
        }

    def write(self) -> dict[str, Any]:
        """Write the manifest atomically; return what was written."""
        data = self.to_dict()
        write_json_atomic(self.path, data, indent=1)
        self._last_write = time.perf_counter()
        return data


class CountingPool:
    """A worker pool wrapper that tells a :class:`Manifest` about each job's records once they are written.

    :func:`agentrm.data.resumable.run_resumable` calls ``imap`` after it has cut the file to its complete
    blocks (so :meth:`Manifest.begin` counts exactly those) and writes each yielded block before asking
    for the next one (so a block is counted after it is in the file).
    """

    def __init__(self, pool: Any, manifest: Manifest):
        self.pool, self.manifest = pool, manifest
        self.workers = pool.workers

    def imap(self, fn: Any, jobs: Sequence[Any]) -> Iterator[Any]:
        self.manifest.begin()
        for lines in self.pool.imap(fn, jobs):
            yield lines
            self.manifest.add(lines)


# ------------------------------------------------------------------------------------- summary
def summary_table(paths: Sequence[str | os.PathLike]) -> str:
    """A markdown table of manifests: one row per task type of each file, a total row per file and overall."""
    head = ("| file | task type | episodes | records | labelled states | success rate | mean steps |\n"
            "|---|---|---:|---:|---:|---:|---:|")
    rows, states, wall, cpu = [head], 0, 0.0, 0.0

    def row(name: str, task: str, c: dict[str, Any]) -> str:
        rate = "" if c.get("success_rate") is None else f"{c['success_rate']:.3f}"
        steps = "" if c.get("mean_steps") is None else f"{c['mean_steps']:.1f}"
        return f"| {name} | {task} | {c['episodes']} | {c['records']} | {c['labelled_states']} | {rate} | {steps} |"

    notes = []
    for path in paths:
        m = json.loads(Path(path).read_text(encoding="utf-8"))
        name = Path(m["out"]).name
        for task, counts in m["tasks"].items():
            rows.append(row(name, task, counts))
        rows.append(row(name, f"**all {m['totals']['task_types']}**", m["totals"]))
        s = m["settings"]
        loads = [r.get("load_avg_start", [None])[0] for r in m["runs"]] + [r.get("load_avg_end", [None])[0] for r in
                                                                             m["runs"]]
        loads = [x for x in loads if x is not None]
        notes.append(f"- {name}: error_rate {s['error_rate']}, rollouts {s['rollouts']}, siblings {s['siblings']}, "
                     f"seed {s['seed']}, {s['episodes_per_spec']} episodes per spec; jobs {m['jobs']['done']}/"
                     f"{m['jobs']['total']}; {len(m['runs'])} run(s): wall {m['wall_s'] / 60:.1f} min, CPU "
                     f"{m['cpu_s'] / 60:.1f} min" + (f", 1-min load average {min(loads):.1f}-{max(loads):.1f}"
                                                     if loads else ""))
        states, wall, cpu = states + m["totals"]["labelled_states"], wall + m["wall_s"], cpu + m["cpu_s"]
    notes.append(f"- total: {states} labelled states; wall {wall / 60:.1f} min, CPU {cpu / 60:.1f} min "
                 f"(CPU / 2 cores = {cpu / 120:.1f} min)")
    return "\n".join([*rows, "", *notes])


def main(argv: Sequence[str] | None = None) -> str:
    """``python -m agentrm.data.manifest A.jsonl.manifest.json ...``: print :func:`summary_table`."""
    import argparse

    parser = argparse.ArgumentParser(prog="agentrm.data.manifest", description=main.__doc__)
    parser.add_argument("manifests", nargs="+", help="manifest files (<out>.manifest.json) or the outputs they describe")
    args = parser.parse_args(argv)
    paths = [p if str(p).endswith(MANIFEST_SUFFIX) else manifest_path(p) for p in args.manifests]
    missing = [str(p) for p in paths if not Path(p).exists()]
    if missing:
        parser.error(f"no manifest at {', '.join(missing)}")
    table = summary_table(paths)
    print(table)
    return table


if __name__ == "__main__":
    main()
