"""Callbacks: export the trained reward model as a Hugging Face directory, atomically, tagged with its run.

:class:`~agentrm.lit.checkpoints.ResumableCheckpoint` (the checkpoints ``python -m agentrm.fit`` writes)
is importable from here too.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import time
import uuid
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_only

from agentrm.lit.checkpoints import ResumableCheckpoint, replace_path

__all__ = ["ExportHF", "ResumableCheckpoint", "export_run_id", "training_settings"]

RUN_FILE = "agentrm_run.json"  # the run id of an export without an agentrm_config.json (a policy)
CONFIG_FILE = "agentrm_config.json"


def new_run_id() -> str:
    """``<UTC date>-<time>-<8 hex>``: unique, and sorts by start time."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:8]


def export_run_id(directory: str | Path) -> str | None:
    """The run id recorded in an export directory (``None``: none recorded, e.g. written before run ids)."""
    d = Path(directory)
    for name in (CONFIG_FILE, RUN_FILE):
        try:
            rid = json.loads((d / name).read_text()).get("run_id")
        except (OSError, ValueError, AttributeError):
            continue
        if rid:
            return str(rid)
    return None


def record_run_id(directory: Path, run_id: str) -> None:
    """Add ``run_id`` to the export's ``agentrm_config.json`` (a reward model) or write ``agentrm_run.json``."""
    cfg_file = directory / CONFIG_FILE
    if cfg_file.is_file():
        cfg = json.loads(cfg_file.read_text())
        cfg["run_id"] = run_id
        cfg_file.write_text(json.dumps(cfg, indent=2))
    else:
        (directory / RUN_FILE).write_text(json.dumps({"run_id": run_id}, indent=2))


class ExportHF(L.Callback):
    """At the end of ``fit``, write ``<log_dir>/hf_model`` (or ``dirpath``) via the module's ``export``.

    The directory loads with ``ValueRewardModel.from_pretrained`` / ``ImplicitPRM.from_pretrained``.
    It is written into ``.<name>.partial-<run id>`` beside the target and renamed into place, so the
    target is never half-written: it holds the previous export or the new one. The export records the
    run id (``agentrm_config.json``'s ``run_id``; ``agentrm_run.json`` for a policy); the run id is kept
    in the run's checkpoints, so a resumed run keeps it. An export of another run is never replaced
    unless ``replace_other_runs`` (``python -m agentrm.fit --overwrite true``); the new model then goes
    to ``<name>-<run id>`` beside it.
    """

    def __init__(self, dirpath: str | None = None):
        self.dirpath = dirpath
        self.exported: Path | None = None
        self.run_id = new_run_id()
        self.replace_other_runs = False

    def target(self, trainer: L.Trainer) -> Path:
        if self.dirpath:
            return Path(self.dirpath)
        return Path(trainer.log_dir or trainer.default_root_dir) / "hf_model"

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.run_id = trainer.strategy.broadcast(self.run_id, src=0)  # one id for all ranks (a resume restores it later)

    def state_dict(self) -> dict[str, str]:
        return {"run_id": self.run_id}

    def load_state_dict(self, state_dict: dict[str, str]) -> None:
        self.run_id = state_dict.get("run_id", self.run_id)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.exported = self.target(trainer)
        with gathered_parameters(trainer, pl_module):  # every rank enters; rank 0 writes
            self.exported = self._export(pl_module, training_settings(trainer)) or self.exported

    @rank_zero_only
    def _export(self, pl_module: L.LightningModule, training: dict) -> Path:
        target = self.exported
        assert target is not None
        other = export_run_id(target) if target.is_dir() and any(target.iterdir()) else None
        if target.is_dir() and any(target.iterdir()) and other != self.run_id and not self.replace_other_runs:
            target = target.parent / f"{target.name}-{self.run_id}"
            print(f"agentrm.fit: {self.exported} holds another run's export (run {other}); this run's model goes to "
                  f"{target}", file=sys.stderr)
        tmp = target.parent / f".{target.name}.partial-{self.run_id}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        pl_module.export(tmp, **training)
        record_run_id(tmp, self.run_id)
        replace_path(tmp, target)
        return target


def gathered_parameters(trainer: L.Trainer, pl_module: L.LightningModule):
    """A context in which every parameter is whole: DeepSpeed ZeRO-3 partitions them (a ``state_dict`` then
    holds empty tensors), so the export gathers them on every rank first; a no-op for other strategies."""
    if not getattr(trainer.strategy, "zero_stage_3", False):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(pl_module.parameters()), modifier_rank=None)


def training_settings(trainer: L.Trainer) -> dict:
    """What scorers should default to, recorded with the export: the data module's ``max_length`` (and the
    declared ``value_range`` of the targets, for the record)."""
    hp = getattr(getattr(trainer, "datamodule", None), "hparams", None)
    out = {}
    if getattr(hp, "max_length", None) is not None:
        out["max_length"] = int(hp.max_length)
    if getattr(hp, "value_range", None) is not None:
        out["value_range"] = [float(x) for x in hp.value_range]
    return out
