"""``python -m agentrm.fit --config configs/...``: train a reward model with LightningCLI.

Without arguments it trains the embedded default, ``configs/tiny/value_rm.yaml`` (a
tiny LLaMA-architecture value RM on the shipped BabyAI sample, CPU, a few minutes).
Every Lightning trainer flag works (``--trainer.devices 2``, ``--trainer.max_epochs``...).
``--ckpt_path last`` resumes from the newest checkpoint of the run directory.  A new run
never replaces another run's exported model: if the export directory already holds one,
the run stops before training unless it resumes (``--ckpt_path``) or ``--overwrite true``
says to replace it.
"""

from __future__ import annotations

import sys
import warnings

import lightning as L
from lightning.pytorch.cli import LightningCLI

from agentrm.lit.datamodule import TrajectoryDataModule
from agentrm.paths import PROJECT_ROOT

DEFAULT_CONFIG = PROJECT_ROOT / "configs" / "tiny" / "value_rm.yaml"


class AgentRMCLI(LightningCLI):
    """LightningCLI with the DataModule's tokenizer linked into the model and a resume flag."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.tokenizer", "model.init_args.tokenizer")
        parser.add_argument("--ckpt_path", type=str | None, default=None,
                            help="checkpoint to resume from; 'last' = newest in the run's checkpoint dir")
        parser.add_argument("--overwrite", type=bool, default=False,
                            help="replace an exported model that an earlier run left in the export directory")


def check_export_targets(trainer: L.Trainer, resuming: bool, overwrite: bool) -> None:
    """Stop before training if an export directory already holds another run's model.

    Raises:
        SystemExit: with a one-line message naming the directory and the ways out.
    """
    from agentrm.lit.callbacks import ExportHF

    if resuming or overwrite:
        return
    for cb in trainer.callbacks:
        if isinstance(cb, ExportHF):
            target = cb.target(trainer)
            if target.is_dir() and any(target.iterdir()):
                raise SystemExit(
                    f"agentrm.fit: {target} already holds a model exported by an earlier run; pass --overwrite true "
                    f"to replace it, --ckpt_path last to resume that run, or point trainer.default_root_dir and "
                    f"the callbacks' dirpath at a new folder"
                )


def report(cli: AgentRMCLI) -> None:
    """Print where the model went and the final validation metrics."""
    from agentrm.lit.callbacks import ExportHF

    trainer = cli.trainer
    if trainer.global_rank != 0:
        return
    exports = [c for c in trainer.callbacks if isinstance(c, ExportHF)]
    print("\n=== agentrm.fit finished ===")
    if trainer.checkpoint_callback is not None:
        print(f"lightning checkpoint : {trainer.checkpoint_callback.last_model_path or trainer.checkpoint_callback.best_model_path}")
    if exports and exports[0].exported:
        print(f"hf model directory   : {exports[0].exported}")
    if trainer.logger is not None and getattr(trainer.logger, "log_dir", None):
        print(f"metrics (CSV)        : {trainer.logger.log_dir}/metrics.csv")
    for k, v in sorted(trainer.callback_metrics.items()):
        if k.startswith("val/"):
            print(f"{k:20s} : {float(v):.4f}")


def main(args: list[str] | None = None) -> AgentRMCLI:
    argv = sys.argv[1:] if args is None else args
    if not any(a == "--config" or a.startswith("--config=") for a in argv) and not any(
        a in ("-h", "--help", "--print_config") or a.startswith("--print_config") for a in argv
    ):
        argv = ["--config", str(DEFAULT_CONFIG), *argv]
    # we pass the command line ourselves (with the default config prepended): not a mistake
    warnings.filterwarnings("ignore", message=r"LightningCLI's args parameter is intended")
    cli = AgentRMCLI(
        L.LightningModule,
        TrajectoryDataModule,
        subclass_mode_model=True,
        run=False,
        args=argv,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"description": __doc__},
    )
    ckpt = cli.config.get("ckpt_path")
    check_export_targets(cli.trainer, resuming=ckpt is not None, overwrite=bool(cli.config.get("overwrite")))
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt)
    report(cli)
    return cli


if __name__ == "__main__":
    main()
