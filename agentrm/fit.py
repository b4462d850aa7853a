"""``python -m agentrm.fit --config configs/...``: train a reward model with LightningCLI.

Without arguments it trains the embedded default, ``configs/tiny/value_rm.yaml`` (a
tiny LLaMA-architecture value RM on the shipped BabyAI sample, CPU, a few minutes).
Every Lightning trainer flag works (``--trainer.devices 2``, ``--trainer.max_epochs``...).

Checkpoints: every ``ModelCheckpoint`` of the config runs as
:class:`~agentrm.lit.checkpoints.ResumableCheckpoint` (one is added, into
``<default_root_dir>/checkpoints``, when the config has none): ``last.ckpt`` is rewritten at every
epoch end whatever the monitored metric did, and on Ctrl-C/SIGTERM; every file is written atomically.
``--ckpt_path last`` resumes from the newest checkpoint of the run's checkpoint directories that
loads, naming any newer one it skips (empty, truncated by a kill); with none it says so and trains
from scratch. While a fit runs, ``<dir>.lock`` beside each checkpoint and export directory keeps a
second fit out (one line, exit code 2); a lock left by a killed fit on this host is taken over.

Exports (:class:`~agentrm.lit.callbacks.ExportHF`) are written atomically and record their run id. A
run never replaces another run's exported model: if the export directory holds one, the run stops
before training unless it resumes that same run (``--ckpt_path``) or ``--overwrite true`` says to
replace it. A config that cannot be built (4-bit without CUDA, a model that is not there...), training
data that cannot be trained on (a malformed JSONL line, a NaN value, an empty file) or a mistyped key
ends the command with one line naming the file, the field and the cause, exit code 2
(``AGENTRM_DEBUG=1``: the traceback; see :mod:`agentrm.cli_errors`).
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from agentrm.cli_errors import (
    BuildError,
    is_usage_error,
    run_cli,
)
from agentrm.lit.checkpoints import (
    CheckpointInfo,
    InvalidCheckpoint,
    inspect_checkpoint,
    newest_valid_checkpoint,
)
from agentrm.lit.cli import (  # noqa: F401  (re-exported: the fit CLI's pieces, importable from here)
    CKPT_HELP,
    RESUMABLE,
    AgentRMCLI,
    FitArgumentParser,
    configured_strategy,
    default_output_paths,
    failed_section,
    use_resumable_checkpoints,
)
from agentrm.lit.datamodule import TrajectoryDataModule
from agentrm.paths import PROJECT_ROOT

DEFAULT_CONFIG = PROJECT_ROOT / "configs" / "tiny" / "value_rm.yaml"
class ExportConflict(BuildError):
    """The export directory holds another run's model; the message names it and the ways out."""


def note(message: str) -> None:
    print(f"agentrm.fit: {message}", file=sys.stderr, flush=True)


def launching_process() -> bool:
    """This process starts the run (global rank 0), not a worker a launcher (Lightning's DDP, torchrun,
    SLURM) started for another rank: it alone takes the locks and prints the notes."""
    return all(int(os.environ.get(v, "0") or 0) == 0 for v in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))


def checkpoint_dirs(trainer: L.Trainer) -> list[Path]:
    return sorted({Path(cb.dirpath) for cb in trainer.checkpoint_callbacks
                   if isinstance(cb, ModelCheckpoint) and cb.dirpath})


def export_callbacks(trainer: L.Trainer) -> list:
    from agentrm.lit.callbacks import ExportHF

    return [cb for cb in trainer.callbacks if isinstance(cb, ExportHF)]


def resolve_resume(ckpt_path: str | None, dirs: list[Path], say=note) -> CheckpointInfo | str | None:
    """What ``--ckpt_path`` resumes from: a checked checkpoint, a Lightning keyword (``best``...), or ``None``.

    Raises:
        BuildError: a path that is not a checkpoint that loads.
    """
    if ckpt_path is None:
        return None
    if ckpt_path == "last":
        if not dirs:
            say("--ckpt_path last: this config writes no checkpoints (trainer.enable_checkpointing is false); "
                "training from scratch")
            return None
        info, skipped = newest_valid_checkpoint(dirs)
        for path, why in skipped:
            say(f"skipping {path}: {why}")
        where = ", ".join(str(d) for d in dirs)
        if info is None:
            found = f"{len(skipped)} checkpoint(s), none loads" if skipped else "no checkpoint"
            say(f"--ckpt_path last: {found} in {where}; training from scratch")
            return None
        say(f"resuming from {info.describe()}")
        return info
    if ckpt_path in ("best", "hpc", "registry") or ckpt_path.startswith("registry:"):
        return ckpt_path
    try:
        info = inspect_checkpoint(ckpt_path)
    except InvalidCheckpoint as e:
        raise BuildError(f"--ckpt_path {ckpt_path}: {e}") from None
    say(f"resuming from {info.describe()}")
    return info


def check_export_targets(trainer: L.Trainer, resume: CheckpointInfo | str | None, overwrite: bool) -> None:
    """Stop before training if an export directory holds another run's model.

    Resuming the run that wrote the export (same run id) may replace it; ``overwrite`` replaces any.

    Raises:
        ExportConflict: one line naming the directory, whose run it holds and the ways out.
    """
    from agentrm.lit.callbacks import export_run_id

    resumed_run = resume.run_id if isinstance(resume, CheckpointInfo) else None
    for cb in export_callbacks(trainer):
        cb.replace_other_runs = overwrite
        target = cb.target(trainer)
        if overwrite or not (target.is_dir() and any(target.iterdir())):
            continue
        held = export_run_id(target)
        if resumed_run is not None and held == resumed_run:
            continue
        whose = f"run {held}" if held else "a run that recorded no run id"
        if isinstance(resume, CheckpointInfo):
            why = f"{target} holds a model exported by {whose}, not by the run of {resume.path}"
        else:
            why = f"{target} already holds a model exported by {whose}"
        raise ExportConflict(f"{why}; pass --overwrite true to replace it, --ckpt_path last to resume that run, "
                             f"or point trainer.default_root_dir and the callbacks' dirpath at a new folder")


def clean_leftovers(trainer: L.Trainer, dirs: list[Path], say=note) -> None:
    """Remove what killed writes left (``.partial`` checkpoints, unfinished exports); put back an export
    that a kill left moved aside mid-swap. Called with the run's locks held."""
    import shutil

    from agentrm.lit.checkpoints import finish_swap, remove_path, stale_partials, swapped_in

    for p in stale_partials(dirs):
        say(f"removing {p}: a checkpoint write that was killed")
        remove_path(p)
    targets = [cb.target(trainer) for cb in export_callbacks(trainer)]
    for target in targets:
        for p in sorted(target.parent.glob(f".{target.name}.partial-*")):
            say(f"removing {p}: an export that was killed before it was complete")
            shutil.rmtree(p, ignore_errors=True)
    for target in [*swapped_in(dirs), *targets]:
        done = finish_swap(target)
        if done:
            say(done)


def report(cli: AgentRMCLI, resume: CheckpointInfo | str | None) -> None:
    """Print what the run wrote (checkpoint files, ``last.ckpt`` read back, the export) and the final validation metrics."""
    from agentrm.lit.callbacks import export_run_id
    from agentrm.lit.checkpoints import ResumableCheckpoint

    trainer = cli.trainer
    if trainer.global_rank != 0:
        return
    print("\n=== agentrm.fit finished ===")
    if isinstance(resume, CheckpointInfo):
        print(f"resumed from         : {resume.describe()}")
    for cb in trainer.checkpoint_callbacks:
        if not isinstance(cb, ModelCheckpoint):
            continue
        written = getattr(cb, "written", {})
        kept = sorted(Path(p).name for p in written if Path(p).exists())
        if kept:
            print(f"checkpoints written  : {cb.dirpath}: {', '.join(kept)}")
        elif isinstance(cb, ResumableCheckpoint):
            print(f"checkpoints written  : none in {cb.dirpath}")
        last = cb.last_model_path or cb.best_model_path
        if last:
            try:
                info = inspect_checkpoint(last)
                print(f"last checkpoint      : {last} (epoch {info.epoch}, global step {info.global_step}; read back)")
            except InvalidCheckpoint as e:
                print(f"last checkpoint      : {last} DOES NOT LOAD: {e}")
        if cb.best_model_path and cb.monitor and cb.best_model_score is not None:
            print(f"best {cb.monitor:15s} : {float(cb.best_model_score):.4f} ({cb.best_model_path})")
    for cb in export_callbacks(trainer):
        if cb.exported and cb.exported.is_dir():
            n = sum(1 for f in cb.exported.iterdir() if f.is_file())
            print(f"hf model directory   : {cb.exported} (run {export_run_id(cb.exported)}, {n} files)")
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
    verbose = flag_given(argv, "--verbose")
    quiet_lightning(verbose)
    if not verbose and not any(a.startswith("--trainer.enable_model_summary") for a in argv):
        argv = [*argv, "--trainer.enable_model_summary", "false"]  # the layer table: --verbose true shows it
    cli = AgentRMCLI(
        L.LightningModule,
        TrajectoryDataModule,
        subclass_mode_model=True,
        run=False,
        args=argv,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"description": __doc__},
    )
    from agentrm.lit.run_lock import RunLock

    trainer = cli.trainer
    launching = launching_process()
    dirs = checkpoint_dirs(trainer)
    say = note if launching else (lambda s: None)
    locked = [*dirs, *(cb.target(trainer) for cb in export_callbacks(trainer))]
    with RunLock(locked if launching else []):
        if launching:
            clean_leftovers(trainer, dirs)
        resume = resolve_resume(cli.config.get("ckpt_path"), dirs, say)
        check_export_targets(trainer, resume, overwrite=bool(cli.config.get("overwrite")))
        if resume is None and launching:
            earlier, _ = newest_valid_checkpoint(dirs)
            if earlier is not None and cli.config.get("ckpt_path") is None:
                say(f"{earlier.path.parent} holds checkpoints of an earlier run (newest {earlier.describe()}); this "
                    f"run starts from scratch and writes beside them (--ckpt_path last resumes instead)")
        trainer.fit(cli.model, datamodule=cli.datamodule,
                    ckpt_path=str(resume.path) if isinstance(resume, CheckpointInfo) else resume)
    report(cli, resume)
    return cli


def flag_given(argv: list[str], name: str) -> bool:
    """Whether a boolean flag is set on the command line (``--name``, ``--name true``, ``--name=true``)."""
    for i, a in enumerate(argv):
        if a == name:
            nxt = argv[i + 1] if i + 1 < len(argv) else "true"
            return nxt.lower() not in ("false", "0", "no")
        if a.startswith(name + "="):
            return a.split("=", 1)[1].lower() not in ("false", "0", "no")
    return False


def quiet_lightning(verbose: bool) -> None:
    """Unless ``verbose``: Lightning's info messages (devices, model summary, tips) and transformers' progress
    bars (writing the export's shards) hidden; warnings stay.

    The fit prints its own data summary, progress and end-of-run report; ``--verbose true`` brings the rest back.
    """
    if verbose:
        return
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Writing model shards" bars of every export
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")


def raised_by_data_setup(exc: BaseException) -> bool:
    """A ``ValueError``/``OSError`` raised by agentrm code while a data module set itself up (a file that is
    not there, data the loader rejects), as opposed to one from deep inside a library (a crash)."""
    if not isinstance(exc, (ValueError, OSError)):
        return False
    frames = []
    tb = exc.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    in_setup = any(f.f_code.co_name in ("setup", "prepare_data")
                   and isinstance(f.f_locals.get("self"), L.LightningDataModule) for f in frames)
    agentrm_dir = str(Path(__file__).resolve().parent)
    return in_setup and bool(frames) and str(Path(frames[-1].f_code.co_filename).resolve()).startswith(agentrm_dir)


def fit_usage_error(exc: BaseException) -> bool:
    """What ``agentrm.fit`` reports in one line (exit code 2): config errors, data errors, data-module setup
    errors and Lightning's own ``MisconfigurationException`` (e.g. a checkpoint past ``max_epochs``)."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    return is_usage_error(exc) or raised_by_data_setup(exc) or isinstance(exc, MisconfigurationException)


def cli(argv: list[str] | None = None) -> AgentRMCLI:
    """Console entry point: :func:`main` with usage errors in one line (:func:`agentrm.cli_errors.run_cli`);
    a SIGTERM ends it with code 143 after ``last.ckpt`` is saved."""
    try:
        return run_cli("agentrm.fit", main, argv, usage_error=fit_usage_error)
    except SIGTERMException:
        print("agentrm.fit: stopped by SIGTERM (resume with --ckpt_path last)", file=sys.stderr)
        raise SystemExit(143) from None


if __name__ == "__main__":
    cli()
