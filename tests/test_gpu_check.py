"""``bench/gpu_check.py`` without a GPU: the one-line refusal, the plan, the target arithmetic, the JUnit
summary (skipped tests listed as not run), the RESULTS.md block and ``--apply`` of a lent machine's files."""

from __future__ import annotations

import csv
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


def _row(gpu_check, n, mode, backend, ms, mb, label="llama3", vocab=None, dtype="bfloat16", status="ok", floor=1.0):
    return dict(op="step_logratio", label=label, tokens=n, hidden=gpu_check.H, vocab=vocab or gpu_check.V, steps=1,
                dtype=dtype, mode=mode, backend=backend, peak_mb=mb, median_ms=ms, floor_ms=floor, status=status)


def _rows(gpu_check, eager_mb: float, triton_mb: float, eager_ms: float, triton_ms: float, scoring_ms: float):
    rows = []
    for n in gpu_check.TRAINING_TOKENS:
        for mode in ("fwd", "fwd+bwd"):
            rows.append(_row(gpu_check, n, mode, "eager", eager_ms, eager_mb))
            rows.append(_row(gpu_check, n, mode, "triton", triton_ms, triton_mb))
    for n in gpu_check.SCORING_TOKENS:
        rows.append(_row(gpu_check, n, "fwd", "triton", scoring_ms, 1.0, floor=0.3))
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
    # rows of another case (same N, mode and backend) never stand in for the Llama-3 ones
    other = [dict(r, label="fp16") for r in _rows(gpu_check, 4000, 100, 30, 10, 0.4)]
    assert not any(met for _, _, met in gpu_check.check_targets(other, 3e12, 3.35e12))


def test_plan_covers_the_issue_and_reports_missing_peers(gpu_check):
    bk = gpu_check._bench_kernels()
    plan = gpu_check.sweep_plan(bk)
    by_label = {}
    for spec in plan:
        by_label.setdefault(spec["case"]["label"], set()).add((spec["mode"], spec["backend"]))
    assert {"llama3", "vocab-SmolLM2", "vocab-Qwen2.5", "vocab-Gemma 3", "fp16", "fp32-hidden-bf16-head"} <= set(by_label)
    assert ("fwd+bwd", "triton-nofilter") in by_label["vocab-Gemma 3"]
    assert ("fwd", "triton-nofilter") not in by_label["llama3"]  # the filter acts in the backward only
    assert not any(b in ("liger", "cce") for _, b in by_label["fp32-hidden-bf16-head"])  # peers take one dtype
    # a peer that is not installed is a row reporting so, not a silent gap
    res = bk.run_cuda_case({"case": plan[0]["case"], "mode": "fwd", "backend": "liger"}) \
        if not bk.peers().available("liger") else {"status": "not installed"}
    assert res["status"] == "not installed"


def test_rows_past_the_budget_are_reported_as_not_run(gpu_check):
    rows = gpu_check.run_sweep(gpu_check._bench_kernels(), {}, 3e12, budget_s=-1.0)
    assert len(rows) == len(gpu_check.sweep_plan(gpu_check._bench_kernels()))
    assert {r["status"] for r in rows} == {"not run (time budget)"}


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
<testcase classname="tests.gpu.test_kernels_gpu" name="test_a[bf16]" time="1.0"/>
<testcase classname="tests.gpu.test_quantized_loading" name="test_nf4" time="0.0">
  <skipped type="pytest.skip" message="needs bitsandbytes: pip install 'agentrm[quant]'">...</skipped></testcase>
<testcase classname="tests.gpu.test_deepspeed_gpu" name="test_zero3[value_rm]" time="9.0">
  <failure message="boom">trace</failure></testcase>
</testsuite></testsuites>"""


def test_junit_summary_lists_skipped_tests_as_not_run(gpu_check, tmp_path):
    path = tmp_path / "gpu_tests.xml"
    path.write_text(JUNIT)
    counts, skipped, failed = gpu_check.parse_junit(path)
    assert counts == {"passed": 1, "failed": 1, "skipped": 1}
    assert skipped == [("tests/gpu/test_quantized_loading.py::test_nf4", "needs bitsandbytes: pip install 'agentrm[quant]'")]
    assert failed == ["tests/gpu/test_deepspeed_gpu.py::test_zero3[value_rm]"]


def _meta():
    return dict(timestamp="T", device_name="NVIDIA H100 80GB HBM3", torch="2.x", triton="3.x", transformers="5.x",
                packages="liger-kernel not installed", commit="abc1234", bandwidth=3.0e12)


def test_results_block_replaces_the_previous_one(gpu_check, tmp_path):
    rows = _rows(gpu_check, 4000, 100, 30, 10, 0.4)
    rows += [_row(gpu_check, 4096, "fwd+bwd", "triton", 8.0, 90, label="vocab-Gemma 3", vocab=262144),
             _row(gpu_check, 4096, "fwd+bwd", "triton-nofilter", 10.0, 90, label="vocab-Gemma 3", vocab=262144),
             _row(gpu_check, 4096, "fwd+bwd", "liger", float("nan"), float("nan"), label="vocab-Gemma 3",
                  vocab=262144, status="not installed")]
    targets = gpu_check.check_targets(rows, 3e12, 3.35e12)
    not_run = (("tests/gpu/test_quantized_loading.py::test_nf4", "needs bitsandbytes"),)
    md = tmp_path / "RESULTS.md"
    md.write_text("# Kernels\n\nCPU figures.\n")
    report = gpu_check.GpuTestReport(True, "30 passed, 0 failed, 1 not run (100 s)", not_run)
    gpu_check.write_results(gpu_check.results_block(_meta(), report, rows, targets, 3.35e12), md)
    first = md.read_text()
    assert first.startswith("# Kernels\n\nCPU figures.") and "NVIDIA H100" in first and "abc1234" in first
    assert "* not run: `tests/gpu/test_quantized_loading.py::test_nf4`: needs bitsandbytes" in first
    assert "| vocab-Gemma 3 | fwd+bwd | 4096 | 262144 | bfloat16 |" in first and "not installed" in first
    assert "| vocab-Gemma 3 | 4096 | 262144 | bfloat16 | 10.00 | 8.00 | 1.25x |" in first  # the filter's table
    assert first.count("| llama3 |") == 2 * len(gpu_check.TRAINING_TOKENS) + len(gpu_check.SCORING_TOKENS)
    meta = dict(_meta(), commit="def5678")
    gpu_check.write_results(gpu_check.results_block(meta, gpu_check.GpuTestReport(False, "1 failed"), rows,
                                                    targets, 3.35e12), md)
    second = md.read_text()
    assert second.count(gpu_check.BEGIN) == 1 and "def5678" in second and "abc1234" not in second
    assert "FAILED: 1 failed" in second


def test_apply_copies_a_lent_machines_files(gpu_check, tmp_path, monkeypatch):
    bk = gpu_check._bench_kernels()
    out = tmp_path / "from_device"
    out.mkdir()
    rows = [dict(_row(gpu_check, 4096, "fwd+bwd", "triton", 8.0, 90), timestamp="T", device="cuda")]
    bk.append_csv(out / gpu_check.OUT_FILES["csv"], rows)
    block = gpu_check.results_block(_meta(), gpu_check.GpuTestReport(True, "ok"), rows, [], 3.35e12)
    (out / gpu_check.OUT_FILES["block"]).write_text(block + "\n")
    md, kcsv = tmp_path / "RESULTS.md", tmp_path / "kernels.csv"
    md.write_text(f"# Kernels\n\n{gpu_check.BEGIN}\nPending.\n{gpu_check.END}\n")
    with open(kcsv, "w", newline="") as f:  # a file from before the label / weight_dtype columns
        w = csv.writer(f)
        old_fields = bk.CSV_FIELDS[:-2]
        w.writerow(old_fields)
        w.writerow(["old"] * len(old_fields))
    monkeypatch.setattr(gpu_check, "RESULTS_MD", md)
    monkeypatch.setattr(bk, "DEFAULT_CSV", kcsv)
    assert gpu_check.apply(out, bk) == 0
    assert "Pending." not in md.read_text() and "abc1234" in md.read_text()
    got = list(csv.DictReader(open(kcsv)))
    assert [r["timestamp"] for r in got] == ["old", "T"] and got[0]["label"] == "" and got[1]["label"] == "llama3"
    assert gpu_check.apply(tmp_path / "nothing_here", bk) == 2
