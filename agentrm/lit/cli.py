"""The fit CLI's parser and config handling (LightningCLI), below the commands that use it.

``python -m agentrm.fit`` runs :class:`AgentRMCLI`; ``agentrm.plan`` and ``agentrm.pipeline`` parse fit configs with
the same parser without building anything (:func:`parse_fit_config`), so a key the fit rejects is rejected by
them too, in the same one line.

Configs compose (``--config base.yaml --config override.yaml``): ``configs/recipes/<kind>.yaml`` (value RM or
implicit PRM) + ``configs/recipes/<method>.yaml`` (full / LoRA / QLoRA) + ``configs/models/<family>.yaml``
(backbone, tokenizer, context length). Output paths follow ``trainer.default_root_dir`` where a config leaves
them out (:func:`default_output_paths`): checkpoints in ``<root>/checkpoints``, the export in ``<root>/hf_model``,
metrics in ``<root>/logs/version_*/metrics.csv``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from agentrm.cli_errors import (
    BuildError,
    building,
    explain_parse_error,
    one_line,
    one_line_parser,
    root_cause,
)
from agentrm.lit.datamodule import TrajectoryDataModule

EXPORT = "agentrm.lit.callbacks.ExportHF"
CSV_LOGGER = "lightning.pytorch.loggers.CSVLogger"

RESUMABLE = "agentrm.lit.checkpoints.ResumableCheckpoint"
PLAIN_CHECKPOINTS = ("lightning.pytorch.callbacks.ModelCheckpoint",
                     "lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint")
CKPT_HELP = (
    "resume a run: 'last' = the newest checkpoint (by time written) in the run's checkpoint directories that "
    "loads; newer ones that do not (empty, truncated) are named and skipped; with none, a line says so and "
    "training starts from scratch. A path resumes from that file (refused if it does not load)")


FitArgumentParser = one_line_parser(LightningArgumentParser, "agentrm.fit")


class AgentRMCLI(LightningCLI):
    """LightningCLI with the DataModule's tokenizer linked into the model, resumable checkpoints and a resume flag.

    Its parser reports a rejected key in one line with the closest valid names (:class:`FitArgumentParser`).
    """

    def __init__(self, *args, parser_class: type[LightningArgumentParser] = FitArgumentParser, **kwargs):
        super().__init__(*args, parser_class=parser_class, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.tokenizer", "model.init_args.tokenizer")
        parser.add_argument("--ckpt_path", type=str | None, default=None, help=CKPT_HELP)
        parser.add_argument("--overwrite", type=bool, default=False,
                            help="replace a model that another run exported into the export directory")
        parser.add_argument("--verbose", type=bool, default=False,
                            help="Lightning's own messages (devices, model summary, tips); off: warnings only")

    def _config_files(self) -> str:
        return ", ".join(str(f) for f in (self.config.get("config") or []))

    def before_instantiate_classes(self) -> None:
        """Checkpoints that resume (:func:`use_resumable_checkpoints`); quantisation, LoRA and strategy checked
        together from the config, before anything is built or fetched."""
        from agentrm.models.quant import validate_training_setup

        use_resumable_checkpoints(self.config)
        default_output_paths(self.config)
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


def _run_root(config) -> Path:
    """``trainer.default_root_dir`` of the parsed config (the working directory when unset)."""
    return Path(config.get("trainer.default_root_dir") or os.getcwd())


def _init_args(cb):
    """A callback entry's ``init_args`` of the parsed config, created empty when it has none."""
    from jsonargparse import Namespace

    if getattr(cb, "init_args", None) is None:
        cb.init_args = Namespace()
    return cb.init_args


def _default_dirpath(cb, dirpath: Path) -> None:
    """Give a callback entry of the parsed config ``init_args.dirpath = dirpath`` unless it names one."""
    if _init_args(cb).get("dirpath") is None:
        cb.init_args.dirpath = str(dirpath)


def use_resumable_checkpoints(config) -> None:
    """Every ``ModelCheckpoint`` of the parsed config becomes a ``ResumableCheckpoint`` (a checkpoint
    directory defaults to ``<default_root_dir>/checkpoints``); one is added when there is none and
    checkpointing is not switched off (``trainer.enable_checkpointing: false``). Of several in one directory
    (each keeping the best epoch by its own metric) the first writes ``last.ckpt``, the others not (``writes_last``)."""
    from jsonargparse import Namespace

    callbacks = config.get("trainer.callbacks")
    if callbacks is None:
        callbacks = []
    elif not isinstance(callbacks, list):
        callbacks = [callbacks]
    checkpoints = _run_root(config) / "checkpoints"
    found = False
    last_kept_in: set[str] = set()
    for cb in callbacks:
        class_path = getattr(cb, "class_path", "")
        if class_path in PLAIN_CHECKPOINTS or class_path == RESUMABLE:
            cb.class_path = RESUMABLE
            _default_dirpath(cb, checkpoints)
            directory = str(Path(cb.init_args.dirpath).resolve())
            if directory in last_kept_in:
                cb.init_args.writes_last = False
            elif _init_args(cb).get("writes_last", True):
                last_kept_in.add(directory)
            found = True
        elif class_path.rsplit(".", 1)[-1] in ("ModelCheckpoint", "ResumableCheckpoint", "OnExceptionCheckpoint"):
            _init_args(cb)
            found = True  # a checkpoint callback of another name: left as it is
    if not found and config.get("trainer.enable_checkpointing") is not False:
        callbacks.append(Namespace(class_path=RESUMABLE, init_args=Namespace(dirpath=str(checkpoints), save_top_k=0)))
    config["trainer.callbacks"] = callbacks


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


def default_output_paths(config) -> None:
    """Paths a composed config leaves out, under ``trainer.default_root_dir``: an ``ExportHF`` without a
    ``dirpath`` writes ``<root>/hf_model``; with no logger configured, a CSV logger writes ``<root>/logs``."""
    from jsonargparse import Namespace

    root = _run_root(config)
    for cb in config.get("trainer.callbacks") or []:
        if getattr(cb, "class_path", "") == EXPORT:
            _default_dirpath(cb, root / "hf_model")
    if config.get("trainer.logger") in (None, True):
        config["trainer.logger"] = Namespace(class_path=CSV_LOGGER, init_args=Namespace(save_dir=str(root), name="logs"))


class _RaisingParser(FitArgumentParser):
    """The fit parser whose errors raise :class:`BuildError` (one line, the closest valid names) instead of exiting."""

    def error(self, message: str, ex: Exception | None = None) -> Any:
        if not getattr(self, "exit_on_error", True):  # a nested parser: jsonargparse folds its error into the outer one
            return super().error(message, ex)
        raise BuildError(explain_parse_error(self, message, getattr(self, "_given_args", [])))


class _ParseOnly(AgentRMCLI):
    """Parses and checks a fit config (keys, types, class paths, links) and builds nothing."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, parser_class=_RaisingParser, **kwargs)

    def before_instantiate_classes(self) -> None:
        use_resumable_checkpoints(self.config)
        default_output_paths(self.config)

    def instantiate_classes(self) -> None:
        pass


def parse_fit_config(args: list[str]) -> Any:
    """The fit CLI's parse of ``args`` (``--config`` files and flags) as a jsonargparse namespace; nothing is built.

    Raises:
        BuildError: a rejected key or value, in one line (naming the key and the closest valid names).
    """
    import warnings

    warnings.filterwarnings("ignore", message=r"LightningCLI's args parameter is intended")  # args given on purpose
    try:
        cli = _ParseOnly(L.LightningModule, TrajectoryDataModule, subclass_mode_model=True, run=False, args=args)
    except BuildError:
        raise
    except Exception as e:
        raise BuildError(one_line(root_cause(e))) from None
    return cli.config
