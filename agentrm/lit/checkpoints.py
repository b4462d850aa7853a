"""Checkpoints a run can be resumed from: always current, written atomically, checked before use.

* :class:`ResumableCheckpoint` is Lightning's ``ModelCheckpoint`` with three changes: ``last.ckpt`` is
  written at the end of every epoch (and at every validation) whatever the monitored top-k did (plain
  ``ModelCheckpoint`` rewrites it only when a top-k file is saved, so it goes stale after an epoch
  that does not improve); every file is written to a hidden ``.<name>.partial`` beside it and renamed
  into place (a kill mid-write leaves the previous file whole); an interrupt (Ctrl-C, SIGTERM) saves
  ``last.ckpt`` before the process ends.
* :func:`inspect_checkpoint` opens a checkpoint (memory-mapped: cheap for large files) and reads its
  epoch, step and run id, or says why it cannot be used (empty, truncated, not a checkpoint).
* :func:`newest_valid_checkpoint` picks the newest checkpoint of a run's checkpoint directories that
  opens, naming each newer one it skipped.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from weakref import proxy

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

PARTIAL = ".partial"
RUN_KEY = "agentrm"  # top-level key of a checkpoint: {"run_id": ..., "saved_on": "validation"|"epoch_end"|"interrupt"|...}


def partial_path(path: str | os.PathLike) -> Path:
    """Where ``path`` is written before it is renamed into place: ``<dir>/.<name>.partial``."""
    p = Path(path)
    return p.parent / f".{p.name}{PARTIAL}"


def replace_path(src: Path, dst: Path) -> None:
    """Move ``src`` (a file or a directory) to ``dst``, replacing what is there.

    A file replaces a file atomically (``os.replace``). A directory (a sharded checkpoint, an export) is
    swapped in two renames through ``.<name>.old``: at every moment ``dst`` is either the old
    directory, absent, or the new one, never a mix.
    """
    if src.is_dir() and dst.is_dir():
        old = dst.parent / f".{dst.name}.old"
        if old.exists():
            shutil.rmtree(old)
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old)
    else:
        os.replace(src, dst)


def remove_path(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    elif p.exists() or p.is_symlink():
        p.unlink()


class ResumableCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``last.ckpt`` is always the newest state, written atomically.

    Takes every ``ModelCheckpoint`` argument. ``save_last`` is always on (``"link"`` is read as ``True``:
    ``last.ckpt`` is a file of its own, so it cannot point at a stale top-k file). Top-k files are
    written atomically too. ``python -m agentrm.fit`` uses this class for every ``ModelCheckpoint``
    its config names (and adds one when there is none).

    Args:
        writes_last: ``False`` for a second checkpoint callback in the directory of another (two selection rules
            of one run, each keeping its best epoch): the first one's ``last.ckpt`` already holds the newest state,
            and a copy would be written as ``last-v1.ckpt`` (``python -m agentrm.fit`` sets it).
    """

    def __init__(self, *args: Any, writes_last: bool = True, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.save_last = writes_last
        self._last_saved_step: int | None = None
        self._saving: str = "validation"
        self.written: dict[str, tuple[int, int]] = {}  # path -> (epoch, global step) of the files this run wrote

    # -- when -------------------------------------------------------------------------------------------
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._saving = "epoch_end"
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._keep_last_current(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._saving = "validation"
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._keep_last_current(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """Ctrl-C or SIGTERM: save ``last.ckpt`` (the state after the last finished batch) before the process ends."""
        interrupted = isinstance(exception, SIGTERMException) or (
            isinstance(exception, KeyboardInterrupt) and trainer.world_size == 1)  # Ctrl-C may reach one rank only
        if not interrupted:
            return super().on_exception(trainer, pl_module, exception)
        if not self.save_last:  # another callback in this directory keeps last.ckpt
            return None
        if trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking or trainer.global_step == 0:
            return None
        if self._last_saved_step == trainer.global_step:
            return None
        self._saving = "interrupt"
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        if trainer.is_global_zero:
            print(f"agentrm.fit: {type(exception).__name__}: saved {self.last_model_path} (epoch {trainer.current_epoch}, "
                  f"global step {trainer.global_step}, mid-epoch); resume with --ckpt_path last", file=sys.stderr)
        return None

    def _keep_last_current(self, trainer: L.Trainer) -> None:
        if (not self.save_last or trainer.fast_dev_run or trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking
                or self._last_saved_step == trainer.global_step):
            return
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def _save_last_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict[str, torch.Tensor]) -> None:
        super()._save_last_checkpoint(trainer, monitor_candidates)
        self._last_saved_step = trainer.global_step

    # -- how --------------------------------------------------------------------------------------------
    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        """``trainer.save_checkpoint`` into ``.<name>.partial``, then rename it over ``filepath`` (rank 0)."""
        tmp = partial_path(filepath)
        if trainer.is_global_zero and (tmp.exists() or tmp.is_symlink()):
            remove_path(tmp)
        trainer.strategy.barrier("agentrm.checkpoint.partial")
        trainer.save_checkpoint(str(tmp), self.save_weights_only)  # ends with a barrier: every shard is written
        if trainer.is_global_zero:
            replace_path(tmp, Path(filepath))
        trainer.strategy.barrier("agentrm.checkpoint.replace")
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        self.written[str(filepath)] = (trainer.current_epoch, trainer.global_step)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint.setdefault(RUN_KEY, {})["saved_on"] = self._saving


@dataclass
class CheckpointInfo:
    """What a checkpoint holds: where it is, its epoch and global step, the run that wrote it and why."""

    path: Path
    epoch: int
    global_step: int
    run_id: str | None = None
    saved_on: str | None = None

    def describe(self) -> str:
        when = ", saved mid-epoch on an interrupt" if self.saved_on == "interrupt" else ""
        return f"{self.path} (epoch {self.epoch}, global step {self.global_step}{when})"


class InvalidCheckpoint(ValueError):
    """A checkpoint file that cannot be resumed from; the message says why in a few words."""


def inspect_checkpoint(path: str | os.PathLike) -> CheckpointInfo:
    """Open ``path`` (memory-mapped, on CPU) and read its progress; a directory is a sharded checkpoint.

    Raises:
        InvalidCheckpoint: empty, truncated or not a Lightning checkpoint.
    """
    p = Path(path)
    if p.is_dir():  # FSDP (meta.pt) or DeepSpeed (checkpoint/*model_states.pt): read the part with the loop state
        metas = [p / "meta.pt", *sorted((p / "checkpoint").glob("*model_states.pt"))]
        target = next((m for m in metas if m.is_file()), None)
        if target is None:
            raise InvalidCheckpoint("a directory without meta.pt or checkpoint/*model_states.pt")
        info = inspect_checkpoint(target)
        info.path = p
        return info
    try:
        size = p.stat().st_size
    except OSError as e:
        raise InvalidCheckpoint(f"cannot read it ({e.strerror})") from None
    if size == 0:
        raise InvalidCheckpoint("empty file (0 bytes)")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:  # truncated zip, not a torch file, a pickle that does not load
        msg = " ".join(str(e).split()).split(". ")[0][:100]
        raise InvalidCheckpoint(f"does not load ({type(e).__name__}: {msg}; truncated by a kill?)") from None
    if not isinstance(ckpt, dict) or "global_step" not in ckpt or "epoch" not in ckpt:
        raise InvalidCheckpoint("not a Lightning checkpoint (no epoch/global_step)")
    meta = ckpt.get(RUN_KEY) or {}
    run_id = meta.get("run_id") or next(
        (s.get("run_id") for k, s in (ckpt.get("callbacks") or {}).items() if "ExportHF" in str(k) and isinstance(s, dict)),
        None)
    return CheckpointInfo(p, int(ckpt["epoch"]), int(ckpt["global_step"]), run_id, meta.get("saved_on"))


def checkpoint_candidates(dirs: list[Path]) -> list[Path]:
    """The ``*.ckpt`` files (or sharded directories) of ``dirs``, newest first (``last*.ckpt`` first on a tie)."""
    found = {c for d in dirs if d.is_dir() for c in d.glob("*.ckpt") if not c.name.startswith(".")}
    return sorted(found, key=lambda c: (c.stat().st_mtime, c.name.startswith("last")), reverse=True)


def newest_valid_checkpoint(dirs: list[Path]) -> tuple[CheckpointInfo | None, list[tuple[Path, str]]]:
    """The newest checkpoint in ``dirs`` that opens, and the newer ones skipped (``(path, why)``)."""
    skipped: list[tuple[Path, str]] = []
    for cand in checkpoint_candidates(dirs):
        try:
            return inspect_checkpoint(cand), skipped
        except InvalidCheckpoint as e:
            skipped.append((cand, str(e)))
    return None, skipped


def stale_partials(dirs: list[Path]) -> list[Path]:
    """``.<name>.partial`` files a killed write left in ``dirs``."""
    return sorted(p for d in dirs if d.is_dir() for p in d.glob(f".*{PARTIAL}"))


def finish_swap(target: Path) -> str | None:
    """After a kill between the two renames of :func:`replace_path`: put ``.<name>.old`` back when
    ``target`` is missing, else remove it. Returns what was done (``None``: nothing was left)."""
    old = target.parent / f".{target.name}.old"
    if not old.exists():
        return None
    if target.exists():
        remove_path(old)
        return f"removed {old}, left by an interrupted swap"
    os.replace(old, target)
    return f"restored {target} from {old}: a swap was killed half-way"


def swapped_in(dirs: list[Path]) -> list[Path]:
    """The targets whose ``.<name>.old`` a killed swap left in ``dirs`` (sharded checkpoint directories)."""
    return sorted(d / p.name[1:-len(".old")] for d in dirs if d.is_dir() for p in d.glob(".*.old"))
