"""``python -m agentrm.collect``: trajectories with Monte-Carlo step values from any environment, resumable.

Example::

    python -m agentrm.collect --out data/mixed.jsonl \
        --envs '[babyai:GoToLocal?max_steps=24, sciworld:find-living-thing@train, textworld:cooking]' \
        --episodes 20 --error_rate 0.2 --rollouts 4 --siblings 1 --workers 2

Jobs (one main episode each, plus its sibling branches) are ordered round-robin over the
env specs (:mod:`agentrm.data.jobs`); every seed of a job derives from ``(seed, task,
episode index)`` alone, so the output does not depend on ``workers``, the backend or on
resuming.  The acting policy is each environment's own expert with ``error_rate``.

Records of a job are written as one block, main record first (its ``meta.branches``
says how many branch records follow), each line flushed.  Re-running the same command
resumes after the last complete block (a truncated line or a partial block from a
killed run is cut), so the final file equals an uninterrupted run's.

Beside the output, ``<out>.manifest.json`` (:mod:`agentrm.data.manifest`) says what the file holds per
task type (episodes, records, labelled states, success rate), how it was made (env specs, policy,
error rate, rollouts, siblings, seed) and what each run cost (wall and CPU seconds, the load average);
it is rewritten every few seconds while a run goes and updated, not replaced, by a resumed run.
"""

from __future__ import annotations

import functools
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agentrm.checks import ConfigError, at_least, fail, in_range
from agentrm.cli_config import parse_config
from agentrm.cli_errors import run_cli
from agentrm.data.jobs import Job, JobOptions
from agentrm.data.manifest import CountingPool, Manifest, RecordCounter
from agentrm.data.resumable import OutputOptions, run_resumable, scan_blocks
from agentrm.data.workers import WorkerOptions
from agentrm.envs.registry import check_specs, env_for
from agentrm.policies.expert import EnvExpertPolicy
from agentrm.targets.monte_carlo import run_episode


@dataclass(frozen=True)
class Settings:
    """Everything that determines the records (stored in each record's ``meta``)."""

    error_rate: float
    rollouts: int
    siblings: int
    seed: int


def run_job(job: Job, settings: Settings) -> list[str]:
    """Play one job; return its records as JSON lines (main record first)."""
    env_seed, policy_seed, branch_seed = job.seeds(settings.seed)
    env = env_for(job.spec)
    meta = {
        "env": str(job.spec),
        "seed": env_seed,
        "instance": env.instance_key(env_seed),
        "error_rate": settings.error_rate,
        "rollouts": settings.rollouts,
    }
    records = run_episode(
        env,
        EnvExpertPolicy(settings.error_rate, seed=policy_seed),
        env_seed,
        episode_id=job.episode_id(settings.seed),
        task=job.spec.name,
        rollouts=settings.rollouts,
        siblings=settings.siblings,
        branch_seed=branch_seed,
        meta=meta,
    )
    return [json.dumps(_rounded(r.to_dict()), ensure_ascii=False) for r in records]


def _rounded(rec: dict[str, Any], digits: int = 4) -> dict[str, Any]:
    """Round reward and step values (keeps the file small; MC estimates are coarse anyway)."""
    rec["reward"] = round(rec["reward"], digits)
    for s in rec["steps"]:
        if s.get("value") is not None:
            s["value"] = round(s["value"], digits)
    return rec


def scan_complete(path: str | os.PathLike, jobs: list[Job], settings: Settings) -> tuple[int, int]:
    """``(jobs_done, byte_offset)`` of the complete job blocks at the start of an existing output file.

    Raises:
        ValueError: if the file holds records of different jobs or settings.
    """
    return scan_blocks(path, len(jobs), functools.partial(_check_head, path, jobs, settings), _is_branch)


def _check_head(path: str | os.PathLike, jobs: list[Job], settings: Settings, rec: dict, index: int) -> int:
    meta = rec.get("meta", {})
    job = jobs[index]
    want = job.episode_id(settings.seed)
    got = {k: meta.get(k) for k in ("env", "error_rate", "rollouts")}
    expected = {"env": str(job.spec), "error_rate": settings.error_rate, "rollouts": settings.rollouts}
    if rec.get("id") != want or got != expected:
        raise ConfigError(
            f"out: {path} was written with other arguments (found {rec.get('id')!r} {got}, expected {want!r} "
            f"{expected}); pass --overwrite true or choose another --out"
        )
    return int(meta.get("branches", 0))


def _is_branch(rec: dict, head: dict) -> bool:
    meta = rec.get("meta", {})
    return meta.get("group") == head.get("id") and "branch_at" in meta


def summarize(path: str | os.PathLike) -> dict[str, Any]:
    """Episode count, success rate and mean steps of the main records; branch count; labelled states; file size."""
    total = RecordCounter.of_file(path).total
    n = total.episodes
    return {
        "episodes": n,
        "branch_records": total.branch_records,
        "labelled_states": total.labelled_states,
        "success_rate": total.successes / n if n else float("nan"),
        "mean_steps": total.main_steps / n if n else float("nan"),
        "bytes": Path(path).stat().st_size,
    }


POLICY = ("each environment's own expert (env.expert_policy) whose action is replaced, with probability error_rate, "
          "by another valid one; rollouts and sibling continuations use the same policy")
VALUE_TARGET = "Monte-Carlo: a step's value is the mean final reward of `rollouts` rollouts from the state after it"
SAME_FILE = ("command", "envs", "seed", "error_rate", "rollouts", "siblings")
"""Manifest settings whose equality means earlier runs wrote the same file (``episodes`` may grow)."""


@dataclass
class CollectConfig(OutputOptions, JobOptions, WorkerOptions):
    """``python -m agentrm.collect``: every field is a flag (``--envs``, ``--episodes``...) or a YAML key.

    Inherits the shared groups :class:`~agentrm.data.jobs.JobOptions` (``envs``, ``episodes``, ``seed``),
    :class:`~agentrm.data.resumable.OutputOptions` (``out``, ``overwrite``, ``limit``, ``progress``) and
    :class:`~agentrm.data.workers.WorkerOptions` (``workers``, ``backend``, ``ray_address``).

    Attributes:
        error_rate: probability that the expert's action is replaced by another valid one.
        rollouts: rollouts per Monte-Carlo value estimate; 0 skips the estimates (only the terminal step
            gets a value: cheap expert demonstrations for behaviour cloning).
        siblings: sibling branch records per main episode (needs ``rollouts >= 1``).
    """

    out: str = "data/trajectories.jsonl"
    envs: list[str] = field(default_factory=lambda: ["babyai:GoToRedBall"])
    episodes: int = 100
    error_rate: float = 0.3
    rollouts: int = 4
    siblings: int = 1

    def __post_init__(self) -> None:
        WorkerOptions.__post_init__(self)
        JobOptions.__post_init__(self)
        OutputOptions.__post_init__(self)
        in_range(self.error_rate, 0.0, 1.0, "error_rate")
        at_least(self.rollouts, 0, "rollouts")
        at_least(self.siblings, 0, "siblings")
        if self.siblings and not self.rollouts:
            fail("siblings", "sibling branches are valued by rollouts: set rollouts >= 1 or siblings 0")

    @property
    def settings(self) -> Settings:
        return Settings(self.error_rate, self.rollouts, self.siblings, self.seed)

    def manifest(self, jobs_total: int) -> Manifest:
        """The manifest of :attr:`out` for a run of this config (see :mod:`agentrm.data.manifest`)."""
        settings = {"command": "agentrm.collect", "envs": [str(s) for s in self.specs], "seed": self.seed,
                    "error_rate": self.error_rate, "rollouts": self.rollouts, "siblings": self.siblings,
                    "episodes_per_spec": self.episodes, "policy": POLICY,
                    "value_target": VALUE_TARGET if self.rollouts else "none (terminal step only: rollouts 0)"}
        run = {"episodes_per_spec": self.episodes, "limit": self.limit, "workers": self.workers,
               "backend": self.backend}
        fresh = self.overwrite or not Path(self.out).exists()
        return Manifest(self.out, "agentrm.collect", settings, run, jobs_total, fresh, SAME_FILE)


def collect(config: CollectConfig) -> dict[str, Any]:
    """Run each environment's noisy expert and write trajectories with Monte-Carlo step values as JSONL.

    Re-running the same config resumes after the last complete episode.

    Writes ``<out>.manifest.json`` beside the output (see :mod:`agentrm.data.manifest`).

    Returns:
        The summary of the whole file (see :func:`summarize`) plus ``seconds`` (wall, this run),
        ``cpu_seconds`` (this run, worker processes included) and ``manifest`` (its path).
    """
    check_specs(config.specs)
    jobs, path, settings = config.jobs(), Path(config.out), config.settings
    start = time.perf_counter()
    manifest = config.manifest(len(jobs))
    run_resumable(
        path, jobs, functools.partial(run_job, settings=settings), functools.partial(_check_head, path, jobs, settings),
        _is_branch, overwrite=config.overwrite, limit=config.limit, workers=CountingPool(config.pool(), manifest),
        progress=config.progress, desc="episodes", unit="ep",
    )
    written = manifest.write()
    summary = summarize(path)
    summary["seconds"] = time.perf_counter() - start
    summary["cpu_seconds"] = written["runs"][-1]["cpu_s"]
    summary["manifest"] = str(manifest.path)
    return summary


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command-line entry point (``python -m agentrm.collect --help``)."""
    summary = run_cli("agentrm.collect", lambda a: collect(parse_config(CollectConfig, a, "agentrm.collect")), argv)
    print(
        f"episodes {summary['episodes']} (+{summary['branch_records']} branch records), "
        f"labelled states {summary['labelled_states']}, "
        f"success rate {summary['success_rate']:.3f}, mean steps {summary['mean_steps']:.1f}, "
        f"file {summary['bytes'] / 1e6:.2f} MB, this run {summary['seconds']:.1f} s "
        f"({summary['cpu_seconds']:.1f} CPU s); manifest {summary['manifest']}"
    )
    return summary


if __name__ == "__main__":
    main()
