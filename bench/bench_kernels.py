"""Microbenchmarks of the agentrm kernels: ``step_logratio`` and ``step_values``.

Compares, per shape and mode (``fwd`` = no-grad scoring, ``fwd+bwd`` = training step):

* ``eager``: the obvious torch implementation (materialises ``[N, V]`` logits / runs the head on all tokens);
* ``chunked`` (``step_logratio``) / ``gather`` (``step_values``): the pure-torch reference paths;
* ``triton``: the Triton kernels (CUDA only; the CPU interpreter is a correctness tool, not timed), with
  the backward's gradient filter at its default threshold; ``triton-nofilter``: the same with the filter
  off (``grad_filter="off"``), so the two ``fwd+bwd`` rows show what the filter saves;
* ``liger`` / ``cce`` (``step_logratio``, CUDA, when ``liger-kernel`` / ``cut-cross-entropy`` is
  importable): the public fused linear cross-entropy kernels run per token (``reduction="none"``) plus the
  same segment sum (:mod:`kernel_peers`); same-dtype cases only.

A case may carry ``weight_dtype`` (e.g. fp32 hidden states with a bf16 ``lm_head``); ``eager`` then casts
the weight to the hidden dtype, as plain PyTorch code must.

Measurements:

* time: median. CUDA: ``triton.testing.do_bench`` (ms). CPU: median of ``time.perf_counter`` over repeats.
* peak extra memory (MB above what the inputs already occupy):
  CUDA: ``torch.cuda.max_memory_allocated() - memory_allocated()`` before the call, after
  ``reset_peak_memory_stats()``. CPU: each case runs in a fresh subprocess; after building the inputs and a
  tiny warm-up, the process resets its kernel-tracked resident-set high-water mark (``echo 5 >
  /proc/self/clear_refs``), notes ``VmRSS``, runs the op once and reads ``VmHWM`` from ``/proc/self/status``:
  peak extra = VmHWM - VmRSS(before). This is what the OS really had to provide (large torch CPU tensors
  are mmap-backed and returned on free, so RSS tracks them; the worker runs with a fixed
  ``MALLOC_MMAP_THRESHOLD_`` so that this holds for blocks under 32 MB too). Where ``clear_refs`` is not
  writable, the fresh process's HWM after setup serves as the baseline instead.

Output: a table on stdout and CSV rows appended to ``bench/results/kernels.csv`` (device, versions, git
commit, shape, backend, mode, median ms, peak MB, ...).

Usage::

    python bench/bench_kernels.py            # CPU: small fp32 shapes; CUDA: full bf16 sweep
    python bench/bench_kernels.py --quick    # a few shapes
    python bench/bench_kernels.py --device cpu --csv /tmp/k.csv
"""

import argparse
import csv
import datetime as _dt
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
PEER_BACKENDS = ("liger", "cce")
DEFAULT_CSV = REPO / "bench" / "results" / "kernels.csv"
CSV_FIELDS = [
    "timestamp", "device", "device_name", "torch", "triton", "commit", "op", "mode", "backend",
    "tokens", "hidden", "vocab", "steps", "dtype", "median_ms", "peak_mb", "floor_ms", "status",
    "label", "weight_dtype",
]


# ------------------------------------------------------------------------------------------------------
# environment facts
# ------------------------------------------------------------------------------------------------------
def git_commit() -> str:
    """``$AGENTRM_COMMIT`` (a tree copied without ``.git``, e.g. to a lent GPU), else ``git rev-parse``."""
    if os.environ.get("AGENTRM_COMMIT"):
        return os.environ["AGENTRM_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return "uncommitted"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "uncommitted"


def triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except Exception:
        return "n/a"


def hbm_bandwidth(name: str) -> float:
    """Peak HBM bandwidth (bytes/s) from the device name; H100 SXM (3.35 TB/s) unless detected otherwise."""
    n = name.lower()
    if "h200" in n:
        return 4.8e12
    if "h100" in n and ("pcie" in n or "nvl" in n):
        return 2.0e12 if "pcie" in n else 3.9e12
    if "a100" in n:
        return 2.0e12 if "80" in n else 1.555e12
    return 3.35e12


# ------------------------------------------------------------------------------------------------------
# case construction and the callables under test
# ------------------------------------------------------------------------------------------------------
def peers():
    """``bench/kernel_peers.py`` (loaded by path: ``bench`` is not a package)."""
    import importlib.util

    name = "agentrm_bench_kernel_peers"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "bench" / "kernel_peers.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[name] = module
    return sys.modules[name]


def weight_dtype(case: dict[str, Any]) -> str:
    return case.get("weight_dtype") or case["dtype"]


def input_bytes(case: dict[str, Any]) -> int:
    """Bytes of the hidden states plus the weight (``lm_head`` or value head): the HBM floor's numerator."""
    esize = torch.finfo(getattr(torch, case["dtype"])).bits // 8
    wsize = torch.finfo(getattr(torch, weight_dtype(case))).bits // 8
    rows = case["vocab"] if case["op"] == "step_logratio" else 1
    return case["tokens"] * case["hidden"] * esize + rows * case["hidden"] * wsize


def make_inputs(case: dict[str, Any], device: str, train: bool) -> dict[str, Any]:
    """Inputs for one case. ``case``: op, tokens, hidden, vocab, steps, dtype (, weight_dtype)."""
    dtype = getattr(torch, case["dtype"])
    wdtype = getattr(torch, weight_dtype(case))
    n, h = case["tokens"], case["hidden"]
    g = torch.Generator(device="cpu").manual_seed(0)
    hidden = torch.randn(n, h, generator=g).to(device=device, dtype=dtype).requires_grad_(train)
    if case["op"] == "step_logratio":
        v = case["vocab"]
        weight = (
            (torch.randn(v, h, generator=g) / h**0.5).to(device=device, dtype=wdtype).requires_grad_(train)
        )
        targets = torch.randint(0, v, (n,), generator=g).to(device)
        steps = case["steps"]
        # the first n // 8 tokens (prompt) are outside every step; the rest split into `steps` runs
        pos, prompt = torch.arange(n), n // 8
        step_ids = torch.where(pos < prompt, -1, (pos - prompt) * steps // max(1, n - prompt)).to(device)
        ref = (-torch.rand(n, generator=g) * 5).to(device)
        return dict(hidden=hidden, weight=weight, targets=targets, step_ids=step_ids, ref=ref)
    head_w = (torch.randn(h, generator=g) / h**0.5).to(device=device, dtype=dtype).requires_grad_(train)
    head_b = torch.zeros((), device=device, dtype=dtype).requires_grad_(train)
    idx = torch.linspace(0, n - 1, case["steps"]).long().to(device)
    return dict(hidden=hidden, head_w=head_w, head_b=head_b, idx=idx)


def make_fn(case: dict[str, Any], backend: str, inp: dict[str, Any], train: bool):
    """A zero-argument callable running one forward (``fwd``) or forward+backward (``fwd+bwd``)."""
    import agentrm.kernels as K

    if case["op"] == "step_logratio":
        s = case["steps"]
        args = (inp["hidden"], inp["weight"], inp["targets"], inp["step_ids"], inp["ref"], 0.05, s)
        if backend == "eager":

            def op():
                w = inp["weight"].to(inp["hidden"].dtype)  # (a no-op unless the weight dtype differs)
                return K.step_logratio_eager(args[0], w, *args[2:], return_token_logp=train)
        elif backend == "chunked":

            def op():
                return K.step_logratio_chunked(*args, return_token_logp=train)
        elif backend in PEER_BACKENDS:
            op = peers().step_logratio_peer(backend, inp, s, 0.05)
        elif backend in ("triton", "triton-nofilter"):
            grad_filter = "off" if backend == "triton-nofilter" else "auto"

            def op():
                return K.step_logratio(*args, return_token_logp=train, backend="triton", grad_filter=grad_filter)
        else:
            raise ValueError(f"unknown step_logratio backend {backend!r}")
    else:
        args = (inp["hidden"], inp["head_w"], inp["head_b"], inp["idx"])
        if backend == "eager":

            def op():
                return K.step_values_eager(*args)
        elif backend == "gather":

            def op():
                return K.step_values_torch(*args)
        else:

            def op():
                return K.step_values(*args, backend="triton")

    if not train:

        def fwd():
            with torch.no_grad():
                return op()

        return fwd
    ups: dict[str, torch.Tensor] = {}

    def fwd_bwd():
        out = op()
        outs = out if isinstance(out, tuple) else (out,)
        loss = 0.0
        for i, o in enumerate(outs):
            if i not in ups:  # fixed non-uniform upstream gradient
                ups[i] = torch.randn(o.shape, generator=torch.Generator().manual_seed(i)).to(o.device)
            loss = loss + (o * ups[i]).sum()
        loss.backward()
        for x in inp.values():
            if isinstance(x, torch.Tensor):
                x.grad = None

    return fwd_bwd


# ------------------------------------------------------------------------------------------------------
# CPU worker (one case per fresh process)
# ------------------------------------------------------------------------------------------------------
def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cpu_worker(spec: dict[str, Any]) -> dict[str, Any]:
    case, backend, train = spec["case"], spec["backend"], spec["mode"] == "fwd+bwd"
    torch.set_grad_enabled(True)
    tiny = dict(case, tokens=8, vocab=min(case.get("vocab", 64), 64), steps=2)
    tiny_inp = make_inputs(tiny, "cpu", train)
    make_fn(tiny, backend, tiny_inp, train)()  # warm-up: imports, thread pools, allocator
    del tiny_inp
    inp = make_inputs(case, "cpu", train)
    fn = make_fn(case, backend, inp, train)
    reset_ok = _reset_hwm()
    base_kb = _status_kb("VmRSS") if reset_ok else _status_kb("VmHWM")
    out = fn()  # the measured call; excluded from timing (first-touch page faults)
    del out
    peak_kb = _status_kb("VmHWM")
    times: list[float] = []
    budget, max_reps = spec.get("budget_s", 2.0), spec.get("max_reps", 7)
    while not times or (len(times) < max_reps and sum(times) < budget):  # >= 1 rep; more while cheap
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
        del out
    return {
        "median_ms": statistics.median(times) * 1e3,
        "peak_mb": max(0, peak_kb - base_kb) / 1024,
        "hwm_reset": reset_ok,
        "status": "ok",
    }


def run_cpu_case(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    env = dict(os.environ)
    env.setdefault("PYTHONPATH", str(REPO))
    # A fixed mmap threshold turns off glibc's dynamic one (which, after the first free of a large block,
    # serves blocks up to 32 MB from the heap, where freed memory can stay resident): large tensors are then
    # mmap-backed and unmapped on free, so the RSS high-water mark is the peak of live bytes. Without it the
    # figure of the chunked path varied run to run by multiples of its chunk size.
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
    try:
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--_worker", json.dumps(spec)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )
    except subprocess.TimeoutExpired:
        return {"median_ms": float("nan"), "peak_mb": float("nan"), "status": "timeout"}
    if proc.returncode != 0:
        err = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {"median_ms": float("nan"), "peak_mb": float("nan"), "status": f"error: {err[:80]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------------
# CUDA measurement (in-process)
# ------------------------------------------------------------------------------------------------------
def run_cuda_case(spec: dict[str, Any]) -> dict[str, Any]:
    import triton.testing

    case, backend, train = spec["case"], spec["backend"], spec["mode"] == "fwd+bwd"
    torch.cuda.empty_cache()
    if backend in PEER_BACKENDS and not peers().available(backend):
        return {"median_ms": float("nan"), "peak_mb": float("nan"), "status": "not installed"}
    inp = fn = None
    try:
        inp = make_inputs(case, "cuda", train)
        fn = make_fn(case, backend, inp, train)
        fn()  # warm-up / autotune
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del out
        ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
        return {"median_ms": ms, "peak_mb": peak / 2**20, "status": "ok"}
    except torch.cuda.OutOfMemoryError:
        return {"median_ms": float("nan"), "peak_mb": float("nan"), "status": "OOM"}
    except Exception as e:  # noqa: BLE001 (a peer or a kernel failing is a row, not the end of the sweep)
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return {"median_ms": float("nan"), "peak_mb": float("nan"), "status": f"error: {msg[:100]}"}
    finally:
        inp = fn = None  # noqa: F841
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------------
# sweep definitions
# ------------------------------------------------------------------------------------------------------
def sweep(device: str, quick: bool) -> list[dict[str, Any]]:
    cases: list[dict[str, Any]] = []
    if device == "cuda":
        h, dt = 4096, "bfloat16"
        vocabs = [32000, 128256] if quick else [32000, 128256, 151936]
        tokens = [4096] if quick else [4096, 16384, 32768]
    else:
        h, dt = (256, "float32")
        vocabs = [8192, 131072] if quick else [8192, 32768, 131072]
        tokens = [512] if quick else [512, 2048]
    for n in tokens:
        for v in vocabs:
            if device == "cpu" and n > 512 and v == 32768:
                continue  # keeps the CPU default run near 3 minutes
            cases.append(
                dict(op="step_logratio", tokens=n, hidden=h, vocab=v, steps=max(1, n // 64), dtype=dt)
            )
    for n in tokens if device == "cuda" else tokens[-1:]:
        cases.append(dict(op="step_values", tokens=n, hidden=h, vocab=0, steps=max(1, n // 64), dtype=dt))
    return cases


def backends_for(op: str, device: str, case: dict[str, Any] | None = None, mode: str = "fwd+bwd",
                 include_missing: bool = False) -> list[str]:
    """Backends to run for ``op`` on ``device``. CUDA adds ``triton``; for ``step_logratio`` also
    ``triton-nofilter`` (``fwd+bwd`` only: the filter acts in the backward) and the peers for same-dtype
    cases, when installed (or always, with ``include_missing``: a plan that reports them as not run)."""
    base = ["eager", "chunked"] if op == "step_logratio" else ["eager", "gather"]
    if device != "cuda":
        return base
    out = base + ["triton"]
    if op != "step_logratio":
        return out
    if mode == "fwd+bwd":
        out.append("triton-nofilter")
    same_dtype = case is None or weight_dtype(case) == case["dtype"]
    out += [p for p in PEER_BACKENDS if same_dtype and (include_missing or peers().available(p))]
    return out


# ------------------------------------------------------------------------------------------------------
# reporting
# ------------------------------------------------------------------------------------------------------
def fmt(x: float, nd: int = 2) -> str:
    return "-" if x != x else f"{x:.{nd}f}"  # nan -> "-"


def print_table(rows: list[dict[str, Any]], device: str) -> str:
    """Plain-text table grouped per (op, shape, mode); returns the text (also printed)."""
    ref_col = "triton" if device == "cuda" else None
    header = [
        "op", "mode", "N", "H", "V", "S",
        "backend", "median ms", "peak MB", "eager/this mem", "eager/this time",
    ]
    if device == "cuda":
        header += ["floor ms"]
    lines = []
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        key = (r["op"], r["mode"], r["tokens"], r["hidden"], r["vocab"], r["steps"])
        groups.setdefault(key, []).append(r)
    table = [header]
    for key, rs in groups.items():
        eager = next((r for r in rs if r["backend"] == "eager"), None)
        for r in rs:
            mem_ratio = time_ratio = float("nan")
            if eager and r is not eager and r["peak_mb"] == r["peak_mb"] and r["peak_mb"] > 0:
                mem_ratio = eager["peak_mb"] / r["peak_mb"]
            if eager and r is not eager and r["median_ms"] == r["median_ms"]:
                time_ratio = eager["median_ms"] / r["median_ms"]
            row = [*map(str, key[:2]), *map(str, key[2:]), r["backend"], fmt(r["median_ms"])]
            row += [fmt(r["peak_mb"], 1), fmt(mem_ratio, 1), fmt(time_ratio, 2)]
            if device == "cuda":
                row += [fmt(r.get("floor_ms", float("nan")), 3)]
            if r["status"] != "ok":
                row[7] = r["status"]
            table.append(row)
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
    for i, row in enumerate(table):
        lines.append("  ".join(str(c).rjust(w) for c, w in zip(row, widths)))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    text = "\n".join(lines)
    print(text)
    if ref_col:
        print("(eager/this: ratio of the eager reference's figure to this row's; >1 = this row is better)")
    return text


def append_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """Append ``rows``; a file written before a column existed gets it (empty for its old rows)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    if not new:
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
            f.seek(0)
            old = list(csv.DictReader(f))
        if header != CSV_FIELDS:
            if header != CSV_FIELDS[: len(header)]:
                raise ValueError(f"{path}: columns {header} are not a prefix of {CSV_FIELDS}; not appending")
            with open(path, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
                w.writeheader()
                w.writerows(old)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        if new:
            w.writeheader()
        for r in rows:
            w.writerow(
                {k: (f"{r[k]:.4f}" if isinstance(r.get(k), float) else r.get(k, "")) for k in CSV_FIELDS}
            )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a few shapes only")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--csv", type=Path, default=DEFAULT_CSV, help=f"CSV to append to (default {DEFAULT_CSV})")
    p.add_argument("--no-csv", action="store_true", help="do not write CSV rows")
    p.add_argument("--timeout", type=float, default=120.0, help="per-case timeout on CPU (s)")
    p.add_argument("--_worker", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a._worker:
        print(json.dumps(cpu_worker(json.loads(a._worker))))
        return 0

    device = a.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available")
    name = torch.cuda.get_device_name() if device == "cuda" else (os.uname().machine + " CPU")
    if device == "cpu":
        name += f" x{os.cpu_count()}"
    bw = hbm_bandwidth(name) if device == "cuda" else float("nan")
    meta = dict(
        timestamp=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        device=device,
        device_name=name,
        torch=torch.__version__,
        triton=triton_version(),
        commit=git_commit(),
    )
    print(f"# {name} | torch {meta['torch']} | triton {meta['triton']} | commit {meta['commit']}")
    if device == "cuda":
        print(f"# memory-bandwidth floor at {bw / 1e12:.2f} TB/s (bytes of hidden + weight read once)")
    rows: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    for case in sweep(device, a.quick):
        for mode in ("fwd", "fwd+bwd"):
            for backend in backends_for(case["op"], device, case, mode):
                spec = {"case": case, "backend": backend, "mode": mode}
                res = run_cuda_case(spec) if device == "cuda" else run_cpu_case(spec, a.timeout)
                floor = input_bytes(case) / bw * 1e3 * (1 if mode == "fwd" else 2)  # bwd reads both again
                rows.append({**meta, **case, "mode": mode, "backend": backend, "floor_ms": floor, **res})
                print(
                    f"  {case['op']:<13} {mode:<7} N={case['tokens']:<6} V={case['vocab']:<7} {backend:<8}"
                    f" {fmt(res['median_ms']):>10} ms {fmt(res['peak_mb'], 1):>9} MB  {res['status']}",
                    flush=True,
                )
    print(f"\n# total {time.perf_counter() - t_start:.0f} s\n")
    print_table(rows, device)
    if not a.no_csv:
        append_csv(a.csv, rows)
        print(f"\nappended {len(rows)} rows to {a.csv}")
    lr = [r for r in rows if r["op"] == "step_logratio" and r["mode"] == "fwd" and r["vocab"] >= 128000]
    for n in sorted({r["tokens"] for r in lr}):
        e = next((r for r in lr if r["tokens"] == n and r["backend"] == "eager"), None)
        c = next((r for r in lr if r["tokens"] == n and r["backend"] != "eager"), None)
        if e and c and c["peak_mb"] > 0:
            print(
                f"target check (vocab {e['vocab']}, N={n}, fwd): eager {e['peak_mb']:.1f} MB / "
                f"{c['backend']} {c['peak_mb']:.1f} MB = {e['peak_mb'] / c['peak_mb']:.1f}x (target >= 10x)"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
