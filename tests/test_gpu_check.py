"""``bench/gpu_check.py`` without a GPU: the one-line refusal, the target arithmetic and the RESULTS.md block."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

from agentrm.paths import PROJECT_ROOT

SCRIPT = PROJECT_ROOT / "bench" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_without_cuda_it_says_so_in_one_line_and_fails():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(SCRIPT)], cwd=PROJECT_ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "CUDA is needed" in lines[0], proc.stdout + proc.stderr


def _rows(gpu_check, eager_mb: float, triton_mb: float, eager_ms: float, triton_ms: float, scoring_ms: float):
    rows = []
    for n in gpu_check.TRAINING_TOKENS:
        for mode in ("fwd", "fwd+bwd"):
            rows.append(dict(op="step_logratio", tokens=n, mode=mode, backend="eager", peak_mb=eager_mb,
                             median_ms=eager_ms, floor_ms=1.0, status="ok"))
            rows.append(dict(op="step_logratio", tokens=n, mode=mode, backend="triton", peak_mb=triton_mb,
                             median_ms=triton_ms, floor_ms=1.0, status="ok"))
    for n in gpu_check.SCORING_TOKENS:
        rows.append(dict(op="step_logratio", tokens=n, mode="fwd", backend="triton", peak_mb=1.0,
                         median_ms=scoring_ms, floor_ms=0.3, status="ok"))
    return rows


def test_targets_met_and_missed(gpu_check):
    good = gpu_check.check_targets(_rows(gpu_check, 4000, 100, 30, 10, 0.4), 3e12, 3.35e12)
    assert len(good) == 3 * len(gpu_check.TRAINING_TOKENS) + len(gpu_check.SCORING_TOKENS)
    assert all(met for _, _, met in good), good
    assert any("40.0x" in value for _, value, _ in good) and any("3.00x" in value for _, value, _ in good)
    bad = gpu_check.check_targets(_rows(gpu_check, 500, 100, 30, 20, 0.6), 3e12, 3.35e12)
    missed = [name for name, _, met in bad if not met]
    assert len(missed) == len(bad)  # 5x memory, 1.5x speed, 2x the floor: all below target
    partial = [r for r in _rows(gpu_check, 4000, 100, 30, 10, 0.4) if r["backend"] != "triton"]
    assert not any(met for _, _, met in gpu_check.check_targets(partial, 3e12, 3.35e12))  # OOM/missing rows


def test_results_block_replaces_the_previous_one(gpu_check, tmp_path):
    meta = dict(timestamp="T", device_name="NVIDIA H100 80GB HBM3", torch="2.x", triton="3.x",
                transformers="5.x", liger="not installed", commit="abc1234", bandwidth=3.0e12)
    rows = _rows(gpu_check, 4000, 100, 30, 10, 0.4)
    targets = gpu_check.check_targets(rows, 3e12, 3.35e12)
    md = tmp_path / "RESULTS.md"
    md.write_text("# Kernels\n\nCPU figures.\n")
    gpu_check.write_results(gpu_check.results_block(meta, (True, "9 passed"), rows, targets, 3.35e12), md)
    first = md.read_text()
    assert first.startswith("# Kernels\n\nCPU figures.") and "NVIDIA H100" in first and "abc1234" in first
    assert first.count("| step_logratio |") == len(rows)
    meta["commit"] = "def5678"
    gpu_check.write_results(gpu_check.results_block(meta, (False, "1 failed"), rows, targets, 3.35e12), md)
    second = md.read_text()
    assert second.count(gpu_check.BEGIN) == 1 and "def5678" in second and "abc1234" not in second
    assert "FAILED: 1 failed" in second
