"""DDP on two GPUs (NCCL): 2 x batch 4 trains like 1 x batch 8 (the CPU/gloo test, on real devices)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from agentrm.paths import PROJECT_ROOT
from tests.lit.test_ddp import DDP_TIMEOUT_S, epoch_metrics, fixed_length_trajectories, run_args, write_setup

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")


def fit_on_gpus(cfg, run, devices: int, batch_size: int) -> None:
    cmd = [sys.executable, "-m", "agentrm.fit", "--config", str(cfg), "--trainer.accelerator", "gpu",
           "--trainer.devices", str(devices), *(["--trainer.strategy", "ddp"] if devices > 1 else []),
           *run_args(run, batch_size)]
    # keep the caller's PYTHONPATH: on a bare lent machine it holds the carried packages and the tree's import
    # bootstrap (scripts/device_check.sh)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH")) if p)}
    env.pop("TRITON_INTERPRET", None)
    env.pop("MASTER_PORT", None)
    try:
        proc = subprocess.run(cmd, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True,
                              timeout=DDP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"GPU run hung (> {DDP_TIMEOUT_S}s)")
    assert proc.returncode == 0, proc.stderr[-5000:]


def test_two_gpus_match_one(tmp_path):
    cfg = write_setup(tmp_path, fixed_length_trajectories(32, 3, seed=1), fixed_length_trajectories(8, 3, seed=2),
                      epochs=2)
    one, two = tmp_path / "one", tmp_path / "two"
    fit_on_gpus(cfg, one, 1, 8)
    fit_on_gpus(cfg, two, 2, 4)
    for key in ("train/epoch_loss", "val/mse"):
        a, b = epoch_metrics(one, key), epoch_metrics(two, key)
        assert len(a) == len(b) == 2, (key, a, b)
        assert b == pytest.approx(a, rel=5e-3, abs=1e-4), key  # NCCL reduction order, TF32-free fp32
