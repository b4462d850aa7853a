"""Fault cases for ``python -m agentrm.fit``: checkpoints that resume, one fit per directory, atomic exports,
one-line errors.

Every case runs the real command in a subprocess on the tiny setup of ``tests/lit/conftest.py`` (a 2-layer,
32-wide LLaMA value RM, 48 learnable trajectories, the shipped tiny tokenizer, 3 epochs of 5 steps): a few
seconds per run. Faults are injected by callbacks of this module that the case's config names
(``tests.faults.cases_fit.KillAt``...): ``SIGKILL`` mid-epoch, after the last checkpoint but before the
export, in the middle of the export and in the middle of a checkpoint write; ``SIGTERM`` mid-epoch.
Resumed runs are compared with one uninterrupted reference run (built once per process, shared): training
is deterministic on CPU, so a run resumed from an epoch-end checkpoint ends with the reference's weights.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import lightning as L
import yaml

from agentrm.paths import PROJECT_ROOT
from tests.faults.harness import FaultCase, Outcome, command_env, run_module

EPOCHS, STEPS_PER_EPOCH = 3, 5  # 38 training trajectories (10 held out) in batches of 8
TOKENIZER = "agentrm/assets/tiny_tokenizer"
HERE = "tests.faults.cases_fit"


# --- fault injectors: callbacks the fit subprocess loads from the case's config -------------------------


def _kill(sig: int = signal.SIGKILL) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), sig)


class KillAt(L.Callback):
    """``SIGKILL`` before batch ``batch`` of epoch ``epoch`` (``when="batch"``), or once training ended,
    after the last checkpoint and before the export (``when="train_end"``)."""

    def __init__(self, epoch: int = 1, batch: int = 1, when: str = "batch"):
        self.epoch, self.batch, self.when = epoch, batch, when

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.when == "batch" and trainer.current_epoch == self.epoch and batch_idx == self.batch:
            _kill()

    def on_train_end(self, trainer, pl_module) -> None:
        if self.when == "train_end":
            _kill()


class SignalAt(L.Callback):
    """``SIGTERM`` to itself after batch ``batch`` of epoch ``epoch`` (Lightning stops before the next batch)."""

    def __init__(self, epoch: int = 1, batch: int = 1):
        self.epoch, self.batch = epoch, batch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            os.kill(os.getpid(), signal.SIGTERM)


class KillInExport(L.Callback):
    """``SIGKILL`` once the module's ``export`` has written its files, before the export is renamed into place.
    (Listed before ``ExportHF`` in the config, so its ``on_fit_end`` runs first.)"""

    def on_fit_end(self, trainer, pl_module) -> None:
        original = pl_module.export

        def export(directory, **training):
            original(directory, **training)
            _kill()

        pl_module.export = export


class KillInCheckpointWrite(L.Callback):
    """``SIGKILL`` in the middle of the first checkpoint write of epoch ``epoch``: half the file is on disk."""

    def __init__(self, epoch: int = 1):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch != self.epoch:
            return
        io = trainer.strategy.checkpoint_io
        original = io.save_checkpoint

        def save_checkpoint(checkpoint, path, storage_options=None):
            original(checkpoint, path, storage_options=storage_options)
            data = Path(path).read_bytes()
            Path(path).write_bytes(data[: len(data) // 2])
            _kill()

        io.save_checkpoint = save_checkpoint


class PauseUntil(L.Callback):
    """Wait at the start of training until ``path`` exists (at most ``timeout`` seconds)."""

    def __init__(self, path: str, timeout: float = 120.0):
        self.path, self.timeout = path, timeout

    def on_train_start(self, trainer, pl_module) -> None:
        deadline = time.monotonic() + self.timeout
        while not Path(self.path).exists() and time.monotonic() < deadline:
            time.sleep(0.1)


class CrashAt(L.Callback):
    """A genuine bug: ``RuntimeError`` at the start of training."""

    def on_train_start(self, trainer, pl_module) -> None:
        raise RuntimeError("injected crash")


# --- inputs, runs and the shared reference ---------------------------------------------------------------

_SHARED: dict[str, Path] = {}


def shared_dir() -> Path:
    if "root" not in _SHARED:
        root = Path(tempfile.mkdtemp(prefix="agentrm-fit-faults-"))
        atexit.register(shutil.rmtree, root, ignore_errors=True)
        _SHARED["root"] = root
    return _SHARED["root"]


def train_file() -> Path:
    """48 learnable trajectories (``tests/lit/conftest.py``), written once."""
    if "data" not in _SHARED:
        from agentrm.data.schema import write_jsonl
        from tests.lit.conftest import learnable_trajectories

        write_jsonl(shared_dir() / "train.jsonl", learnable_trajectories(48))
        _SHARED["data"] = shared_dir() / "train.jsonl"
    return _SHARED["data"]


def write_config(d: Path, callbacks: list[dict] | None = None, checkpoint: dict | None = None,
                 train: Path | None = None, epochs: int = EPOCHS, extra_trainer: dict | None = None) -> Path:
    """``{d}/cfg.yaml``: the tiny value RM into ``{d}/run`` (checkpoints every epoch, ``hf_model`` export);
    ``callbacks`` (fault injectors) come before the export."""
    from tests.lit.conftest import TINY_BACKBONE

    run = d / "run"
    ckpt = {"dirpath": str(run / "checkpoints"), "save_last": True, "save_top_k": -1, **(checkpoint or {})}
    cfg = {
        "seed_everything": 3,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_epochs": epochs, "default_root_dir": str(run),
            "enable_progress_bar": False, "enable_model_summary": False, "log_every_n_steps": 1,
            "num_sanity_val_steps": 0,
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                       "init_args": {"save_dir": str(run), "name": "logs"}},
            "callbacks": [
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": ckpt},
                *(callbacks or []),
                {"class_path": "agentrm.lit.callbacks.ExportHF", "init_args": {"dirpath": str(run / "hf_model")}},
            ],
            **(extra_trainer or {}),
        },
        "model": {"class_path": "agentrm.lit.value_module.ValueRMModule",
                  "init_args": {"backbone_config": TINY_BACKBONE, "learning_rate": 3e-3, "warmup_steps": 2}},
        "data": {"train_path": str(train or train_file()), "tokenizer": TOKENIZER, "val_fraction": 0.25,
                 "max_length": 256, "batch_size": 8},
    }
    (d / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    return d / "cfg.yaml"


def fault(name: str, **init_args) -> dict:
    return {"class_path": f"{HERE}.{name}", "init_args": init_args}


def fit(d: Path, *args: str) -> Outcome:
    return run_module("agentrm.fit", ["--config", str(d / "cfg.yaml"), *args], d, timeout=240)


def reference() -> Path:
    """The run directory of one uninterrupted fit (built once, shared by the cases that compare with it)."""
    if "reference" not in _SHARED:
        d = shared_dir() / "reference"
        d.mkdir()
        write_config(d)
        out = fit(d)
        assert out.returncode == 0, f"the reference fit failed:\n{out.stderr[-3000:]}"
        _SHARED["reference"] = d / "run"
    return _SHARED["reference"]


def same_model(a: Path, b: Path) -> None:
    """The exports ``a`` and ``b`` hold the same weights (to float tolerance)."""
    import torch
    from safetensors.torch import load_file

    files = sorted(p.name for p in a.glob("*.safetensors"))
    assert files and files == sorted(p.name for p in b.glob("*.safetensors")), (files, list(b.iterdir()))
    for name in files:
        ta, tb = load_file(a / name), load_file(b / name)
        assert ta.keys() == tb.keys()
        for k in ta:
            torch.testing.assert_close(ta[k], tb[k], rtol=1e-4, atol=1e-5, msg=f"{name}:{k} differs")


def info(path: Path):
    from agentrm.lit.checkpoints import inspect_checkpoint

    return inspect_checkpoint(path)


def expect(out: Outcome, code: int, *patterns: str) -> None:
    """``out`` ended with ``code`` and its output matches every pattern."""
    text = out.stderr + out.stdout
    assert out.returncode == code, f"exit {out.returncode}, expected {code}\n{out.stderr[-3000:]}"
    for p in patterns:
        assert re.search(p, text), f"{p!r} not in the output:\n{text[-3000:]}"


def copy_reference(d: Path, export: bool = True) -> None:
    """The reference run's checkpoints (mtimes kept: the same newest-first order) and, if ``export``, its export."""
    ref = reference()
    shutil.copytree(ref / "checkpoints", d / "run" / "checkpoints")
    if export:
        shutil.copytree(ref / "hf_model", d / "run" / "hf_model")


# --- the cases' setups and runs --------------------------------------------------------------------------

LAST = "last.ckpt"
FINAL_STEP = EPOCHS * STEPS_PER_EPOCH


def check_last_is_current(d: Path, out: Outcome) -> None:
    ckpts = d / "run" / "checkpoints"
    top = [p for p in ckpts.glob("epoch*.ckpt")]
    assert len(top) == 1 and info(top[0]).epoch < EPOCHS - 1, f"the case needs a non-improving last epoch: {top}"
    last = info(ckpts / LAST)
    assert (last.epoch, last.global_step) == (EPOCHS - 1, FINAL_STEP), last
    assert re.search(rf"last checkpoint .*last\.ckpt \(epoch {EPOCHS - 1}, global step {FINAL_STEP}; read back\)",
                     out.stdout), out.stdout[-2000:]


def kill_then_resume(injector: dict, after_kill: Callable[[Path], None], *resumed: str) -> Callable[[Path], Outcome]:
    """Run with ``injector`` (killed: exit -9), check ``after_kill``, resume with ``--ckpt_path last``
    (expecting ``resumed`` in its output) and compare the export with the reference."""
    def run(d: Path) -> Outcome:
        ref = reference()
        write_config(d, callbacks=[injector])
        out = fit(d)
        assert out.returncode == -signal.SIGKILL, f"exit {out.returncode}, expected SIGKILL\n{out.stderr[-3000:]}"
        after_kill(d)
        write_config(d)
        out = fit(d, "--ckpt_path", "last")
        expect(out, 0, *resumed)
        same_model(d / "run" / "hf_model", ref / "hf_model")
        return out
    return run


def killed_mid_epoch(d: Path) -> None:
    last = info(d / "run" / "checkpoints" / LAST)
    assert (last.epoch, last.global_step) == (0, STEPS_PER_EPOCH), last
    assert not (d / "run" / "hf_model").exists()


def killed_before_export(d: Path) -> None:
    last = info(d / "run" / "checkpoints" / LAST)
    assert (last.epoch, last.global_step) == (EPOCHS - 1, FINAL_STEP), last
    assert not (d / "run" / "hf_model").exists(), "the kill came before the export"


def killed_in_checkpoint_write(d: Path) -> None:
    ckpts = d / "run" / "checkpoints"
    partial = list(ckpts.glob(".*.partial"))
    assert partial, f"no half-written file: {sorted(p.name for p in ckpts.iterdir())}"
    assert sorted(p.name for p in ckpts.glob("*.ckpt")) == ["epoch=0-step=5.ckpt", LAST]
    assert info(ckpts / LAST).global_step == STEPS_PER_EPOCH


def kill_during_export(d: Path) -> Outcome:
    """A resumed run of the reference, killed in the middle of its export: the previous export stays whole;
    the next resume removes the unfinished one and exports."""
    ref = reference()
    copy_reference(d)
    before = {p.name: p.read_bytes() for p in (d / "run" / "hf_model").iterdir()}
    write_config(d, callbacks=[fault("KillInExport")])
    out = fit(d, "--ckpt_path", "last")
    assert out.returncode == -signal.SIGKILL, f"exit {out.returncode}\n{out.stderr[-3000:]}"
    after = {p.name: p.read_bytes() for p in (d / "run" / "hf_model").iterdir()}
    assert after == before, "the export directory changed although the export never finished"
    assert list((d / "run").glob(".hf_model.partial-*")), "the unfinished export should be beside, not in place"
    write_config(d)
    out = fit(d, "--ckpt_path", "last")
    expect(out, 0, r"removing .*\.hf_model\.partial-\S+: an export that was killed")
    assert not list((d / "run").glob(".hf_model*")), list((d / "run").iterdir())
    same_model(d / "run" / "hf_model", ref / "hf_model")
    from agentrm.lit.callbacks import export_run_id

    assert export_run_id(d / "run" / "hf_model") == export_run_id(ref / "hf_model")  # the same run, resumed
    return out


def corrupted_checkpoints(how: str) -> Callable[[Path], None]:
    """Setup: the reference checkpoints with ``last.ckpt`` and the final epoch's file truncated to half
    (``how="truncate"``), or every checkpoint emptied (``how="empty"``); no export."""
    def setup(d: Path) -> None:
        copy_reference(d, export=False)
        write_config(d)
        ckpts = sorted((d / "run" / "checkpoints").glob("*.ckpt"))
        for p in ckpts:
            if how == "empty":
                p.write_bytes(b"")
            elif p.name in (LAST, f"epoch={EPOCHS - 1}-step={FINAL_STEP}.ckpt"):
                p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    return setup


def matches_reference(d: Path, out: Outcome) -> None:
    same_model(d / "run" / "hf_model", reference() / "hf_model")


def concurrent_fit(d: Path) -> Outcome:
    """A fit that holds the run directory (paused at the start of training); a second fit into it is refused."""
    go = d / "go"
    write_config(d, callbacks=[fault("PauseUntil", path=str(go))])
    first = subprocess.Popen([sys.executable, "-m", "agentrm.fit", "--config", str(d / "cfg.yaml")], cwd=PROJECT_ROOT,
                             env=command_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lock = d / "run" / "checkpoints.lock"
        deadline = time.monotonic() + 120
        while not lock.exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert lock.exists(), "the first fit never took its lock"
        second = run_module("agentrm.fit", ["--config", str(d / "cfg.yaml"), "--overwrite", "true"], d, timeout=240)
    finally:
        go.touch()
        stdout, stderr = first.communicate(timeout=240)
    assert first.returncode == 0, f"the first fit failed:\n{stderr[-3000:]}"
    assert (d / "run" / "hf_model").is_dir() and not lock.exists()
    return second


def stale_lock() -> Callable[[Path], None]:
    """Setup: the config and a lock left by a fit that is no longer running (a pid that exited)."""
    def setup(d: Path) -> None:
        write_config(d, epochs=1)
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        (d / "run").mkdir(parents=True, exist_ok=True)
        (d / "run" / "checkpoints.lock").write_text(json.dumps(
            {"pid": dead.pid, "host": socket.gethostname(), "started": "2026-01-01 00:00:00"}))
    return setup


def lock_taken_over(d: Path, out: Outcome) -> None:
    assert not (d / "run" / "checkpoints.lock").exists()
    assert (d / "run" / "hf_model").is_dir()


def reference_export(run_id: str | None = None, checkpoints: bool = False) -> Callable[[Path], None]:
    """Setup: the reference export in ``{d}/run/hf_model`` (with another ``run_id`` if given), optionally its checkpoints."""
    def setup(d: Path) -> None:
        copy_reference(d, export=True)
        if not checkpoints:
            shutil.rmtree(d / "run" / "checkpoints")
        if run_id:
            cfg_file = d / "run" / "hf_model" / "agentrm_config.json"
            cfg = json.loads(cfg_file.read_text())
            cfg["run_id"] = run_id
            cfg_file.write_text(json.dumps(cfg, indent=2))
        write_config(d)
    return setup


def data(text: str, name: str = "train.jsonl") -> Callable[[Path], None]:
    """Setup: ``{d}/<name>`` holding ``text`` (``None``-like: absent) and the config training on it."""
    def setup(d: Path) -> None:
        if text != "<absent>":
            (d / name).write_text(text)
        write_config(d, train=d / name)
    return setup


def learnable_lines(n: int = 12) -> list[str]:
    return train_file().read_text().splitlines()[:n]


def malformed_line(d: Path) -> None:
    lines = learnable_lines()
    lines[4] = lines[4][: len(lines[4]) // 2]  # a line cut in the middle: line 5
    data("\n".join(lines) + "\n")(d)


def typo_in_yaml(d: Path) -> None:
    cfg_file = write_config(d)
    cfg = yaml.safe_load(cfg_file.read_text())
    cfg["trainer"]["max_epochz"] = cfg["trainer"].pop("max_epochs")
    cfg_file.write_text(yaml.safe_dump(cfg))


def sigterm_then_resume(d: Path) -> Outcome:
    """SIGTERM mid-epoch: ``last.ckpt`` saved with the state after the last finished batch, exit code 143;
    ``--ckpt_path last`` resumes from that step and finishes the run."""
    write_config(d, callbacks=[fault("SignalAt", epoch=1, batch=1)])
    out = fit(d)
    expect(out, 143, r"SIGTERMException: saved .*last\.ckpt \(epoch 1, global step 7, mid-epoch\)")
    assert out.last_line == "agentrm.fit: stopped by SIGTERM (resume with --ckpt_path last)", out.last_line
    last = info(d / "run" / "checkpoints" / LAST)
    assert (last.epoch, last.global_step, last.saved_on) == (1, 7, "interrupt"), last
    write_config(d)
    out = fit(d, "--ckpt_path", "last")
    expect(out, 0, r"resuming from .*last\.ckpt \(epoch 1, global step 7, saved mid-epoch on an interrupt\)",
           rf"last checkpoint .*\(epoch {EPOCHS - 1}, global step {FINAL_STEP}; read back\)")
    return out


def crashed(d: Path, out: Outcome) -> None:
    assert "Traceback" in out.stderr and "RuntimeError: injected crash" in out.stderr, out.stderr[-2000:]
    assert not list((d / "run").glob("*.lock")), "a crashed fit left its lock"


FIT = "agentrm.fit"
ARGS = ["--config", "{d}/cfg.yaml"]
EXPORT_FILES = ["run/hf_model/agentrm_config.json", "run/hf_model/value_head.safetensors", "run/hf_model/model.safetensors"]

CASES: list[FaultCase] = [
    FaultCase("fit/last-current-after-non-improving-epochs",
              "last.ckpt is the final epoch although the monitored metric stopped improving (top-k 1)", FIT, ARGS,
              lambda d: write_config(d, checkpoint={"save_top_k": 1, "monitor": "val/mse", "mode": "max"}),
              exit_code=0, check=check_last_is_current),
    FaultCase("fit/kill-mid-epoch", "SIGKILL mid-epoch; --ckpt_path last ends with the uninterrupted run's weights",
              run=kill_then_resume(fault("KillAt", epoch=1, batch=2), killed_mid_epoch,
                                   r"resuming from .*last\.ckpt \(epoch 0, global step 5\)"), exit_code=0),
    FaultCase("fit/kill-before-export", "SIGKILL after the last checkpoint, before the export; resume exports it",
              run=kill_then_resume(fault("KillAt", when="train_end"), killed_before_export,
                                   rf"resuming from .*\(epoch {EPOCHS - 1}, global step {FINAL_STEP}\)"), exit_code=0),
    FaultCase("fit/kill-during-export", "SIGKILL mid-export: the previous export stays whole; resume replaces it",
              run=kill_during_export, exit_code=0),
    FaultCase("fit/kill-during-checkpoint-write", "SIGKILL mid-write: the old last.ckpt loads; the half file is removed",
              run=kill_then_resume(fault("KillInCheckpointWrite", epoch=1), killed_in_checkpoint_write,
                                   r"removing .*\.partial: a checkpoint write that was killed",
                                   r"resuming from .*last\.ckpt \(epoch 0, global step 5\)"), exit_code=0),
    FaultCase("fit/truncated-checkpoints-fall-back", "truncated last.ckpt and newest epoch file named, skipped; "
              "resume from the next newest", FIT, [*ARGS, "--ckpt_path", "last"], corrupted_checkpoints("truncate"),
              exit_code=0, check=lambda d, out: (
                  expect(out, 0, r"skipping .*/last\.ckpt: does not load", rf"skipping .*/epoch={EPOCHS - 1}-step=",
                         r"resuming from .*epoch=1-step=10\.ckpt \(epoch 1, global step 10\)"),
                  matches_reference(d, out))),
    FaultCase("fit/no-valid-checkpoint", "every checkpoint empty: said in one line, trains from scratch (same model)",
              FIT, [*ARGS, "--ckpt_path", "last"], corrupted_checkpoints("empty"), exit_code=0,
              check=lambda d, out: (
                  expect(out, 0, r"skipping .*last\.ckpt: empty file \(0 bytes\)",
                         rf"--ckpt_path last: {EPOCHS + 1} checkpoint\(s\), none loads in .*; training from scratch"),
                  matches_reference(d, out))),
    FaultCase("fit/second-fit-refused", "a second fit into a directory a running fit holds: one line, exit 2",
              run=concurrent_fit, message=r"agentrm\.fit: error: .*/run/checkpoints is in use by another fit "
                                          r"\(pid \d+ on .*lock .*checkpoints\.lock\)"),
    FaultCase("fit/stale-lock-taken-over", "a lock left by a killed fit (dead pid, this host) is taken over with a note",
              FIT, ARGS, stale_lock(), exit_code=0,
              check=lambda d, out: (expect(out, 0, r"taking over the stale lock .*checkpoints\.lock \(pid \d+ is no "
                                                   r"longer running"), lock_taken_over(d, out))),
    FaultCase("fit/resume-keeps-another-runs-export", "resuming run A never replaces run B's export",
              FIT, [*ARGS, "--ckpt_path", "last"], reference_export(run_id="another-run", checkpoints=True),
              message=r"hf_model holds a model exported by run another-run, not by the run of .*last\.ckpt",
              intact=EXPORT_FILES),
    FaultCase("fit/malformed-json-line", "a JSONL line cut in the middle: path:line in one line, exit 2", FIT, ARGS,
              malformed_line, message=r"agentrm\.fit: error: .*train\.jsonl:5: field '<json>': invalid JSON"),
    FaultCase("fit/empty-train-file", "an empty training file: named in one line, exit 2", FIT, ARGS, data(""),
              message=r"agentrm\.fit: error: .*train\.jsonl"),
    FaultCase("fit/missing-train-file", "a training file that is not there: named in one line, exit 2", FIT, ARGS,
              data("<absent>", "missing.jsonl"), message=r"agentrm\.fit: error: .*missing\.jsonl"),
    FaultCase("fit/yaml-key-typo", "a mistyped YAML key: the key, its file and the closest names", FIT, ARGS,
              typo_in_yaml, message=r"agentrm\.fit: error: unknown key 'trainer\.max_epochz' \(in .*cfg\.yaml\); "
                                    r"did you mean 'trainer\.max_epochs'"),
    FaultCase("fit/sigterm-saves-and-resumes", "SIGTERM mid-epoch: last.ckpt saved, exit 143; resume finishes the run",
              run=sigterm_then_resume, exit_code=0),
    FaultCase("fit/crash-keeps-traceback", "a genuine crash is not dressed as a usage error: traceback, exit 1",
              FIT, ARGS, lambda d: write_config(d, callbacks=[fault("CrashAt")]), exit_code=1, check=crashed),
]
