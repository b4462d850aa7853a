"""GPU readiness in one command: ``python bench/gpu_check.py``.

1. the GPU tests (``pytest -m gpu``: kernel parity at Llama-3-8B shapes, scoring under sdpa / flash-attention,
   nf4 / int8 loading and QLoRA steps, 2-GPU DDP when two GPUs are present);
2. the kernel sweep at H = 4096, V = 128,256, bf16: our Triton kernels vs eager ``log_softmax + gather``, vs
   the chunked torch path, and vs Liger-Kernel's fused linear cross-entropy when ``liger-kernel`` is
   importable (optional: ``pip install liger-kernel``);
3. the targets: peak memory >= 10x below eager at V = 128k; forward+backward >= 2x eager speed; no-grad
   scoring (N = 64 and 512 tokens) within 1.5x of the HBM-bandwidth floor for reading ``lm_head`` and the
   hidden states once (bandwidth measured with a device-to-device copy; the nominal figure is printed too).

Writes the results (device, versions, commit) into ``bench/RESULTS.md`` between the ``gpu_check`` markers
and appends the sweep rows to ``bench/results/kernels.csv``. Exits 1 when a test fails or a target is
missed, and 2 with a one-line message when no CUDA device is visible.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS_MD = ROOT / "bench" / "RESULTS.md"
BEGIN, END = "<!-- gpu_check:begin -->", "<!-- gpu_check:end -->"
H, V, DTYPE = 4096, 128256, "bfloat16"
SCORING_TOKENS = (64, 512)
TRAINING_TOKENS = (4096, 8192)
TARGET_MEMORY, TARGET_SPEED, TARGET_FLOOR = 10.0, 2.0, 1.5
NO_CUDA = "gpu_check: CUDA is needed: torch {} sees no CUDA device; nothing was run."


def _bench_kernels():
    spec = importlib.util.spec_from_file_location("bench_kernels", ROOT / "bench" / "bench_kernels.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_gpu_tests() -> tuple[bool, str]:
    t = time.perf_counter()
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    print(proc.stdout[-6000:], proc.stderr[-2000:], sep="\n")
    lines = proc.stdout.strip().splitlines() or ["(no output)"]
    return proc.returncode == 0, f"{lines[-1].strip('= ')} ({time.perf_counter() - t:.0f} s)"


def measured_bandwidth() -> float:
    """Device-to-device copy bandwidth (bytes/s): read + write of a 1 GiB buffer."""
    import triton.testing

    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=10, rep=50, return_mode="median")
    return 2 * src.numel() / (ms * 1e-3)


def sweep_cases() -> list[tuple[dict[str, Any], tuple[str, ...]]]:
    cases = [(dict(op="step_logratio", tokens=n, hidden=H, vocab=V, steps=max(1, n // 16), dtype=DTYPE), ("fwd",))
             for n in SCORING_TOKENS]
    cases += [(dict(op="step_logratio", tokens=n, hidden=H, vocab=V, steps=n // 64, dtype=DTYPE), ("fwd", "fwd+bwd"))
              for n in TRAINING_TOKENS]
    cases.append((dict(op="step_values", tokens=8192, hidden=H, vocab=0, steps=128, dtype=DTYPE), ("fwd+bwd",)))
    return cases


def run_sweep(bk, meta: dict[str, Any], bandwidth: float) -> list[dict[str, Any]]:
    rows = []
    for case, modes in sweep_cases():
        for mode in modes:
            for backend in bk.backends_for(case["op"], "cuda"):
                res = bk.run_cuda_case({"case": case, "backend": backend, "mode": mode})
                nbytes = case["tokens"] * case["hidden"] * 2 + (case["vocab"] or 1) * case["hidden"] * 2
                floor_ms = nbytes / bandwidth * 1e3
                rows.append({**meta, **case, "mode": mode, "backend": backend, "floor_ms": floor_ms, **res})
                print(f"  {case['op']:<13} {mode:<7} N={case['tokens']:<5} {backend:<8} "
                      f"{res['median_ms']:9.3f} ms {res['peak_mb']:9.1f} MB  {res['status']}", flush=True)
    return rows


def _row(rows, op: str, n: int, mode: str, backend: str) -> dict[str, Any] | None:
    return next((r for r in rows if (r["op"], r["tokens"], r["mode"], r["backend"]) == (op, n, mode, backend)
                 and r["status"] == "ok"), None)


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


def results_block(meta: dict[str, Any], tests: tuple[bool, str], rows, targets, nominal_bw: float) -> str:
    lines = [BEGIN, "", f"Run {meta['timestamp']} on **{meta['device_name']}** (torch {meta['torch']}, "
             f"triton {meta['triton']}, transformers {meta['transformers']}, liger-kernel {meta['liger']}), "
             f"commit `{meta['commit']}`. Command: `python bench/gpu_check.py`.", "",
             f"* `pytest -m gpu`: {'passed' if tests[0] else 'FAILED'}: {tests[1]}",
             f"* HBM bandwidth: {meta['bandwidth'] / 1e12:.2f} TB/s measured (1 GiB device copy), "
             f"{nominal_bw / 1e12:.2f} TB/s nominal", ""]
    if rows:
        lines += ["| op | mode | N | backend | median ms | peak MB | eager/this mem | eager/this time | floor ms |",
                  "|---|---|---:|---|---:|---:|---:|---:|---:|"]
        for r in rows:
            e = _row(rows, r["op"], r["tokens"], r["mode"], "eager")
            mem = e["peak_mb"] / r["peak_mb"] if e and r is not e and r["peak_mb"] > 0 else float("nan")
            spd = e["median_ms"] / r["median_ms"] if e and r is not e and r["status"] == "ok" else float("nan")
            lines.append(f"| {r['op']} | {r['mode']} | {r['tokens']} | {r['backend']} | "
                         f"{r['median_ms']:.3f} | {r['peak_mb']:.1f} | {mem:.1f} | {spd:.2f} | {r['floor_ms']:.3f} |")
        lines += ["", "| target | measured | met |", "|---|---|---|"]
        lines += [f"| {name} | {value} | {'yes' if met else '**no**'} |" for name, value, met in targets]
    return "\n".join([*lines, "", END])


def write_results(block: str, path: Path = RESULTS_MD) -> None:
    text = path.read_text()
    if BEGIN in text and END in text:
        text = re.sub(re.escape(BEGIN) + r".*?" + re.escape(END), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n## GPU check (`python bench/gpu_check.py`)\n\n" + block + "\n"
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--skip-tests", action="store_true", help="only the kernel sweep")
    p.add_argument("--skip-sweep", action="store_true", help="only the GPU tests")
    p.add_argument("--no-write", action="store_true", help="do not touch bench/RESULTS.md or the CSV")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print(NO_CUDA.format(torch.__version__))
        return 2
    import transformers

    bk = _bench_kernels()
    name = torch.cuda.get_device_name()
    nominal_bw = bk.hbm_bandwidth(name)
    meta = dict(timestamp=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), device="cuda",
                device_name=name, torch=torch.__version__, triton=bk.triton_version(), commit=bk.git_commit(),
                transformers=transformers.__version__,
                liger=_version("liger-kernel") or "not installed")
    tests = run_gpu_tests() if not a.skip_tests else (True, "skipped (--skip-tests)")
    print(f"pytest -m gpu: {tests[1]}")
    rows, targets = [], []
    meta["bandwidth"] = measured_bandwidth()
    if not a.skip_sweep:
        rows = run_sweep(bk, meta, meta["bandwidth"])
        targets = check_targets(rows, meta["bandwidth"], nominal_bw)
        for target, value, met in targets:
            print(f"{'met   ' if met else 'MISSED'} {target}: {value}")
    if not a.no_write:
        write_results(results_block(meta, tests, rows, targets, nominal_bw))
        if rows:
            bk.append_csv(bk.DEFAULT_CSV, rows)
        print(f"wrote {RESULTS_MD.relative_to(ROOT)}")
    return 0 if tests[0] and all(met for _, _, met in targets) else 1


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())
