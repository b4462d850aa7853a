"""GPU readiness in one command: ``python bench/gpu_check.py`` (on a bare lent machine: ``bash scripts/device_check.sh``).

1. the GPU tests (``pytest -m gpu tests/gpu``: kernel parity at Llama-3-8B shapes and at the vocabularies of
   other real models in bf16 / fp16 / fp32-hidden with a bf16 head, scoring under sdpa / flash-attention,
   nf4 / int8 loading and QLoRA steps, DeepSpeed ZeRO-3 steps at world size 1, 2-GPU DDP when two GPUs are
   present). Tests skipped for a missing package or device are listed as not run, never counted as passed;
2. the kernel sweep (:func:`sweep_plan`): our Triton kernels with and without the backward's gradient filter,
   side by side with eager ``log_softmax + gather``, the chunked torch path, Liger-Kernel's and Cut
   Cross-Entropy's fused linear cross-entropy run per token (rows "not installed" when missing), at
   V = 128,256 (Llama 3), 49,152 (SmolLM2), 151,936 (Qwen2.5), 262,144 (Gemma 3), bf16, fp16 and fp32 hidden
   states with a bf16 ``lm_head``; rows past the time budget are reported as not run;
3. the targets: peak memory >= 10x below eager at V = 128k; forward+backward >= 2x eager speed; no-grad
   scoring (N = 64 and 512 tokens) within 1.5x of the HBM-bandwidth floor for reading ``lm_head`` and the
   hidden states once (bandwidth measured with a device-to-device copy; the nominal figure is printed too).

Writes the results block (device, versions, commit) into ``bench/RESULTS.md`` between the ``gpu_check``
markers and appends the sweep rows to ``bench/results/kernels.csv``; with ``--out DIR`` also the block,
the sweep CSV and the pytest log and JUnit XML into DIR (what a lent machine sends back), and
``--apply DIR`` copies such a block and CSV into this checkout. ``--dry-run`` (no GPU needed) lists every
test and sweep row the run would do. Exits 1 when a test fails or a target is missed, 2 with a one-line
message when no CUDA device is visible.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import importlib.util
import os
import re
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, NamedTuple

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS_MD = ROOT / "bench" / "RESULTS.md"
BEGIN, END = "<!-- gpu_check:begin -->", "<!-- gpu_check:end -->"
H, V, DTYPE = 4096, 128256, "bfloat16"
OTHER_VOCABS = {49152: "SmolLM2", 151936: "Qwen2.5", 262144: "Gemma 3"}  # beside 128,256 (Llama 3)
SCORING_TOKENS = (64, 512)
TRAINING_TOKENS = (4096, 8192)
TARGET_MEMORY, TARGET_SPEED, TARGET_FLOOR = 10.0, 2.0, 1.5
GPU_TESTS = ("tests/gpu",)
NO_CUDA = "gpu_check: CUDA is needed: torch {} sees no CUDA device; nothing was run."
# import name -> what is not run without it
OPTIONAL = {
    "jsonargparse": "every `python -m agentrm.fit` run: DeepSpeed ZeRO-3 and 2-GPU DDP tests",
    "deepspeed": "the DeepSpeed ZeRO-3 tests",
    "bitsandbytes": "the nf4 / int8 tests",
    "liger_kernel": "the sweep's liger rows",
    "cut_cross_entropy": "the sweep's cce rows",
    "xdist": "nothing (GPU tests run one at a time instead of in parallel)",
}
OUT_FILES = {"log": "pytest.log", "junit": "gpu_tests.xml", "csv": "sweep.csv", "block": "results_block.md"}


def _bench_kernels():
    spec = importlib.util.spec_from_file_location("bench_kernels", ROOT / "bench" / "bench_kernels.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


# ------------------------------------------------------------------------------------------------------
# the plan
# ------------------------------------------------------------------------------------------------------
def _case(label: str, tokens: int, vocab: int = V, dtype: str = DTYPE, weight_dtype: str | None = None,
          steps: int | None = None, op: str = "step_logratio") -> dict[str, Any]:
    c = dict(label=label, op=op, tokens=tokens, hidden=H, vocab=vocab, dtype=dtype,
             steps=steps if steps is not None else max(1, tokens // 64))
    if weight_dtype:
        c["weight_dtype"] = weight_dtype
    return c


def sweep_cases() -> list[tuple[dict[str, Any], tuple[str, ...]]]:
    """``(case, modes)`` in run order; the label groups rows (``llama3`` rows carry the targets)."""
    cases = [(_case("llama3", n, steps=max(1, n // 16)), ("fwd",)) for n in SCORING_TOKENS]
    cases += [(_case("llama3", n), ("fwd", "fwd+bwd")) for n in TRAINING_TOKENS]
    cases += [(_case(f"vocab-{OTHER_VOCABS[v]}", 4096, vocab=v), ("fwd+bwd",)) for v in OTHER_VOCABS]
    cases.append((_case("fp16", 4096, dtype="float16"), ("fwd+bwd",)))
    cases.append((_case("fp32-hidden-bf16-head", 4096, dtype="float32", weight_dtype=DTYPE), ("fwd", "fwd+bwd")))
    cases.append((_case("values", 8192, vocab=0, steps=128, op="step_values"), ("fwd+bwd",)))
    return cases


def sweep_plan(bk) -> list[dict[str, Any]]:
    """Every sweep row: ``{"case", "mode", "backend"}``; peers are planned whether installed or not. The
    chunked torch path (the CPU path) runs in the Llama-3 group only."""
    return [{"case": case, "mode": mode, "backend": backend}
            for case, modes in sweep_cases() for mode in modes
            for backend in bk.backends_for(case["op"], "cuda", case, mode, include_missing=True)
            if backend != "chunked" or case["label"] == "llama3"]


def describe(spec: dict[str, Any]) -> str:
    c = spec["case"]
    dtype = c["dtype"] + (f"/{c['weight_dtype']}" if c.get("weight_dtype") else "")
    return (f"{c['op']:<13} {spec['mode']:<7} N={c['tokens']:<5} H={c['hidden']} V={c['vocab']:<6} "
            f"{dtype:<17} {spec['backend']:<15} [{c['label']}]")


# ------------------------------------------------------------------------------------------------------
# the GPU tests
# ------------------------------------------------------------------------------------------------------
class GpuTestReport(NamedTuple):
    ok: bool
    summary: str
    not_run: tuple[tuple[str, str], ...] = ()  # (test id, reason) of every skipped test


def test_command(collect_only: bool = False, junit: Path | None = None, workers: int = 0) -> list[str]:
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-m", "gpu", *GPU_TESTS]
    if collect_only:
        return cmd + ["--collect-only", "-q"]
    cmd += ["-v", "-rs"]
    if importlib.util.find_spec("pytest_timeout") is not None:
        cmd += ["--timeout", "200"]
    if workers > 1 and importlib.util.find_spec("xdist") is not None:
        cmd += ["-n", str(workers), "--dist", "loadfile"]
    return cmd + ([f"--junitxml={junit}"] if junit else [])


def _test_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled kernels on the GPU
    env["PYTHONUNBUFFERED"] = "1"
    return env


def parse_junit(path: Path) -> tuple[dict[str, int], list[tuple[str, str]], list[str]]:
    """``(counts, skipped (id, reason), failed ids)`` from pytest's JUnit XML."""
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    skipped, failed = [], []
    for tc in ET.parse(path).getroot().iter("testcase"):
        tid = f"{tc.get('classname', '').replace('.', '/')}.py::{tc.get('name')}"
        if tc.find("skipped") is not None:
            counts["skipped"] += 1
            skipped.append((tid, (tc.find("skipped").get("message") or "").strip()))
        elif tc.find("failure") is not None or tc.find("error") is not None:
            counts["failed"] += 1
            failed.append(tid)
        else:
            counts["passed"] += 1
    return counts, skipped, failed


def run_gpu_tests(out: Path, timeout_s: float, workers: int) -> GpuTestReport:
    """Run the GPU tests; log and JUnit XML into ``out``. A run past ``timeout_s`` is stopped and FAILED."""
    t = time.perf_counter()
    log, junit = out / OUT_FILES["log"], out / OUT_FILES["junit"]
    cmd = test_command(junit=junit, workers=workers)
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=_test_env(), stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return GpuTestReport(False, f"stopped after {timeout_s:.0f} s (time budget); see {log.name}")
    took = time.perf_counter() - t
    tail = log.read_text().strip().splitlines()[-1:] or ["(no output)"]
    if not junit.exists():
        return GpuTestReport(False, f"pytest exited {rc} without a report: {tail[0].strip('= ')} ({took:.0f} s)")
    counts, skipped, failed = parse_junit(junit)
    summary = (f"{counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} not run "
               f"({took:.0f} s)" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return GpuTestReport(rc == 0 and not failed, summary, tuple(skipped))


# ------------------------------------------------------------------------------------------------------
# the sweep and the targets
# ------------------------------------------------------------------------------------------------------
def measured_bandwidth() -> float:
    """Device-to-device copy bandwidth (bytes/s): read + write of a 1 GiB buffer."""
    import triton.testing

    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=10, rep=50, return_mode="median")
    return 2 * src.numel() / (ms * 1e-3)


def run_sweep(bk, meta: dict[str, Any], bandwidth: float, budget_s: float) -> list[dict[str, Any]]:
    rows, start = [], time.perf_counter()
    for spec in sweep_plan(bk):
        case, mode = spec["case"], spec["mode"]
        if time.perf_counter() - start > budget_s:
            res = {"median_ms": float("nan"), "peak_mb": float("nan"), "status": "not run (time budget)"}
        else:
            res = bk.run_cuda_case(spec)
        floor_ms = bk.input_bytes(case) / bandwidth * 1e3 * (1 if mode == "fwd" else 2)
        rows.append({**meta, **case, "mode": mode, "backend": spec["backend"], "floor_ms": floor_ms, **res})
        print(f"  {describe(spec)} {res['median_ms']:9.3f} ms {res['peak_mb']:9.1f} MB  {res['status']}", flush=True)
    return rows


def _row(rows, op: str, n: int, mode: str, backend: str, label: str = "llama3") -> dict[str, Any] | None:
    return next((r for r in rows if (r["op"], r["tokens"], r["mode"], r["backend"]) == (op, n, mode, backend)
                 and r.get("label", "llama3") == label and r["status"] == "ok"), None)


def check_targets(rows: list[dict[str, Any]], bandwidth: float, nominal_bw: float) -> list[tuple[str, str, bool]]:
    """``(target, measured, met)`` rows; a target whose rows are missing (OOM, error) counts as missed."""
    out = []
    for n in TRAINING_TOKENS:
        for mode in ("fwd", "fwd+bwd"):
            e, t = _row(rows, "step_logratio", n, mode, "eager"), _row(rows, "step_logratio", n, mode, "triton")
            ratio = e["peak_mb"] / t["peak_mb"] if e and t and t["peak_mb"] > 0 else float("nan")
            out.append((f"peak memory eager/triton >= {TARGET_MEMORY:g}x (V=128k, N={n}, {mode})",
                        f"{ratio:.1f}x", ratio >= TARGET_MEMORY))
        e, t = _row(rows, "step_logratio", n, "fwd+bwd", "eager"), _row(rows, "step_logratio", n, "fwd+bwd", "triton")
        ratio = e["median_ms"] / t["median_ms"] if e and t else float("nan")
        out.append((f"fwd+bwd speed eager/triton >= {TARGET_SPEED:g}x (N={n})", f"{ratio:.2f}x", ratio >= TARGET_SPEED))
    for n in SCORING_TOKENS:
        t = _row(rows, "step_logratio", n, "fwd", "triton")
        ratio = t["median_ms"] / t["floor_ms"] if t else float("nan")
        nominal = ratio * nominal_bw / bandwidth  # the same time against the nominal-bandwidth floor
        out.append((f"no-grad scoring time / HBM floor <= {TARGET_FLOOR:g}x (N={n})",
                    f"{ratio:.2f}x measured-bandwidth floor ({nominal:.2f}x nominal)", ratio <= TARGET_FLOOR))
    return out


def _cell(r: dict[str, Any] | None) -> str:
    if r is None:
        return "–"
    if r["status"] != "ok":
        return r["status"]
    return f"{r['median_ms']:.2f} ms / {r['peak_mb']:.0f} MB"


def sweep_tables(rows: list[dict[str, Any]]) -> list[str]:
    """Backends side by side per case (``ms / peak MB``), and the gradient filter's effect."""
    out = []
    for op, backends in (("step_logratio", ("eager", "chunked", "triton", "triton-nofilter", "liger", "cce")),
                         ("step_values", ("eager", "gather", "triton"))):
        keys = list(dict.fromkeys((r["label"], r["mode"], r["tokens"], r["vocab"], r["dtype"],
                                   r.get("weight_dtype", "")) for r in rows if r["op"] == op))
        if not keys:
            continue
        out += ["", f"`{op}`, H = {H}: median time / peak extra memory per backend", "",
                "| case | mode | N | V | dtype | " + " | ".join(backends) + " |",
                "|---|---|---:|---:|---|" + "---|" * len(backends)]
        for label, mode, n, v, dtype, wdt in keys:
            cells = [_cell(next((r for r in rows if (r["label"], r["mode"], r["tokens"], r["vocab"], r["dtype"],
                                                     r.get("weight_dtype", "")) == (label, mode, n, v, dtype, wdt)
                                 and r["backend"] == b), None)) for b in backends]
            dt_name = dtype + (f" / {wdt} head" if wdt else "")
            out.append(f"| {label} | {mode} | {n} | {v or '–'} | {dt_name} | " + " | ".join(cells) + " |")
    pairs = [(r, next((x for x in rows if x["backend"] == "triton-nofilter" and x["status"] == "ok"
                       and all(x[k] == r[k] for k in ("label", "mode", "tokens", "vocab", "dtype"))), None))
             for r in rows if r["backend"] == "triton" and r["mode"] == "fwd+bwd" and r["status"] == "ok"]
    pairs = [(r, x) for r, x in pairs if x is not None]
    if pairs:
        out += ["", "Gradient filter (fwd+bwd): time without / with", "", "| case | N | V | dtype | without ms | "
                "with ms | speed-up |", "|---|---:|---:|---|---:|---:|---:|"]
        out += [f"| {r['label']} | {r['tokens']} | {r['vocab']} | {r['dtype']} | {x['median_ms']:.2f} | "
                f"{r['median_ms']:.2f} | {x['median_ms'] / r['median_ms']:.2f}x |" for r, x in pairs]
    return out


def results_block(meta: dict[str, Any], tests: GpuTestReport, rows, targets, nominal_bw: float) -> str:
    lines = [BEGIN, "", f"Run {meta['timestamp']} on **{meta['device_name']}** (torch {meta['torch']}, "
             f"triton {meta['triton']}, transformers {meta['transformers']}; {meta.get('packages', '')}), "
             f"commit `{meta['commit']}`. Command: `bash scripts/device_check.sh` "
             "(`python bench/gpu_check.py` where everything is installed).", "",
             f"* GPU tests (`pytest -m gpu tests/gpu`): {'passed' if tests.ok else 'FAILED'}: {tests.summary}",
             f"* HBM bandwidth: {meta['bandwidth'] / 1e12:.2f} TB/s measured (1 GiB device copy), "
             f"{nominal_bw / 1e12:.2f} TB/s nominal"]
    lines += [f"* not run: `{tid}`: {reason}" for tid, reason in tests.not_run]
    skipped_rows = [r for r in rows if r["status"] != "ok"]
    if skipped_rows:
        lines.append(f"* sweep rows not run or failed: {len(skipped_rows)} of {len(rows)} (statuses in the tables)")
    lines += sweep_tables(rows)
    if targets:
        lines += ["", "| target | measured | met |", "|---|---|---|"]
        lines += [f"| {name} | {value} | {'yes' if met else '**no**'} |" for name, value, met in targets]
    return "\n".join([*lines, "", END])


def write_results(block: str, path: Path | None = None) -> None:
    """Replace the block between the markers in ``path`` (default ``bench/RESULTS.md``), or append one."""
    path = path or RESULTS_MD
    text = path.read_text()
    if BEGIN in text and END in text:
        text = re.sub(re.escape(BEGIN) + r".*?" + re.escape(END), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n## GPU check (`bash scripts/device_check.sh`)\n\n" + block + "\n"
    path.write_text(text)


def apply(out: Path, bk) -> int:
    """Copy a lent machine's results (``--out`` files fetched here) into RESULTS.md and the CSV."""
    block, sweep = out / OUT_FILES["block"], out / OUT_FILES["csv"]
    if not block.exists():
        print(f"gpu_check: {block} not found (was the run's --out folder fetched?)")
        return 2
    write_results(block.read_text().strip())
    print(f"wrote {RESULTS_MD}")
    if sweep.exists():
        with open(sweep) as f:
            rows = list(csv.DictReader(f))
        bk.append_csv(bk.DEFAULT_CSV, rows)
        print(f"appended {len(rows)} rows to {bk.DEFAULT_CSV}")
    return 0


# ------------------------------------------------------------------------------------------------------
# dry run and main
# ------------------------------------------------------------------------------------------------------
def dry_run(bk, budget_s: float) -> int:
    """Print every GPU test and sweep row; exit status of the test collection (a collection error fails)."""
    print(f"# gpu_check dry run: python {sys.version.split()[0]}, torch {torch.__version__}, triton "
          f"{bk.triton_version()}, CUDA visible: {torch.cuda.is_available()}")
    import agentrm.kernels

    import agentrm

    finder = next(((f if isinstance(f, type) else type(f)).__name__ for f in sys.meta_path
                   if hasattr(f, "find_spec") and f.find_spec("agentrm.kernels", None) is not None), "?")
    print(f"# agentrm from {Path(agentrm.__file__).parent}, agentrm.kernels from "
          f"{Path(agentrm.kernels.__file__).parent} (found by {finder})")
    print("# optional packages (what does not run without them):")
    for name, what in OPTIONAL.items():
        found = importlib.util.find_spec(name) is not None
        print(f"  {name:<18} {'present' if found else 'MISSING: not run: ' + what}")
    cmd = test_command(collect_only=True)
    print(f"# GPU tests: {' '.join(test_command()[2:])}")
    proc = subprocess.run(cmd, cwd=ROOT, env=_test_env(), capture_output=True, text=True)
    print(proc.stdout.rstrip())
    if proc.returncode != 0:
        print(proc.stderr[-4000:], file=sys.stderr)
        print(f"gpu_check: collecting the GPU tests failed (exit {proc.returncode})")
        return 1
    plan = sweep_plan(bk)
    print(f"# kernel sweep: {len(plan)} rows, time budget {budget_s:.0f} s (rows past it are reported as not run)")
    for spec in plan:
        print(f"  {describe(spec)}")
    print("# targets:")
    for name, _, _ in check_targets([], 1.0, 1.0):
        print(f"  {name}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="list the tests and sweep rows; needs no GPU")
    p.add_argument("--skip-tests", action="store_true", help="only the kernel sweep")
    p.add_argument("--skip-sweep", action="store_true", help="only the GPU tests")
    p.add_argument("--no-write", action="store_true", help="do not touch bench/RESULTS.md or the CSV")
    p.add_argument("--out", type=Path, help="also write the log, JUnit XML, sweep CSV and results block here")
    p.add_argument("--apply", type=Path, metavar="DIR", help="copy a run's --out files into RESULTS.md / CSV")
    p.add_argument("--budget-s", type=float, default=150.0, help="sweep time budget (s)")
    p.add_argument("--tests-timeout-s", type=float, default=240.0, help="GPU tests time limit (s)")
    p.add_argument("--workers", type=int, default=3, help="parallel pytest workers when pytest-xdist is present")
    a = p.parse_args(argv)
    bk = _bench_kernels()
    if a.apply:
        return apply(a.apply, bk)
    if a.dry_run:
        return dry_run(bk, a.budget_s)
    if not torch.cuda.is_available():
        print(NO_CUDA.format(torch.__version__))
        return 2
    import transformers

    out = a.out or Path(os.environ.get("TMPDIR", "/tmp")) / "agentrm_gpu_check"
    out.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name()
    nominal_bw = bk.hbm_bandwidth(name)
    pkgs = ", ".join(f"{d} {_version(d) or 'not installed'}" for d in
                     ("liger-kernel", "cut-cross-entropy", "deepspeed", "bitsandbytes", "jsonargparse"))
    meta = dict(timestamp=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), device="cuda",
                device_name=name, torch=torch.__version__, triton=bk.triton_version(), commit=bk.git_commit(),
                transformers=transformers.__version__, packages=pkgs)
    tests = (run_gpu_tests(out, a.tests_timeout_s, a.workers) if not a.skip_tests
             else GpuTestReport(True, "skipped (--skip-tests)"))
    print(f"GPU tests: {tests.summary}", flush=True)
    for tid, reason in tests.not_run:
        print(f"  not run: {tid}: {reason}")
    rows, targets = [], []
    meta["bandwidth"] = measured_bandwidth()
    if not a.skip_sweep:
        rows = run_sweep(bk, meta, meta["bandwidth"], a.budget_s)
        targets = check_targets(rows, meta["bandwidth"], nominal_bw)
        for target, value, met in targets:
            print(f"{'met   ' if met else 'MISSED'} {target}: {value}")
    block = results_block(meta, tests, rows, targets, nominal_bw)
    (out / OUT_FILES["block"]).write_text(block + "\n")
    if rows:
        bk.append_csv(out / OUT_FILES["csv"], rows)
    if not a.no_write:
        write_results(block)
        if rows:
            bk.append_csv(bk.DEFAULT_CSV, rows)
        print(f"wrote {RESULTS_MD} and {out}")
    failed = [r for r in rows if r["status"].startswith("error")]
    print(f"gpu_check: tests {'passed' if tests.ok else 'FAILED'}, {len(tests.not_run)} tests not run, "
          f"{sum(met for *_, met in targets)}/{len(targets)} targets met, {len(failed)} sweep rows failed")
    return 0 if tests.ok and all(met for _, _, met in targets) else 1


if __name__ == "__main__":
    sys.exit(main())
