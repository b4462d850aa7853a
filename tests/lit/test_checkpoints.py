"""Checkpoint checks, the newest-valid pick, atomic replacement and the run lock (in-process; the
kill-and-resume cases through the real command live in ``tests/faults/cases_fit.py``)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from agentrm.lit.checkpoints import (
    InvalidCheckpoint,
    finish_swap,
    inspect_checkpoint,
    newest_valid_checkpoint,
    replace_path,
    stale_partials,
    swapped_in,
)
from agentrm.lit.run_lock import RunLock, RunLocked, lock_path


def lightning_file(path, epoch: int, step: int) -> None:
    torch.save({"epoch": epoch, "global_step": step, "state_dict": {"w": torch.ones(64)},
                "callbacks": {"ExportHF": {"run_id": "r1"}}, "agentrm": {"saved_on": "validation"}}, path)


def test_inspect_reads_progress_and_names_what_is_wrong(tmp_path):
    good = tmp_path / "good.ckpt"
    lightning_file(good, 2, 15)
    info = inspect_checkpoint(good)
    assert (info.epoch, info.global_step, info.run_id, info.saved_on) == (2, 15, "r1", "validation")
    (tmp_path / "empty.ckpt").write_bytes(b"")
    with pytest.raises(InvalidCheckpoint, match=r"empty file \(0 bytes\)"):
        inspect_checkpoint(tmp_path / "empty.ckpt")
    (tmp_path / "cut.ckpt").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(InvalidCheckpoint, match="does not load .*truncated by a kill"):
        inspect_checkpoint(tmp_path / "cut.ckpt")
    torch.save({"w": torch.ones(2)}, tmp_path / "weights.ckpt")
    with pytest.raises(InvalidCheckpoint, match="not a Lightning checkpoint"):
        inspect_checkpoint(tmp_path / "weights.ckpt")
    (tmp_path / "shard.ckpt").mkdir()
    with pytest.raises(InvalidCheckpoint, match="directory without meta.pt"):
        inspect_checkpoint(tmp_path / "shard.ckpt")
    lightning_file(tmp_path / "shard.ckpt" / "meta.pt", 1, 7)  # an FSDP sharded checkpoint's loop state
    assert inspect_checkpoint(tmp_path / "shard.ckpt").global_step == 7


def test_newest_valid_skips_newer_broken_files_in_order(tmp_path):
    d = tmp_path / "ckpts"
    d.mkdir()
    for i, name in enumerate(["epoch=0.ckpt", "epoch=1.ckpt", "last.ckpt"]):
        lightning_file(d / name, i, 5 * (i + 1))
        os.utime(d / name, (1000 + i, 1000 + i))
    (d / "last.ckpt").write_bytes(b"")
    os.utime(d / "last.ckpt", (2000, 2000))
    (d / ".epoch=2.ckpt.partial").write_bytes(b"half")  # a killed write: never a candidate
    info, skipped = newest_valid_checkpoint([d])
    assert info.path.name == "epoch=1.ckpt"
    assert [(p.name, why) for p, why in skipped] == [("last.ckpt", "empty file (0 bytes)")]
    assert [p.name for p in stale_partials([d])] == [".epoch=2.ckpt.partial"]
    assert newest_valid_checkpoint([tmp_path / "nothing"]) == (None, [])


def test_replace_path_swaps_directories_whole(tmp_path):
    old, new = tmp_path / "hf_model", tmp_path / ".hf_model.partial-x"
    old.mkdir()
    (old / "a").write_text("old")
    new.mkdir()
    (new / "b").write_text("new")
    replace_path(new, old)
    assert sorted(p.name for p in old.iterdir()) == ["b"] and not new.exists()
    assert not (tmp_path / ".hf_model.old").exists()


def test_a_swap_killed_half_way_is_finished_by_the_next_run(tmp_path):
    target, old = tmp_path / "hf_model", tmp_path / ".hf_model.old"
    old.mkdir()
    (old / "a").write_text("previous export")  # killed after the first rename: the target is missing
    assert "restored" in finish_swap(target) and (target / "a").read_text() == "previous export"
    old.mkdir()  # killed after the second rename: the new target is in place, the old one still beside it
    assert "removed" in finish_swap(target) and not old.exists() and target.is_dir()
    assert finish_swap(target) is None
    ckpts = tmp_path / "ckpts"
    (ckpts / ".last.ckpt.old").mkdir(parents=True)  # a sharded checkpoint directory mid-swap
    assert swapped_in([ckpts]) == [ckpts / "last.ckpt"]


def test_run_lock_refuses_a_live_owner_and_takes_over_a_dead_one(tmp_path):
    run = tmp_path / "run" / "checkpoints"
    notes: list[str] = []
    with RunLock([run], note=notes.append):
        owner = json.loads(lock_path(run.resolve()).read_text())
        assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
        with pytest.raises(RunLocked, match=rf"checkpoints is in use by another fit \(pid {os.getpid()} on "):
            RunLock([run]).__enter__()
        assert lock_path(run.resolve()).exists()  # the refused one did not remove it
    assert not lock_path(run.resolve()).exists()

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock_path(run).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    with RunLock([run], note=notes.append):
        pass
    assert notes and f"pid {dead.pid} is no longer running" in notes[-1]

    lock_path(run).write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "t"}))
    with pytest.raises(RunLocked, match=r"in use by a fit on host elsewhere .*delete .*checkpoints\.lock"):
        RunLock([run]).__enter__()


def test_run_lock_takes_all_or_none(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    lock_path(b).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.ctime()}))
    with pytest.raises(RunLocked):
        RunLock([a, b]).__enter__()
    assert not lock_path(a).exists()  # the lock it took before the refusal is given back


@pytest.mark.parametrize("configs", [["tiny/value_rm.yaml"], ["tiny/implicit_prm.yaml"], ["smollm2/policy_sft.yaml"],
                                     ["recipes/value_rm.yaml", "recipes/full.yaml", "models/llama3-8b.yaml"],
                                     ["recipes/implicit_prm.yaml", "recipes/qlora.yaml", "models/qwen2.5-7b.yaml"]],
                         ids=lambda c: "+".join(c))
def test_shipped_configs_run_their_checkpoints_as_resumable(configs):
    """``agentrm.fit`` turns each config's ModelCheckpoint into a ResumableCheckpoint (parsed, nothing built)."""
    from agentrm.fit import RESUMABLE
    from agentrm.lit.checkpoints import ResumableCheckpoint
    from agentrm.lit.cli import parse_fit_config
    from agentrm.paths import PROJECT_ROOT

    config = parse_fit_config([a for c in configs for a in ("--config", str(PROJECT_ROOT / "configs" / c))])
    ckpts = [cb for cb in config["trainer.callbacks"] if cb.class_path == RESUMABLE]
    assert len(ckpts) == 1, config["trainer.callbacks"]
    built = ResumableCheckpoint(**vars(ckpts[0].init_args))
    assert built.save_last is True and built.dirpath.endswith("checkpoints")


def test_of_two_checkpoint_callbacks_in_one_directory_only_the_first_writes_last(tmp_path):
    """Two selection rules of one run (each keeping its best epoch) share a directory: one last.ckpt, not a copy."""
    import yaml

    from agentrm.fit import RESUMABLE
    from agentrm.lit.checkpoints import ResumableCheckpoint
    from agentrm.lit.cli import parse_fit_config
    from agentrm.paths import PROJECT_ROOT

    extra = tmp_path / "callbacks.yaml"
    ckpt = "lightning.pytorch.callbacks.ModelCheckpoint"
    extra.write_text(yaml.safe_dump({"trainer": {"callbacks": [
        {"class_path": ckpt, "init_args": {"dirpath": str(tmp_path / "a"), "monitor": "val/auroc", "mode": "max"}},
        {"class_path": ckpt, "init_args": {"dirpath": str(tmp_path / "a"), "monitor": "val/mse"}},
        {"class_path": ckpt, "init_args": {"dirpath": str(tmp_path / "b"), "monitor": "val/mse"}},
    ]}}))
    config = parse_fit_config(["--config", str(PROJECT_ROOT / "configs/tiny/value_rm.yaml"), "--config", str(extra)])
    built = [ResumableCheckpoint(**vars(cb.init_args)) for cb in config["trainer.callbacks"] if cb.class_path == RESUMABLE]
    assert [(Path(b.dirpath).name, b.save_last) for b in built] == [("a", True), ("a", False), ("b", True)]
