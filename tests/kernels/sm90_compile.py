"""Compile the log-ratio Triton kernels for an H100 (sm_90) on a machine without a GPU.

``python tests/kernels/sm90_compile.py [--all]`` (``TRITON_INTERPRET`` unset): ``triton.compile`` runs the
whole pipeline (TTIR, TTGIR, LLVM IR, PTX, and a cubin through the ``ptxas`` bundled with triton) for
``GPUTarget("cuda", 90, 32)``, for every input-dtype combination the GPU run uses (bf16, fp16, fp32 hidden
with a bf16 weight, bf16 hidden with an fp32 weight, fp32). A kernel that does not compile on the GPU
fails here first. Default: the first autotune config of each table; ``--all``: every config; ``--quick``:
the forward and backward for bf16 and for fp32 hidden / bf16 weight only (both branches of the dot helper's
16-bit type). Prints one line per kernel and variant; exit status 1 if any failed.
"""

from __future__ import annotations

import argparse
import sys
import time

VARIANTS = [("bf16", "bf16"), ("fp16", "fp16"), ("fp32", "bf16"), ("bf16", "fp32"), ("fp32", "fp32")]
QUICK = [("bf16", "bf16"), ("fp32", "bf16")]  # the two branches of the dot helper's 16-bit type
INTS = ("N", "V", "D", "v_per_split", "stride_hn", "stride_hd", "stride_wv", "stride_wd", "N_BUCKET", "num_steps")


def signature(fn, pointers: dict[str, str]) -> dict[str, str]:
    """Triton signature strings for ``fn``'s arguments: pointers as given, ints i32, floats fp32."""
    sig = {}
    for p in fn.params:
        name = p.name
        if p.is_constexpr:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = "*" + pointers[name]
        elif name in INTS:
            sig[name] = "i32"
        else:
            sig[name] = "fp32"  # FILTER_EPS, beta
    return sig


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--all", action="store_true", help="every autotune config, not only the first")
    p.add_argument("--quick", action="store_true", help="bf16 and fp32/bf16 forward and backward only")
    a = p.parse_args(argv)
    import triton
    from agentrm.kernels import interpreting
    from agentrm.kernels import logratio_triton as lt
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if interpreting():
        print("sm90_compile: unset TRITON_INTERPRET (the interpreter has nothing to compile)")
        return 2
    kernels = lt.triton_kernels(False)
    fwd, bwd, combine = kernels["fwd"].fn, kernels["bwd"].fn, kernels["combine"]
    target = GPUTarget("cuda", 90, 32)
    failed = 0

    def build(label: str, fn, sig: dict[str, str], consts: dict, warps: int, stages: int) -> None:
        nonlocal failed
        t = time.perf_counter()
        try:
            out = triton.compile(ASTSource(fn, sig, consts), target=target,
                                 options={"num_warps": warps, "num_stages": stages})
        except Exception as e:  # noqa: BLE001 (report every failure, then exit 1)
            failed += 1
            print(f"FAILED {label}: {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
            return
        mma = "wgmma" if "wgmma" in out.asm["ptx"] else ("mma" if "mma" in out.asm["ptx"] else "no mma")
        print(f"ok {label}: cubin {len(out.asm['cubin'])} B, {mma}, {time.perf_counter() - t:.1f} s", flush=True)

    fwd_cfgs = lt._FWD_CONFIGS if a.all else lt._FWD_CONFIGS[:1]
    bwd_cfgs = lt._BWD_CONFIGS if a.all else lt._BWD_CONFIGS[:1]
    for hd, wd in QUICK if a.quick else VARIANTS:
        dot_fp32 = hd == wd == "fp32"
        flags = {"DOT_FP32": dot_fp32, "PRECISION": "tf32" if dot_fp32 else "ieee",
                 "LOW_FROM_W": hd == "fp32" and wd != "fp32"}
        ptrs = {"h_ptr": hd, "w_ptr": wd, "tgt_ptr": "i64"}
        for bn, bv, bk, nw, ns in fwd_cfgs:
            sig = signature(fwd, {**ptrs, "part_m_ptr": "fp32", "part_s_ptr": "fp32", "part_t_ptr": "fp32"})
            build(f"fwd {hd}/{wd} {bn}x{bv}x{bk}", fwd, sig, {"BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_K": bk, **flags},
                  nw, ns)
        for bn, bv, bk, nw, ns in bwd_cfgs:
            for need_h, need_w in ((True, True), (True, False)) if a.all else ((True, True),):
                sig = signature(bwd, {**ptrs, "lse_ptr": "fp32", "g_ptr": "fp32", "gh_ptr": "fp32", "gw_ptr": "fp32"})
                consts = {"BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_K": bk, "NEED_GH": need_h, "NEED_GW": need_w, **flags}
                build(f"bwd {hd}/{wd} {bn}x{bv}x{bk} gh={need_h} gw={need_w}", bwd, sig, consts, nw, ns)
    for fuse in () if a.quick else (False, True):
        ptrs = {n: "fp32" for n in ("part_m_ptr", "part_s_ptr", "part_t_ptr", "logp_ptr", "lse_ptr", "ref_ptr",
                                    "rew_ptr")}
        sig = signature(combine, {**ptrs, "tgt_ptr": "i64", "sid_ptr": "i64"})
        build(f"combine fuse={fuse}", combine, sig, {"NUM_SPLITS": 8, "BLOCK": 1024, "FUSE_STEPS": fuse}, 4, 1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
