"""Resumable JSONL output made of job blocks (shared by the trajectory collector and the tree builder).

An output file is a sequence of *blocks*, one per job, in job order.  A block is a head
record (which says how many member records follow it) plus those members; every line is
flushed as it is written.  Resuming keeps the complete blocks at the start of the file,
cuts everything after them (a truncated line, garbage, or a partial block from a killed
run) and continues with the next job, so the final file equals an uninterrupted run's
as long as each job's output is a pure function of the job.
"""


import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from tqdm import tqdm

from agentrm.checks import ConfigError, at_least, fail
from agentrm.data.workers import WorkerPool, make_pool

J = TypeVar("J")

CheckHead = Callable[[dict[str, Any], int], int]
"""``check_head(record, job_index) -> members``: validate a head record against the job it
should belong to (raise ``ValueError`` naming the mismatch) and return how many member
records follow it."""

IsMember = Callable[[dict[str, Any], dict[str, Any]], bool]
"""``is_member(record, head) -> bool``: whether ``record`` belongs to ``head``'s block."""


def scan_blocks(
    path: str | os.PathLike, n_jobs: int, check_head: CheckHead, is_member: IsMember | None = None
) -> tuple[int, int]:
    """Find the complete job blocks at the start of an existing output file.

    Returns:
        ``(jobs_done, byte_offset)``: the number of complete blocks and where they end.

    Raises:
        ValueError: if the file holds records of other jobs or settings (from ``check_head``),
            more blocks than ``n_jobs``, or a member record of another block.
    """
    done, good_end, offset = 0, 0, 0
    expect, head = -1, None
    with open(path, "rb") as f:
        for raw in f:
            offset += len(raw)
            if not raw.endswith(b"\n"):
                break  # truncated last line
            try:
                rec = json.loads(raw)
            except json.JSONDecodeError:
                break  # garbage from an interrupted write: drop it and everything after
            if expect < 0:  # expecting a head record
                if done >= n_jobs:
                    raise ConfigError(f"out: {path} has more records than this run would write (pass --overwrite true "
                                      "or choose another --out)")
                expect, head = int(check_head(rec, done)), rec
            elif is_member is None or not is_member(rec, head):
                raise ConfigError(
                    f"out: {path}: record {rec.get('id')!r} does not belong to block {head.get('id')!r} (a file of "
                    "another command or run? pass --overwrite true or choose another --out)"
                )
            else:
                expect -= 1
            if expect == 0:
                done, good_end, expect = done + 1, offset, -1
    return done, good_end


def run_resumable(
    path: str | os.PathLike,
    jobs: Sequence[J],
    fn: Callable[[J], list[str]],
    check_head: CheckHead,
    is_member: IsMember | None = None,
    *,
    overwrite: bool = False,
    limit: int | None = None,
    workers: int | WorkerPool = 1,
    progress: bool = True,
    desc: str = "jobs",
    unit: str = "job",
) -> int:
    """Write the blocks of ``jobs`` to ``path`` (one JSON line per string ``fn(job)`` returns), resuming.

    Args:
        path: output JSONL file (parent folders are created).
        jobs: all jobs of the run, in output order.
        fn: job -> its block as JSON lines (head first); must be picklable for ``workers > 1``.
        check_head, is_member: see :func:`scan_blocks`.
        overwrite: start from scratch instead of resuming.
        limit: stop after this many new jobs (rerun to continue).
        workers: worker processes (local, spawned) or a :class:`~agentrm.data.workers.WorkerPool`.
        progress: show a tqdm bar.

    Returns:
        The number of jobs that were already complete before this call.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    done = 0
    if path.exists() and not overwrite:
        done, end = scan_blocks(path, len(jobs), check_head, is_member)
        with open(path, "r+b") as f:
            f.truncate(end)
    else:
        path.write_bytes(b"")
    todo = list(jobs[done:] if limit is None else jobs[done : done + limit])
    with open(path, "a", encoding="utf-8") as f:
        bar = tqdm(total=len(jobs), initial=done, desc=desc, unit=unit, disable=not progress)
        pool = make_pool(workers) if isinstance(workers, int) else workers
        for lines in pool.imap(fn, todo):
            for line in lines:
                f.write(line + "\n")
                f.flush()
            bar.update(1)
        bar.close()
    return done


@dataclass
class OutputOptions:
    """A resumable JSONL output (shared by ``agentrm.collect`` and ``agentrm.trees``).

    Attributes:
        out: the output JSONL file; re-running the same command resumes after its last complete block.
        overwrite: start from scratch instead of resuming.
        limit: stop after this many new jobs (rerun to continue); ``None``: all.
        progress: show a progress bar.
    """

    out: str = "data/out.jsonl"
    overwrite: bool = False
    limit: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.out:
            fail("out", "give the output file")
        at_least(self.limit, 1, "limit", allow_none=True)
