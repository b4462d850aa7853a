"""One fit at a time per directory: ``<dir>.lock`` beside each directory a run writes.

A lock file holds the owner's pid, host and start time (JSON). It is created atomically (written under
a temporary name, then hard-linked to its final name, which fails if the name exists; ``O_EXCL``
where hard links are not supported), so a second fit sees either no lock or a complete one. A lock
whose pid is no longer running on this host (a fit killed with ``kill -9``) is stale: it is taken over
with a note. A lock held by a live process, or by another host, refuses the run with one line.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

from agentrm.cli_errors import BuildError


class RunLocked(BuildError):
    """Another fit is writing into the same directory; the message names it, the lock file and the ways out."""


def lock_path(directory: Path) -> Path:
    """``<parent>/<name>.lock``: beside the directory, so it survives the directory being swapped."""
    return directory.parent / f"{directory.name}.lock"


def pid_running(pid: int) -> bool:
    """Whether ``pid`` is a live process on this host (a zombie, killed but not yet reaped, is not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True
    return "\nState:\tZ" not in status


class RunLock:
    """Lock every directory of ``directories`` for this process (``with RunLock(dirs): ...``).

    Args:
        directories: what the run writes (checkpoint directories, export directories).
        note: where notes go (a stale lock taken over).
    """

    def __init__(self, directories: list[Path], note=lambda s: print(s, file=sys.stderr)):
        self.paths = sorted({lock_path(Path(d).resolve()) for d in directories})
        self.note = note
        self.held: list[Path] = []
        self.record = {"pid": os.getpid(), "host": socket.gethostname(),
                       "started": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv}

    def __enter__(self) -> RunLock:
        try:
            for p in self.paths:
                self._acquire(p)
        except BaseException:
            self.release()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def release(self) -> None:
        """Remove the lock files this process holds (only those still naming it)."""
        for p in self.held:
            if self._owner(p).get("pid") == self.record["pid"]:
                p.unlink(missing_ok=True)
        self.held = []

    def _acquire(self, path: Path) -> None:
        for _ in range(2):
            if self._create(path):
                self.held.append(path)
                return
            owner = self._owner(path)
            pid, host = owner.get("pid"), owner.get("host")
            if host == self.record["host"] and isinstance(pid, int) and pid_running(pid):
                raise RunLocked(
                    f"{path.with_suffix('')} is in use by another fit (pid {pid} on {host}, since "
                    f"{owner.get('started', '?')}; lock {path}): wait for it to finish or write this run elsewhere "
                    f"(trainer.default_root_dir and the callbacks' dirpath)")
            if owner and host != self.record["host"]:
                raise RunLocked(
                    f"{path.with_suffix('')} is in use by a fit on host {host} (pid {pid}, since "
                    f"{owner.get('started', '?')}); if no fit runs there any more, delete {path}")
            what = f"pid {pid} is no longer running" if owner else "unreadable"
            self.note(f"agentrm.fit: taking over the stale lock {path} ({what}: a fit that was killed)")
            path.unlink(missing_ok=True)
        raise RunLocked(f"{path} was taken by another fit while a stale lock was replaced; try again")

    def _create(self, path: Path) -> bool:
        """Create ``path`` holding this process's record, atomically; ``False`` if it exists."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.{os.getpid()}"
        tmp.write_text(json.dumps(self.record))
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        except OSError:  # no hard links here: exclusive create (a reader may see it empty for an instant)
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(self.record))
            return True
        finally:
            tmp.unlink(missing_ok=True)

    @staticmethod
    def _owner(path: Path) -> dict:
        try:
            owner = json.loads(path.read_text())
            return owner if isinstance(owner, dict) else {}
        except (OSError, ValueError):
            return {}
