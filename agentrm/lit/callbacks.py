"""Callbacks: export the trained reward model as a Hugging Face directory."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_only


class ExportHF(L.Callback):
    """At the end of ``fit``, write ``<log_dir>/hf_model`` (or ``dirpath``) via the module's ``export``.

    The directory loads with ``ValueRewardModel.from_pretrained`` / ``ImplicitPRM.from_pretrained``.
    """

    def __init__(self, dirpath: str | None = None):
        self.dirpath = dirpath
        self.exported: Path | None = None

    def target(self, trainer: L.Trainer) -> Path:
        if self.dirpath:
            return Path(self.dirpath)
        return Path(trainer.log_dir or trainer.default_root_dir) / "hf_model"

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.exported = self.target(trainer)
        self._export(pl_module, training_settings(trainer))

    @rank_zero_only
    def _export(self, pl_module: L.LightningModule, training: dict) -> None:
        pl_module.export(self.exported, **training)


def training_settings(trainer: L.Trainer) -> dict:
    """What scorers should default to, recorded with the export: the data module's ``max_length``."""
    dm = getattr(trainer, "datamodule", None)
    max_length = getattr(getattr(dm, "hparams", None), "max_length", None) if dm is not None else None
    return {} if max_length is None else {"max_length": int(max_length)}
