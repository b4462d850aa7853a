"""Collect BabyAI trajectories with Monte-Carlo step values into a resumable JSONL file.

Jobs (one main episode each, plus its sibling branches) are ordered round-robin over
the levels: job ``j`` plays level ``levels[j % L]``, episode ``j // L``.  Every seed of
a job (environment, policy sampling, branch points) is derived from ``(seed, level,
episode index)`` alone, so the output does not depend on ``workers`` or on resuming.

Records of a job are written as one block, main record first (its ``meta.branches``
says how many branch records follow), each line flushed.  Resuming keeps the complete
blocks at the start of the file, cuts everything after them (a truncated line or a
partial block from a killed run) and continues with the next job, so the final file
equals an uninterrupted run's.
"""

from __future__ import annotations

import functools
import json
import os
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agentrm.data.resumable import run_resumable, scan_blocks
from agentrm.envs.babyai import BabyAITextEnv, check_levels
from agentrm.policies.scripted import ScriptedBabyAIPolicy
from agentrm.targets.monte_carlo import run_episode


@dataclass(frozen=True)
class Settings:
    """Everything that determines the records (stored in each record's ``meta``)."""

    error_rate: float
    rollouts: int
    siblings: int
    max_steps: int | None
    seed: int


@dataclass(frozen=True)
class Job:
    """One main episode."""

    level: str
    index: int

    def seeds(self, base: int) -> tuple[int, int, int]:
        """``(env_seed, policy_seed, branch_seed)``, a pure function of (base seed, level, index)."""
        ss = np.random.SeedSequence([base, zlib.crc32(self.level.encode()), self.index])
        return tuple(int(x) for x in ss.generate_state(3))  # type: ignore[return-value]

    def episode_id(self, base: int) -> str:
        return f"{self.level}-s{base}-{self.index:05d}"


def plan_jobs(levels: list[str], episodes: int) -> list[Job]:
    """All jobs in output order (round-robin over levels)."""
    return [Job(levels[j % len(levels)], j // len(levels)) for j in range(episodes * len(levels))]


_ENVS: dict[tuple[str, int | None], BabyAITextEnv] = {}


def run_job(job: Job, settings: Settings) -> list[str]:
    """Play one job; return its records as JSON lines (main record first)."""
    key = (job.level, settings.max_steps)
    if key not in _ENVS:
        _ENVS[key] = BabyAITextEnv(job.level, max_steps=settings.max_steps)
    env_seed, policy_seed, branch_seed = job.seeds(settings.seed)
    meta = {
        "level": job.level,
        "seed": env_seed,
        "error_rate": settings.error_rate,
        "rollouts": settings.rollouts,
        "max_steps": settings.max_steps,
    }
    records = run_episode(
        _ENVS[key],
        ScriptedBabyAIPolicy(settings.error_rate, seed=policy_seed),
        env_seed,
        episode_id=job.episode_id(settings.seed),
        task=f"babyai/{job.level}",
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
    """Find the complete job blocks at the start of an existing output file.

    Returns:
        ``(jobs_done, byte_offset)``: the number of complete blocks and where they end.

    Raises:
        ValueError: if the file holds records of different jobs or settings.
    """
    return scan_blocks(path, len(jobs), functools.partial(_check_head, path, jobs, settings), _is_branch)


def _check_head(path: str | os.PathLike, jobs: list[Job], settings: Settings, rec: dict, index: int) -> int:
    _check_main(path, rec, jobs[index], settings)
    return int(rec.get("meta", {}).get("branches", 0))


def _is_branch(rec: dict, head: dict) -> bool:
    meta = rec.get("meta", {})
    return meta.get("group") == head.get("id") and "branch_at" in meta


def _check_main(path: str | os.PathLike, rec: dict, job: Job, settings: Settings) -> None:
    meta = rec.get("meta", {})
    want = job.episode_id(settings.seed)
    got = {k: meta.get(k) for k in ("error_rate", "rollouts", "max_steps")}
    expected = {
        "error_rate": settings.error_rate,
        "rollouts": settings.rollouts,
        "max_steps": settings.max_steps,
    }
    if rec.get("id") != want or got != expected:
        raise ValueError(
            f"{path} was written with other arguments (found {rec.get('id')!r} {got}, expected {want!r} "
            f"{expected}); pass --overwrite true or choose another --out"
        )


def summarize(path: str | os.PathLike) -> dict[str, Any]:
    """Episode count, success rate and mean steps of the main records; branch count; file size."""
    mains, branches = [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            if "branch_at" in rec.get("meta", {}):
                branches += 1
            else:
                mains.append(rec)
    n = len(mains)
    return {
        "episodes": n,
        "branch_records": branches,
        "success_rate": sum(r["success"] for r in mains) / n if n else float("nan"),
        "mean_steps": sum(len(r["steps"]) for r in mains) / n if n else float("nan"),
        "bytes": Path(path).stat().st_size,
    }


def collect(
    out: str = "data/babyai.jsonl",
    levels: list[str] | None = None,
    episodes: int = 100,
    error_rate: float = 0.3,
    rollouts: int = 4,
    siblings: int = 1,
    max_steps: int | None = None,
    seed: int = 0,
    workers: int = 1,
    overwrite: bool = False,
    limit: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run a noisy BabyAI expert and write trajectories with Monte-Carlo step values as JSONL.

    Re-running the same command resumes after the last complete episode.

    Args:
        out: output JSONL path.
        levels: BabyAI level names (e.g. GoToRedBall GoToLocal PickupLoc); default [GoToRedBall].
        episodes: main episodes per level.
        error_rate: probability that the expert's action is replaced by another one.
        rollouts: rollouts per Monte-Carlo value estimate; 0 skips the estimates (only the
            terminal step gets a value: cheap expert demonstrations for behaviour cloning).
        siblings: sibling branch records per main episode.
        max_steps: step limit per episode (None: minigrid's default, 64 for one room).
        seed: base seed; every episode's seeds derive from (seed, level, episode index).
        workers: worker processes (1: run in this process).
        overwrite: start from scratch instead of resuming.
        limit: stop after this many new episodes (for testing; rerun to continue).
        progress: show a progress bar.

    Returns:
        The summary of the whole file (see :func:`summarize`) plus ``seconds``.
    """
    levels = list(levels or ["GoToRedBall"])
    check_levels(levels)
    if rollouts < 0 or episodes < 0 or siblings < 0 or (siblings and not rollouts):
        raise ValueError("need rollouts >= 0, episodes >= 0, siblings >= 0 (and rollouts >= 1 for siblings)")
    settings = Settings(error_rate, rollouts, siblings, max_steps, seed)
    jobs = plan_jobs(levels, episodes)
    path = Path(out)
    start = time.perf_counter()
    run_resumable(
        path,
        jobs,
        functools.partial(run_job, settings=settings),
        functools.partial(_check_head, path, jobs, settings),
        _is_branch,
        overwrite=overwrite,
        limit=limit,
        workers=workers,
        progress=progress,
        desc="episodes",
        unit="ep",
    )
    summary = summarize(path)
    summary["seconds"] = time.perf_counter() - start
    return summary


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command-line entry point (``python -m agentrm.collect --help``)."""
    from jsonargparse import auto_cli

    summary = auto_cli(collect, args=argv)
    print(
        f"episodes {summary['episodes']} (+{summary['branch_records']} branch records), "
        f"success rate {summary['success_rate']:.3f}, mean steps {summary['mean_steps']:.1f}, "
        f"file {summary['bytes'] / 1e6:.2f} MB, this run {summary['seconds']:.1f} s"
    )
    return summary
