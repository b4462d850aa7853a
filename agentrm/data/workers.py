"""Worker pools that run jobs in processes that own their environments: local processes or Ray.

Environments that hold a JVM (ScienceWorld) or a game interpreter (TextWorld) are not
fork-safe once started, so local workers are *spawned* fresh; each worker builds and
caches the environments it needs (module-level caches of the job function), and nothing
environment-related crosses a process boundary except the job and its JSON lines.

Both backends implement :class:`WorkerPool`: ``imap(fn, jobs)`` yields ``fn(job)`` in job
order while later jobs run, so a resumable writer can flush each result as it arrives
and a killed run keeps what it wrote.

* ``local``: a :class:`concurrent.futures.ProcessPoolExecutor` with the ``spawn`` start
  method and at most ``8 * workers`` jobs in flight (results are written in job order, so a
  wide window keeps the workers busy behind a slow job; a killed run recomputes what was
  finished but not yet written).
* ``ray``: Ray tasks (``pip install 'agentrm[ray]'``) on an existing cluster
  (``address="auto"``) or a local one started here; the user who outgrows one machine
  points ``address`` at a cluster and changes nothing else.
"""


import multiprocessing as mp
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeVar

from agentrm.checks import at_least, fail, one_of

J = TypeVar("J")

Backend = Literal["local", "ray"]


class WorkerPool(Protocol):
    """Runs a job function over jobs, results in job order."""

    workers: int

    def imap(self, fn: Callable[[J], Any], jobs: Sequence[J]) -> Iterator[Any]: ...


class InlinePool:
    """No workers: ``map`` in this process (the default for ``workers=1``)."""

    workers = 1

    def imap(self, fn: Callable[[J], Any], jobs: Sequence[J]) -> Iterator[Any]:
        yield from map(fn, jobs)


def _die_with_parent() -> None:
    """Worker initializer: on Linux, ask the kernel to SIGTERM this worker when its parent dies, so a
    killed run leaves no worker (and no JVM or game interpreter it owns) behind."""
    import ctypes
    import signal
    import sys

    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
        except OSError:
            pass


class LocalProcessPool:
    """``workers`` spawned processes; up to ``8 * workers`` jobs in flight, results in order."""

    def __init__(self, workers: int, start_method: str = "spawn"):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.workers = workers
        self.window = 8 * workers
        self.start_method = start_method

    def imap(self, fn: Callable[[J], Any], jobs: Sequence[J]) -> Iterator[Any]:
        ctx = mp.get_context(self.start_method)
        with ProcessPoolExecutor(self.workers, mp_context=ctx, initializer=_die_with_parent) as pool:
            pending: deque[Future] = deque()
            it = iter(jobs)
            try:
                for job in it:
                    pending.append(pool.submit(fn, job))
                    if len(pending) >= self.window:
                        yield pending.popleft().result()
                while pending:
                    yield pending.popleft().result()
            finally:
                for f in pending:
                    f.cancel()


class RayPool:
    """Ray tasks, up to ``8 * workers`` in flight, results in job order.

    Args:
        workers: tasks in flight (each task takes one CPU).
        address: a running cluster (``"auto"`` or ``ray://host:10001``); None starts a local Ray.
    """

    def __init__(self, workers: int, address: str | None = None):
        try:
            import ray
        except ImportError as e:
            raise ImportError("the ray worker backend needs Ray: pip install 'agentrm[ray]'") from e
        self.ray = ray
        self.workers = workers
        self.window = 8 * workers
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"address": address, "include_dashboard": False, "log_to_driver": False}
            if address is None:
                kwargs["num_cpus"] = workers
            ray.init(**kwargs)

    def imap(self, fn: Callable[[J], Any], jobs: Sequence[J]) -> Iterator[Any]:
        remote = self.ray.remote(num_cpus=1)(_call)
        pending: deque = deque()
        for job in jobs:
            pending.append(remote.remote(fn, job))
            if len(pending) >= self.window:
                yield self.ray.get(pending.popleft())
        while pending:
            yield self.ray.get(pending.popleft())


def _call(fn: Callable[[J], Any], job: J) -> Any:
    return fn(job)


def make_pool(workers: int = 1, backend: Backend = "local", address: str | None = None) -> WorkerPool:
    """The pool for ``workers`` and ``backend`` (``workers=1`` with ``local`` runs inline)."""
    if backend == "ray":
        return RayPool(workers, address=address)
    if backend != "local":
        raise ValueError(f"unknown worker backend {backend!r}; use 'local' or 'ray'")
    return InlinePool() if workers <= 1 else LocalProcessPool(workers)


@dataclass
class WorkerOptions:
    """Where jobs run (shared by ``agentrm.collect`` and ``agentrm.trees``).

    Attributes:
        workers: worker processes (1: in this process).
        backend: ``local`` (spawned processes on this machine) or ``ray`` (a Ray cluster at ``ray_address``,
            or a local Ray when it is ``None``).
        ray_address: the Ray cluster's address (``backend: ray`` only).
    """

    workers: int = 1
    backend: Backend = "local"
    ray_address: str | None = None

    def __post_init__(self) -> None:
        at_least(self.workers, 1, "workers")
        one_of(self.backend, ("local", "ray"), "backend")
        if self.ray_address and self.backend != "ray":
            fail("ray_address", f"applies to backend 'ray', but backend is {self.backend!r}")

    def pool(self) -> WorkerPool:
        return make_pool(self.workers, self.backend, self.ray_address)
