"""Triton kernels for the log-ratio ops; the torch references they are tested against are in
:mod:`.logratio_reference` (``N`` tokens, hidden ``D`` = ``H``, vocabulary ``V``).

* forward ``_lse_fwd_kernel``: grid ``(cdiv(N, BLOCK_N), num_splits)``. Each program owns a token block and
  one contiguous slice of the vocabulary, loops over it in ``BLOCK_V`` tiles, computes each logit tile with
  ``tl.dot`` over ``H`` in ``BLOCK_K`` slices (fp32 accumulate), and keeps an online (max, sum-exp) per token
  row plus the target logit: partials ``[3, num_splits, N]`` fp32. Splitting the vocabulary keeps all SMs
  busy when ``N`` is small (beam-search scoring); ``_combine_kernel`` merges the partials into ``lse[N]`` /
  ``logp[N]`` and, in the no-grad scoring path, also adds ``beta * (logp - ref)`` into ``rewards[S]`` with
  ``tl.atomic_add`` (the segment sum is fused).
* backward ``_lse_bwd_kernel``: grid ``(cdiv(N, BLOCK_N), cdiv(V, BLOCK_V))``. Each program recomputes its
  logit tile, forms ``dlogits = g * (onehot(target) - exp(logits - lse))`` with the saved LSE, then loops
  over ``H`` in ``BLOCK_K`` slices: ``grad_hidden[n-block, k] += dot(dlogits, W[v-block, k])`` and
  ``grad_W[v-block, k] += dot(dlogits^T, hidden[n-block, k])``, both with fp32 ``tl.atomic_add``.

  Atomics (in the style of Cut Cross-Entropy, Wijmans et al. 2024) vs. the alternatives: a program owning
  a token block and all of ``grad_hidden[BLOCK_N, H]`` needs ``H``-sized registers (4096 fp32 per row:
  impossible) or recomputes the logit tile once per ``H`` slice; writing ``dlogits`` chunks to HBM and
  calling cuBLAS (Liger-style, our chunked torch path on CUDA) costs ``chunk * V`` memory and a second read
  of it. Tiles whose ``dlogits`` are all zero (token block fully ignored, or softmax underflow) skip the
  accumulation loop (exact), and ``grad_W`` / ``grad_hidden`` are skipped when not needed. Gradient
  filtering (``FILTER_EPS``; threshold and error bound in :mod:`.logratio_reference`) also skips tiles
  whose ``|onehot - softmax|`` is below the threshold everywhere; ``FILTER_EPS = 0`` leaves the exact skips
  only. Atomic fp32 accumulation makes the Triton backward non-deterministic in the last bits.

Precision of the dots (:func:`dot_precision`, applied by one helper, ``_tile_dot``, for all four dots): both
operands 16-bit: native ``tl.dot`` (fp32 accumulate). One operand fp32 and the other 16-bit (QLoRA upcasts
``lm_head`` to fp32): the fp32 tile is cast to the 16-bit type in registers, so tensor cores are used, as
``F.linear`` under autocast does; the backward's ``dlogits`` are cast to that type too. Both fp32: TF32
tensor-core dots. ``AGENTRM_KERNEL_DOT=ieee`` forces exact fp32 (IEEE) dots everywhere (the opt-out).
Under the Triton interpreter (CPU tests) dots are always fp32 IEEE: triton 3.9's interpreter computes
``tl.dot`` on bf16 operands incorrectly. Logits, LSE and rewards are fp32 everywhere.

Autotuning (CUDA): configs are keyed by ``(D, V, N_BUCKET, dot mode)``, where ``N_BUCKET`` is ``N``
rounded up to a power of two and capped (:func:`n_bucket`), so a config tuned on a beam-scoring batch of 64
tokens is not reused for an 8k-token training batch.

Kernels are decorated lazily (:func:`triton_kernels`), so that ``TRITON_INTERPRET`` is read at first use.
"""

import functools
import os
from typing import Any

import torch
from torch import Tensor

from .dispatch import interpreting, triton_available

DOT_ENV = "AGENTRM_KERNEL_DOT"
N_BUCKET_CAP = 16384
# The dot helper the kernels call, ``triton.jit(_tile_dot_impl)``; bound by triton_kernels() (decorated
# lazily, like the kernels, so that TRITON_INTERPRET is read at first use).
_tile_dot: Any = None


if triton_available():
    import triton
    import triton.language as tl

    def _tile_dot_impl(a, b, acc, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, LOW: tl.constexpr):
        """``acc + a @ b`` (``acc`` may be ``None``) under the dot policy of :func:`dot_precision`: fp32
        operands with ``PRECISION`` when ``DOT_FP32``, else both operands rounded to the 16-bit type ``LOW``
        in registers (a no-op for an operand already of that type); fp32 accumulation either way."""
        if DOT_FP32:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=PRECISION)
        return tl.dot(a.to(LOW), b.to(LOW), acc)

    def _lse_fwd_kernel(
        h_ptr,
        w_ptr,
        tgt_ptr,
        part_m_ptr,  # [num_splits, N] fp32: running max per split
        part_s_ptr,  # [num_splits, N] fp32: sum exp(logit - max) per split
        part_t_ptr,  # [num_splits, N] fp32: target logit if the target is in this split, else 0
        N,
        V,
        D,
        v_per_split,
        stride_hn,
        stride_hd,
        stride_wv,
        stride_wd,
        BLOCK_N: tl.constexpr,
        BLOCK_V: tl.constexpr,
        BLOCK_K: tl.constexpr,
        N_BUCKET,  # autotune key only (see n_bucket)
        DOT_FP32: tl.constexpr,
        PRECISION: tl.constexpr,
        LOW_FROM_W: tl.constexpr,
    ):
        LOW: tl.constexpr = w_ptr.dtype.element_ty if LOW_FROM_W else h_ptr.dtype.element_ty
        pid_n = tl.program_id(0)
        pid_s = tl.program_id(1)
        offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        tgt = tl.load(tgt_ptr + offs_n, mask=mask_n, other=-1).to(tl.int64)
        m_i = tl.full([BLOCK_N], float("-inf"), tl.float32)
        s_i = tl.zeros([BLOCK_N], tl.float32)
        t_i = tl.zeros([BLOCK_N], tl.float32)
        v_lo = pid_s * v_per_split
        v_hi = tl.minimum(v_lo + v_per_split, V)
        for v0 in range(v_lo, v_hi, BLOCK_V):
            offs_v = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
            mask_v = offs_v < v_hi
            acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
            for k0 in range(0, D, BLOCK_K):
                offs_k = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
                mask_k = offs_k < D
                h = tl.load(
                    h_ptr + offs_n[:, None] * stride_hn + offs_k[None, :] * stride_hd,
                    mask=mask_n[:, None] & mask_k[None, :],
                    other=0.0,
                )
                w = tl.load(  # [BLOCK_K, BLOCK_V]: W^T tile
                    w_ptr + offs_v[None, :] * stride_wv + offs_k[:, None] * stride_wd,
                    mask=mask_v[None, :] & mask_k[:, None],
                    other=0.0,
                )
                acc = _tile_dot(h, w, acc, DOT_FP32, PRECISION, LOW)
            logits = tl.where(mask_v[None, :], acc, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(logits, axis=1))
            s_i = s_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(logits - m_new[:, None]), axis=1)
            m_i = m_new
            hit = offs_v[None, :] == tgt[:, None]
            t_i += tl.sum(tl.where(hit, acc, 0.0), axis=1)
        out = pid_s.to(tl.int64) * N + offs_n
        tl.store(part_m_ptr + out, m_i, mask=mask_n)
        tl.store(part_s_ptr + out, s_i, mask=mask_n)
        tl.store(part_t_ptr + out, t_i, mask=mask_n)

    def _combine_kernel(
        part_m_ptr,
        part_s_ptr,
        part_t_ptr,
        tgt_ptr,
        logp_ptr,  # [N] fp32 out
        lse_ptr,  # [N] fp32 out
        sid_ptr,  # [N] int step ids (read only if FUSE_STEPS)
        ref_ptr,  # [N] reference logp (read only if FUSE_STEPS)
        rew_ptr,  # [S] fp32, zero-initialised, accumulated with atomics (if FUSE_STEPS)
        N,
        num_steps,
        beta,
        NUM_SPLITS: tl.constexpr,
        BLOCK: tl.constexpr,
        FUSE_STEPS: tl.constexpr,
    ):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        m = tl.full([BLOCK], float("-inf"), tl.float32)
        for s in tl.static_range(NUM_SPLITS):
            m = tl.maximum(m, tl.load(part_m_ptr + s * N + offs, mask=mask, other=0.0))
        tot = tl.zeros([BLOCK], tl.float32)
        tgt_logit = tl.zeros([BLOCK], tl.float32)
        for s in tl.static_range(NUM_SPLITS):
            m_s = tl.load(part_m_ptr + s * N + offs, mask=mask, other=0.0)
            tot += tl.load(part_s_ptr + s * N + offs, mask=mask, other=0.0) * tl.exp(m_s - m)
            tgt_logit += tl.load(part_t_ptr + s * N + offs, mask=mask, other=0.0)
        lse = m + tl.log(tl.where(mask, tot, 1.0))  # (masked lanes: avoid log(0))
        tgt = tl.load(tgt_ptr + offs, mask=mask, other=-1)
        valid = tgt >= 0
        logp = tl.where(valid, tgt_logit - lse, 0.0)
        tl.store(logp_ptr + offs, logp, mask=mask)
        tl.store(lse_ptr + offs, lse, mask=mask)
        if FUSE_STEPS:
            sid = tl.load(sid_ptr + offs, mask=mask, other=-1).to(tl.int64)
            ref = tl.load(ref_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            keep = mask & valid & (sid >= 0) & (sid < num_steps)
            sid = tl.where(keep, sid, 0)
            tl.atomic_add(rew_ptr + sid, beta * (logp - ref), mask=keep, sem="relaxed")

    def _lse_bwd_kernel(
        h_ptr,
        w_ptr,
        tgt_ptr,
        lse_ptr,
        g_ptr,  # [N] fp32 upstream gradient of logp (0 at ignored tokens)
        gh_ptr,  # [N, D] fp32, contiguous, zero-initialised
        gw_ptr,  # [V, D] fp32, contiguous, zero-initialised
        N,
        V,
        D,
        stride_hn,
        stride_hd,
        stride_wv,
        stride_wd,
        FILTER_EPS,  # gradient filter threshold on |onehot - softmax| (0.0 = off; see grad_filter_eps)
        BLOCK_N: tl.constexpr,
        BLOCK_V: tl.constexpr,
        BLOCK_K: tl.constexpr,
        N_BUCKET,  # autotune key only (see n_bucket)
        DOT_FP32: tl.constexpr,
        PRECISION: tl.constexpr,
        LOW_FROM_W: tl.constexpr,
        NEED_GH: tl.constexpr,
        NEED_GW: tl.constexpr,
    ):
        LOW: tl.constexpr = w_ptr.dtype.element_ty if LOW_FROM_W else h_ptr.dtype.element_ty
        pid_n = tl.program_id(0)
        pid_v = tl.program_id(1)
        offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_v = pid_v.to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
        mask_n = offs_n < N
        mask_v = offs_v < V
        g = tl.load(g_ptr + offs_n, mask=mask_n, other=0.0)
        if tl.max(tl.abs(g), axis=0) > 0.0:  # skip token blocks whose gradient is all zero (ignored)
            acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
            for k0 in range(0, D, BLOCK_K):
                offs_k = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
                mask_k = offs_k < D
                h = tl.load(
                    h_ptr + offs_n[:, None] * stride_hn + offs_k[None, :] * stride_hd,
                    mask=mask_n[:, None] & mask_k[None, :],
                    other=0.0,
                )
                w = tl.load(
                    w_ptr + offs_v[None, :] * stride_wv + offs_k[:, None] * stride_wd,
                    mask=mask_v[None, :] & mask_k[:, None],
                    other=0.0,
                )
                acc = _tile_dot(h, w, acc, DOT_FP32, PRECISION, LOW)
            lse = tl.load(lse_ptr + offs_n, mask=mask_n, other=0.0)
            tgt = tl.load(tgt_ptr + offs_n, mask=mask_n, other=-1).to(tl.int64)
            p = tl.where(mask_v[None, :] & mask_n[:, None], tl.exp(acc - lse[:, None]), 0.0)
            onehot = tl.where(offs_v[None, :] == tgt[:, None], 1.0, 0.0)
            dl = g[:, None] * (onehot - p)  # [BLOCK_N, BLOCK_V] fp32 d logp / d logits
            # |onehot - p| over the token rows that carry a gradient: the gradient filter's test
            unit = tl.where(g[:, None] != 0.0, tl.abs(onehot - p), 0.0)
            # skip: every dlogit is exactly 0 (softmax underflow), or (filter on) every |onehot - p| is
            # below FILTER_EPS; FILTER_EPS = 0 (filter off) leaves only the exact skip
            if (tl.max(tl.max(tl.abs(dl), axis=1), axis=0) > 0.0) & (
                tl.max(tl.max(unit, axis=1), axis=0) >= FILTER_EPS
            ):
                # cast once, outside the loop (the helper's cast is then a no-op)
                dl_op = dl if DOT_FP32 else dl.to(LOW)
                for k0 in range(0, D, BLOCK_K):
                    offs_k = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
                    mask_k = offs_k < D
                    if NEED_GH:
                        w2 = tl.load(  # [BLOCK_V, BLOCK_K]
                            w_ptr + offs_v[:, None] * stride_wv + offs_k[None, :] * stride_wd,
                            mask=mask_v[:, None] & mask_k[None, :],
                            other=0.0,
                        )
                        gh = _tile_dot(dl_op, w2, None, DOT_FP32, PRECISION, LOW)
                        tl.atomic_add(
                            gh_ptr + offs_n[:, None] * D + offs_k[None, :],
                            gh,
                            mask=mask_n[:, None] & mask_k[None, :],
                            sem="relaxed",
                        )
                    if NEED_GW:
                        h2 = tl.load(  # [BLOCK_N, BLOCK_K]
                            h_ptr + offs_n[:, None] * stride_hn + offs_k[None, :] * stride_hd,
                            mask=mask_n[:, None] & mask_k[None, :],
                            other=0.0,
                        )
                        gw = _tile_dot(tl.trans(dl_op), h2, None, DOT_FP32, PRECISION, LOW)
                        tl.atomic_add(
                            gw_ptr + offs_v[:, None] * D + offs_k[None, :],
                            gw,
                            mask=mask_v[:, None] & mask_k[None, :],
                            sem="relaxed",
                        )


# H100 configurations (BLOCK_N, BLOCK_V, BLOCK_K, num_warps, num_stages); autotuned per _TUNE_KEY.
_FWD_CONFIGS = [
    (128, 128, 64, 8, 3),
    (128, 256, 64, 8, 3),
    (64, 256, 64, 8, 4),
    (128, 128, 32, 4, 4),
    (64, 128, 64, 4, 4),
]
_BWD_CONFIGS = [
    (128, 128, 64, 8, 3),
    (64, 128, 64, 4, 3),
    (128, 64, 64, 4, 3),
    (64, 64, 64, 4, 4),
]
# Interpreter: one small config (the interpreter runs each program in Python; fewer, bigger numpy ops win).
_INTERP_BLOCKS = {"BLOCK_N": 16, "BLOCK_V": 32, "BLOCK_K": 32}
_SPLIT_ALIGN = 256  # vocabulary slices per split are multiples of the largest BLOCK_V
# (triton adds the tensor arguments' dtypes to the key by itself)
_TUNE_KEY = ["D", "V", "N_BUCKET", "DOT_FP32", "PRECISION", "LOW_FROM_W"]


@functools.lru_cache(maxsize=4)
def triton_kernels(interpret: bool) -> dict[str, Any]:
    """Decorate the kernels (``triton.jit``; plus ``triton.autotune`` when compiling for a GPU)."""
    global _tile_dot
    if _tile_dot is None:
        _tile_dot = triton.jit(_tile_dot_impl)
    fwd = triton.jit(_lse_fwd_kernel)
    bwd = triton.jit(_lse_bwd_kernel)
    combine = triton.jit(_combine_kernel)
    if interpret:
        return {"fwd": fwd, "bwd": bwd, "combine": combine, "tuned": False}

    def cfgs(table: list[tuple[int, int, int, int, int]]) -> list[Any]:
        return [
            triton.Config({"BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_K": bk}, num_warps=nw, num_stages=ns)
            for bn, bv, bk, nw, ns in table
        ]

    fwd_t = triton.autotune(cfgs(_FWD_CONFIGS), key=_TUNE_KEY)(fwd)
    bwd_t = triton.autotune(
        cfgs(_BWD_CONFIGS),
        key=[*_TUNE_KEY, "NEED_GH", "NEED_GW"],
        reset_to_zero=["gh_ptr", "gw_ptr"],
    )(bwd)
    return {"fwd": fwd_t, "bwd": bwd_t, "combine": combine, "tuned": True}


def n_bucket(n: int) -> int:
    """Autotune bucket of a token count: ``n`` rounded up to a power of two, capped at ``N_BUCKET_CAP``."""
    if n <= 1:
        return 1
    return min(1 << (n - 1).bit_length(), N_BUCKET_CAP)


def dot_precision(
    hidden_dtype: torch.dtype, weight_dtype: torch.dtype, interp: bool
) -> tuple[bool, str, bool]:
    """``(DOT_FP32, PRECISION, LOW_FROM_W)`` for the kernels' ``tl.dot`` calls (policy in the module doc).

    ``DOT_FP32``: fp32 operands with ``PRECISION`` (``"ieee"`` or ``"tf32"``); otherwise 16-bit operands of
    the hidden states' type, or of the weight's type when ``LOW_FROM_W`` (fp32 hidden, 16-bit weight).

    Raises:
        ValueError: ``$AGENTRM_KERNEL_DOT`` is not ``auto`` or ``ieee``.
    """
    mode = os.environ.get(DOT_ENV, "auto").strip().lower() or "auto"
    if mode not in ("auto", "ieee"):
        raise ValueError(f"${DOT_ENV}={mode!r}: expected 'auto' (tensor-core dots) or 'ieee' (exact fp32)")
    if interp or mode == "ieee":
        return True, "ieee", False
    if hidden_dtype != torch.float32:
        return False, "ieee", False
    if weight_dtype != torch.float32:
        return False, "ieee", True
    # both fp32: follow torch's own switch (torch.set_float32_matmul_precision("high") allows TF32)
    return True, ("ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"), False


def _num_splits(n: int, v: int, interp: bool, device: torch.device) -> tuple[int, int]:
    """Vocabulary split count and slice length so that the forward grid fills the GPU."""
    if interp:
        splits = 2 if v > 2 * _INTERP_BLOCKS["BLOCK_V"] else 1
    else:
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        n_blocks = triton.cdiv(max(n, 1), 128)
        splits = max(1, min(triton.cdiv(2 * sms, n_blocks), triton.cdiv(v, 4 * _SPLIT_ALIGN), 64))
    align = _INTERP_BLOCKS["BLOCK_V"] if interp else _SPLIT_ALIGN
    per = triton.cdiv(triton.cdiv(v, splits), align) * align
    return triton.cdiv(v, per), per


def _flags(hidden: Tensor, weight: Tensor, n: int, interp: bool) -> dict[str, Any]:
    dot_fp32, prec, low_from_w = dot_precision(hidden.dtype, weight.dtype, interp)
    return {"N_BUCKET": n_bucket(n), "DOT_FP32": dot_fp32, "PRECISION": prec, "LOW_FROM_W": low_from_w}


def triton_forward(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    steps: tuple[Tensor, Tensor, float, int] | None = None,
    num_splits: int | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Triton forward. Returns ``(logp[N], lse[N], rewards[S] or None)``, all fp32.

    ``steps = (step_ids, ref_logp, beta, num_steps)`` fuses the segment sum into the combine kernel.
    ``num_splits`` overrides the vocabulary split count (tests).
    """
    interp = interpreting()
    k = triton_kernels(interp)
    n, d = hidden.shape
    v = weight.shape[0]
    dev = hidden.device
    targets = targets.contiguous()
    logp = torch.empty(n, dtype=torch.float32, device=dev)
    lse = torch.empty(n, dtype=torch.float32, device=dev)
    rewards = torch.zeros(steps[3], dtype=torch.float32, device=dev) if steps is not None else None
    if n == 0:
        return logp, lse, rewards
    splits, per = _num_splits(n, v, interp, dev)
    if num_splits is not None:
        per = triton.cdiv(triton.cdiv(v, num_splits), 16) * 16
        splits = triton.cdiv(v, per)
    part = torch.empty((3, splits, n), dtype=torch.float32, device=dev)
    args = (hidden, weight, targets, part[0], part[1], part[2], n, v, d, per)
    args += (hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1))
    flags = _flags(hidden, weight, n, interp)
    if k["tuned"]:
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), splits)  # noqa: E731
        k["fwd"][grid](*args, **flags)
    else:
        grid = (triton.cdiv(n, _INTERP_BLOCKS["BLOCK_N"]), splits)
        k["fwd"][grid](*args, **flags, **_INTERP_BLOCKS)
    if steps is not None:
        sid, ref, beta, num_steps = steps
        sid, ref, fuse = sid.contiguous(), ref.contiguous(), num_steps > 0
    else:
        sid, ref, beta, num_steps, fuse = targets, logp, 0.0, 0, False
    block = 128 if interp else 1024
    k["combine"][(triton.cdiv(n, block),)](
        part[0],
        part[1],
        part[2],
        targets,
        logp,
        lse,
        sid,
        ref,
        rewards if fuse else logp,
        n,
        num_steps,
        float(beta),
        NUM_SPLITS=splits,
        BLOCK=block,
        FUSE_STEPS=fuse,
    )
    return logp, lse, rewards


def triton_backward(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    lse: Tensor,
    g: Tensor,
    need_h: bool,
    need_w: bool,
    filter_eps: float = 0.0,
) -> tuple[Tensor | None, Tensor | None]:
    """Triton backward. ``g[N]`` fp32 (0 at ignored tokens). Returns fp32 grads (``None`` if not needed).

    ``filter_eps``: skip tiles whose ``|onehot - softmax|`` is below it everywhere (gradient filtering, see
    :func:`agentrm.kernels.logratio_reference.grad_filter_eps`); ``0.0`` = off (exact skips only).
    """
    interp = interpreting()
    k = triton_kernels(interp)
    n, d = hidden.shape
    v = weight.shape[0]
    dev = hidden.device
    gh = torch.zeros((n, d), dtype=torch.float32, device=dev) if need_h else None
    gw = torch.zeros((v, d), dtype=torch.float32, device=dev) if need_w else None
    if n == 0 or not (need_h or need_w):
        return gh, gw
    # placeholder for a gradient buffer that is not needed: never touched by the kernel, but a separate
    # tensor, because the autotuner's reset_to_zero zeroes whatever is passed as gh_ptr / gw_ptr
    dummy = torch.zeros(1, dtype=torch.float32, device=dev)
    args = (hidden, weight, targets.contiguous(), lse, g.contiguous(), gh if need_h else dummy)
    args += (
        gw if need_w else dummy,
        n,
        v,
        d,
        hidden.stride(0),
        hidden.stride(1),
        weight.stride(0),
        weight.stride(1),
        float(filter_eps),
    )
    flags = {**_flags(hidden, weight, n, interp), "NEED_GH": need_h, "NEED_GW": need_w}
    if k["tuned"]:
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(v, meta["BLOCK_V"]))  # noqa: E731
        k["bwd"][grid](*args, **flags)
    else:
        grid = (triton.cdiv(n, _INTERP_BLOCKS["BLOCK_N"]), triton.cdiv(v, _INTERP_BLOCKS["BLOCK_V"]))
        k["bwd"][grid](*args, **flags, **_INTERP_BLOCKS)
    return gh, gw

