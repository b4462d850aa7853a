"""``python -m agentrm.fit --config configs/...``: train a reward model with LightningCLI.

Without arguments it trains the embedded default, ``configs/tiny/value_rm.yaml`` (a
tiny LLaMA-architecture value RM on the shipped BabyAI sample, CPU, a few minutes).
Every Lightning trainer flag works (``--trainer.devices 2``, ``--trainer.max_epochs``...).
``--ckpt_path last`` resumes from the newest checkpoint of the run directory.  A new run
never replaces another run's exported model: if the export directory already holds one,
the run stops before training unless it resumes (``--ckpt_path``) or ``--overwrite true``
says to replace it.  An error while building the model, data module or trainer from the config
(4-bit without CUDA, a model that is not there...) ends the command with one line naming the config
file, the section and the cause, exit code 2 (``AGENTRM_DEBUG=1``: the traceback; see
:mod:`agentrm.cli_errors`).
"""

from __future__ import annotations

import sys
import warnings

import lightning as L
from lightning.pytorch.cli import LightningCLI

from agentrm.cli_errors import BuildError, building, one_line, root_cause, run_cli
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

    def _config_files(self) -> str:
        return ", ".join(str(f) for f in (self.config.get("config") or []))

    def before_instantiate_classes(self) -> None:
        """Check quantisation, LoRA and strategy together from the config, before anything is built or fetched."""
        from agentrm.models.quant import validate_training_setup

        init = self.config.get("model.init_args") or {}
        quantization = init.get("quantization")
        if quantization is None:
            return
        files = self._config_files()
        with building(f"{files}: model" if files else "model"):
            validate_training_setup(quantization, init.get("lora"), configured_strategy(self.config.get("trainer.strategy")))

    def instantiate_classes(self) -> None:
        """Build data module, model and trainer; a failure becomes one :class:`BuildError` line.

        jsonargparse wraps an exception raised by a class's ``__init__`` into a dump of the whole
        namespace ("Does not validate against any of the Union subtypes"); the root cause is kept.
        """
        try:
            super().instantiate_classes()
        except Exception as e:
            root = root_cause(e)
            files = self._config_files()
            prefix = f"{files}: " if files else ""
            raise BuildError(f"{prefix}{failed_section(root)}: {one_line(root)}") from e


def configured_strategy(strategy: object) -> str | None:
    """A strategy name from the parsed config (a string, or ``class_path``/``init_args``) for
    :func:`agentrm.models.quant.strategy_name`: ``fsdp``, ``deepspeed_stage_3``, ``ddp``..."""
    if strategy is None or isinstance(strategy, str):
        return strategy
    class_path = getattr(strategy, "class_path", None) or ""
    name = class_path.rsplit(".", 1)[-1].lower().replace("strategy", "")
    stage = (getattr(strategy, "init_args", None) or {}).get("stage") if name == "deepspeed" else None
    return f"deepspeed_stage_{stage}" if stage is not None else name


def failed_section(exc: BaseException) -> str:
    """The config section whose object raised ``exc``: ``model (ValueRMModule)``, ``data (...)``, ``trainer``.

    Read from the traceback: the outermost ``__init__`` frame of an object that is a LightningModule,
    a LightningDataModule, a Trainer or anything of agentrm.
    """
    tb = exc.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        obj = frame.f_locals.get("self") if frame.f_code.co_name == "__init__" else None
        if obj is not None:
            name = type(obj).__name__
            if isinstance(obj, L.LightningModule):
                return f"model ({name})"
            if isinstance(obj, L.LightningDataModule):
                return f"data ({name})"
            if isinstance(obj, L.Trainer):
                return "trainer"
            if type(obj).__module__.startswith("agentrm."):
                return name
        tb = tb.tb_next
    return "config"


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


def cli(argv: list[str] | None = None) -> AgentRMCLI:
    """Console entry point: :func:`main` with config-building errors as one line (:func:`agentrm.cli_errors.run_cli`)."""
    return run_cli("agentrm.fit", main, argv)


if __name__ == "__main__":
    cli()
