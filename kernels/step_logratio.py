"""Per-token log-probabilities of targets and per-step implicit-PRM rewards, without ``[N, V]`` logits.

Ops (``N`` tokens, hidden size ``H``, vocabulary ``V``, ``S`` steps):

* :func:`token_logprobs` ``(hidden[N,H], weight[V,H], targets[N]) -> logp[N]`` (fp32):
  ``log_softmax(hidden @ weight.T)[t, targets[t]]``; ``targets[t] < 0`` means ignore (logp 0, no gradient).
* :func:`step_logratio` ``(..., step_ids[N], ref_logp[N], beta, num_steps) -> rewards[S]`` (fp32):
  ``r_s = beta * sum_{t: step_ids[t] == s, targets[t] >= 0} (logp_t - ref_logp_t)``; ``step_ids == -1`` ignores.

Implementations:

* :func:`step_logratio_eager` / :func:`token_logprobs_eager`: the obvious code (materialises logits); oracle.
* :func:`step_logratio_chunked` / :func:`token_logprobs_chunked`: pure torch, chunked over tokens and
  vocabulary with an online log-sum-exp in fp32; peak extra memory ``O(chunk_tokens * chunk_vocab)``,
  independent of ``N`` and ``V``. The CPU path.
* Triton (CUDA, or CPU under ``TRITON_INTERPRET=1``):

  - forward ``_lse_fwd_kernel``: grid ``(cdiv(N, BLOCK_N), num_splits)``. Each program owns a token block and
    one contiguous slice of the vocabulary, loops over it in ``BLOCK_V`` tiles, computes each logit tile with
    ``tl.dot`` over ``H`` in ``BLOCK_K`` slices (bf16 in, fp32 accumulate), and keeps an online
    (max, sum-exp) per token row plus the target logit. Splitting the vocabulary keeps all SMs busy when
    ``N`` is small (beam-search scoring); ``_combine_kernel`` merges the split partials into ``lse``/``logp``
    and, in the no-grad scoring path, also adds ``beta * (logp - ref)`` into the step rewards with
    ``tl.atomic_add`` (the segment sum is fused; no ``[N]`` intermediate goes back through torch).
  - backward ``_lse_bwd_kernel``: grid ``(cdiv(N, BLOCK_N), cdiv(V, BLOCK_V))``. Each program recomputes its
    logit tile, forms ``dlogits = g * (onehot(target) - exp(logits - lse))`` with the saved LSE, then loops
    over ``H`` in ``BLOCK_K`` slices: ``grad_hidden[n-block, k] += dot(dlogits, W[v-block, k])`` and
    ``grad_W[v-block, k] += dot(dlogits^T, hidden[n-block, k])``, both with fp32 ``tl.atomic_add``.

    Choice (atomics, in the style of Cut Cross-Entropy, Wijmans et al. 2024) vs. the alternatives: a
    kernel that owns a token block and accumulates ``grad_hidden[BLOCK_N, H]`` needs ``H``-sized registers
    (4096 fp32 per row: impossible) or recomputes the logit tile once per ``H`` slice (``H / BLOCK_H`` times
    the forward FLOPs); writing ``dlogits`` chunks to HBM and calling cuBLAS (Liger-style) costs
    ``chunk * V`` memory and a second read of it. Atomics keep memory at the two fp32 gradient buffers and
    do exactly one logit recompute. Two mitigations of atomic traffic: tiles whose ``dlogits`` are all zero
    (token block fully ignored, or softmax underflow far from the target) skip the accumulation loop
    entirely (exact), and ``grad_W`` / ``grad_hidden`` are skipped when not needed (frozen ``lm_head``).
    Atomic fp32 accumulation makes the Triton backward non-deterministic in the last bits; the torch
    backend is deterministic.

Precision: logits, LSE and rewards are fp32 everywhere. On CUDA with bf16 inputs the Triton dots take bf16
operands (fp32 accumulate); ``dlogits`` is rounded to bf16 for the backward dots. The Triton interpreter in
triton 3.9 computes ``tl.dot`` on bf16 operands incorrectly, so when interpreting, operands are upcast to fp32.
"""

import functools
import math
from typing import Any

import torch
from torch import Tensor

from .dispatch import interpreting, resolve_backend, triton_available

__all__ = [
    "step_logratio",
    "step_logratio_chunked",
    "step_logratio_eager",
    "token_logprobs",
    "token_logprobs_chunked",
    "token_logprobs_eager",
]

DEFAULT_CHUNK_TOKENS = 1024
DEFAULT_CHUNK_VOCAB = 8192


# --------------------------------------------------------------------------------------------------------
# input checks and the (cheap, O(N)) segment sum shared by all paths
# --------------------------------------------------------------------------------------------------------
def _check_lm_inputs(hidden: Tensor, weight: Tensor, targets: Tensor) -> None:
    if hidden.dim() != 2 or weight.dim() != 2:
        raise ValueError(
            f"hidden must be [N, H] and weight [V, H]; got {tuple(hidden.shape)}, {tuple(weight.shape)}"
        )
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden size mismatch: hidden {tuple(hidden.shape)} vs weight {tuple(weight.shape)}"
        )
    if targets.shape != (hidden.shape[0],):
        raise ValueError(f"targets must be [N={hidden.shape[0]}]; got {tuple(targets.shape)}")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise TypeError(f"targets must be an integer tensor; got {targets.dtype}")
    if hidden.device != weight.device or hidden.device != targets.device:
        raise ValueError("hidden, weight and targets must be on the same device")
    if not targets.is_cuda and targets.numel() and int(targets.max()) >= weight.shape[0]:
        # (on CUDA the check would force a host sync; out-of-range targets there give logp = -lse)
        raise ValueError(f"targets must be < V={weight.shape[0]} (or < 0 to ignore)")


def _check_step_inputs(n: int, step_ids: Tensor, ref_logp: Tensor, num_steps: int) -> None:
    if step_ids.shape != (n,) or ref_logp.shape != (n,):
        raise ValueError(
            f"step_ids and ref_logp must be [N={n}]; got {tuple(step_ids.shape)}, {tuple(ref_logp.shape)}"
        )
    if step_ids.dtype.is_floating_point or step_ids.dtype == torch.bool:
        raise TypeError(f"step_ids must be an integer tensor; got {step_ids.dtype}")
    if num_steps < 0:
        raise ValueError(f"num_steps must be >= 0; got {num_steps}")
    if not step_ids.is_cuda and step_ids.numel() and int(step_ids.max()) >= num_steps:
        # (no check on CUDA, to avoid a host sync: the Triton path drops ids >= num_steps)
        raise ValueError(f"step_ids must be < num_steps={num_steps} (or -1 to ignore)")


def _segment_sum(
    logp: Tensor, ref_logp: Tensor, targets: Tensor, step_ids: Tensor, beta: float, num_steps: int
) -> Tensor:
    """``beta * segment_sum(logp - ref)`` over valid tokens; differentiable w.r.t. ``logp`` and ``ref_logp``.

    Args:
        logp: ``[N]`` fp32. ref_logp: ``[N]``. targets, step_ids: ``[N]`` int.
    Returns:
        ``[S]`` fp32.
    """
    valid = (step_ids >= 0) & (step_ids < num_steps) & (targets >= 0)
    diff = torch.where(valid, logp - ref_logp.to(torch.float32), torch.zeros((), device=logp.device))
    if num_steps == 0:
        return diff[:0] * beta  # [0], still attached to the graph
    index = torch.where(valid, step_ids, torch.zeros_like(step_ids)).to(torch.int64)
    out = torch.zeros(num_steps, dtype=torch.float32, device=logp.device)
    return out.index_add(0, index, diff) * beta


# --------------------------------------------------------------------------------------------------------
# eager reference (materialises [N, V] logits)
# --------------------------------------------------------------------------------------------------------
def token_logprobs_eager(hidden: Tensor, weight: Tensor, targets: Tensor) -> Tensor:
    """Reference: ``log_softmax(hidden @ weight.T)`` gathered at ``targets``; materialises ``[N, V]``.

    Args:
        hidden: ``[N, H]``. weight: ``[V, H]``. targets: ``[N]`` int, ``< 0`` = ignore.
    Returns:
        ``[N]`` fp32; 0 at ignored tokens. Differentiable through plain autograd.
    """
    _check_lm_inputs(hidden, weight, targets)
    logits = hidden @ weight.T  # [N, V] in the input dtype (the obvious implementation)
    logp_all = torch.log_softmax(logits.float(), dim=-1)
    valid = targets >= 0
    picked = logp_all.gather(1, targets.clamp_min(0).long().unsqueeze(1)).squeeze(1)
    return torch.where(valid, picked, torch.zeros((), device=picked.device))


def step_logratio_eager(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    step_ids: Tensor,
    ref_logp: Tensor,
    beta: float,
    num_steps: int,
    *,
    return_token_logp: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Reference :func:`step_logratio`: logits + log_softmax + gather + ``index_add``. Materialises ``[N, V]``.

    Returns:
        ``rewards[S]`` fp32, and ``logp[N]`` fp32 if ``return_token_logp``.
    """
    _check_step_inputs(hidden.shape[0], step_ids, ref_logp, num_steps)
    logp = token_logprobs_eager(hidden, weight, targets)
    rewards = _segment_sum(logp, ref_logp, targets, step_ids, beta, num_steps)
    return (rewards, logp) if return_token_logp else rewards


# --------------------------------------------------------------------------------------------------------
# chunked torch path (CPU path; memory O(chunk_tokens * chunk_vocab))
# --------------------------------------------------------------------------------------------------------
def _mm_fp32(a: Tensor, b_t: Tensor) -> Tensor:
    """``a @ b_t`` as fp32. fp32 inputs, or CPU (upcast chunks: exact, and CPU bf16 GEMMs are slow anyway);
    on CUDA low-precision inputs use the native GEMM (fp32 accumulate, output rounded, as the eager path).
    """
    if a.dtype == torch.float32 and b_t.dtype == torch.float32:
        return a @ b_t
    if a.is_cuda:
        return (a @ b_t.to(a.dtype)).float()
    return a.float() @ b_t.float()


def _torch_forward(
    hidden: Tensor, weight: Tensor, targets: Tensor, chunk_tokens: int, chunk_vocab: int
) -> tuple[Tensor, Tensor]:
    """Online-LSE forward. Returns ``(logp[N], lse[N])`` fp32; logp is 0 at ignored tokens."""
    n, v = hidden.shape[0], weight.shape[0]
    dev = hidden.device
    logp = torch.zeros(n, dtype=torch.float32, device=dev)
    lse = torch.zeros(n, dtype=torch.float32, device=dev)
    for n0 in range(0, n, chunk_tokens):
        n1 = min(n0 + chunk_tokens, n)
        h = hidden[n0:n1]
        t = targets[n0:n1].long()
        run_lse = torch.full((n1 - n0,), -math.inf, dtype=torch.float32, device=dev)
        tgt_logit = torch.zeros(n1 - n0, dtype=torch.float32, device=dev)
        for v0 in range(0, v, chunk_vocab):
            v1 = min(v0 + chunk_vocab, v)
            logits = _mm_fp32(h, weight[v0:v1].T)  # [n_c, v_c] fp32
            in_chunk = (t >= v0) & (t < v1)
            local = (t - v0).clamp(0, v1 - v0 - 1).unsqueeze(1)
            tgt_logit += torch.where(in_chunk, logits.gather(1, local).squeeze(1), 0.0)
            # online log-sum-exp: merge this chunk's (fused, max-shifted) LSE into the running one
            run_lse = torch.logaddexp(run_lse, torch.logsumexp(logits, dim=1))
        lse_c = run_lse
        lse[n0:n1] = lse_c
        logp[n0:n1] = torch.where(t >= 0, tgt_logit - lse_c, 0.0)
    return logp, lse


def _torch_backward(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    lse: Tensor,
    g: Tensor,
    need_h: bool,
    need_w: bool,
    chunk_tokens: int,
    chunk_vocab: int,
) -> tuple[Tensor | None, Tensor | None]:
    """Recompute-per-chunk backward. ``g[N]`` fp32 (already 0 at ignored tokens).

    Returns fp32 ``grad_hidden[N, H]`` and ``grad_weight[V, H]`` (``None`` where not needed).
    """
    n, v = hidden.shape[0], weight.shape[0]
    gh = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_h else None
    gw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
    low_cuda = hidden.is_cuda and hidden.dtype != torch.float32
    for n0 in range(0, n, chunk_tokens):
        n1 = min(n0 + chunk_tokens, n)
        g_c = g[n0:n1]
        if not hidden.is_cuda and not bool(g_c.any()):
            continue  # whole chunk ignored (cheap check on CPU only)
        h = hidden[n0:n1]
        t = targets[n0:n1].long()
        lse_c = lse[n0:n1].unsqueeze(1)
        for v0 in range(0, v, chunk_vocab):
            v1 = min(v0 + chunk_vocab, v)
            w = weight[v0:v1]
            dl = _mm_fp32(h, w.T).sub_(lse_c).exp_().mul_(-g_c.unsqueeze(1))  # -g * softmax
            in_chunk = (t >= v0) & (t < v1)
            local = (t - v0).clamp(0, v1 - v0 - 1).unsqueeze(1)
            dl.scatter_add_(1, local, torch.where(in_chunk, g_c, 0.0).unsqueeze(1))  # + g * onehot
            if low_cuda:
                dl_op, w_op, h_op = dl.to(hidden.dtype), w.to(hidden.dtype), h
            else:
                dl_op, w_op, h_op = dl, w.float(), h.float()
            if gh is not None:
                gh[n0:n1] += dl_op @ w_op
            if gw is not None:
                gw[v0:v1] += dl_op.T @ h_op
    return gh, gw


# --------------------------------------------------------------------------------------------------------
# Triton kernels (decorated lazily so that TRITON_INTERPRET is read at first use, not at import)
# --------------------------------------------------------------------------------------------------------
if triton_available():
    import triton
    import triton.language as tl

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
        DOT_FP32: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
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
                if DOT_FP32:
                    acc = tl.dot(h.to(tl.float32), w.to(tl.float32), acc, input_precision=PRECISION)
                else:
                    acc = tl.dot(h, w, acc)
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
        BLOCK_N: tl.constexpr,
        BLOCK_V: tl.constexpr,
        BLOCK_K: tl.constexpr,
        DOT_FP32: tl.constexpr,
        PRECISION: tl.constexpr,
        NEED_GH: tl.constexpr,
        NEED_GW: tl.constexpr,
    ):
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
                if DOT_FP32:
                    acc = tl.dot(h.to(tl.float32), w.to(tl.float32), acc, input_precision=PRECISION)
                else:
                    acc = tl.dot(h, w, acc)
            lse = tl.load(lse_ptr + offs_n, mask=mask_n, other=0.0)
            tgt = tl.load(tgt_ptr + offs_n, mask=mask_n, other=-1).to(tl.int64)
            p = tl.where(mask_v[None, :] & mask_n[:, None], tl.exp(acc - lse[:, None]), 0.0)
            onehot = tl.where(offs_v[None, :] == tgt[:, None], 1.0, 0.0)
            dl = g[:, None] * (onehot - p)  # [BLOCK_N, BLOCK_V] fp32 d logp / d logits
            if tl.max(tl.max(tl.abs(dl), axis=1), axis=0) > 0.0:  # exact skip: softmax underflowed
                if DOT_FP32:
                    dl_op = dl
                else:
                    dl_op = dl.to(h_ptr.dtype.element_ty)
                for k0 in range(0, D, BLOCK_K):
                    offs_k = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
                    mask_k = offs_k < D
                    if NEED_GH:
                        w2 = tl.load(  # [BLOCK_V, BLOCK_K]
                            w_ptr + offs_v[:, None] * stride_wv + offs_k[None, :] * stride_wd,
                            mask=mask_v[:, None] & mask_k[None, :],
                            other=0.0,
                        )
                        if DOT_FP32:
                            gh = tl.dot(dl_op, w2.to(tl.float32), input_precision=PRECISION)
                        else:
                            gh = tl.dot(dl_op, w2)
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
                        if DOT_FP32:
                            gw = tl.dot(tl.trans(dl_op), h2.to(tl.float32), input_precision=PRECISION)
                        else:
                            gw = tl.dot(tl.trans(dl_op), h2)
                        tl.atomic_add(
                            gw_ptr + offs_v[:, None] * D + offs_k[None, :],
                            gw,
                            mask=mask_v[:, None] & mask_k[None, :],
                            sem="relaxed",
                        )


# H100 configurations (BLOCK_N, BLOCK_V, BLOCK_K, num_warps, num_stages); autotuned per (D, V).
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


@functools.lru_cache(maxsize=4)
def _triton_kernels(interpret: bool) -> dict[str, Any]:
    """Decorate the kernels (``triton.jit``; plus ``triton.autotune`` when compiling for a GPU)."""
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

    fwd_t = triton.autotune(cfgs(_FWD_CONFIGS), key=["D", "V", "DOT_FP32"])(fwd)
    bwd_t = triton.autotune(
        cfgs(_BWD_CONFIGS),
        key=["D", "V", "DOT_FP32", "NEED_GH", "NEED_GW"],
        reset_to_zero=["gh_ptr", "gw_ptr"],
    )(bwd)
    return {"fwd": fwd_t, "bwd": bwd_t, "combine": combine, "tuned": True}


def _dot_flags(hidden: Tensor, weight: Tensor, interp: bool) -> tuple[bool, str]:
    """(DOT_FP32, PRECISION): fp32 dots with IEEE precision for fp32 inputs or under the interpreter."""
    fp32 = hidden.dtype == torch.float32 or weight.dtype == torch.float32 or hidden.dtype != weight.dtype
    return (fp32 or interp), "ieee"


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


def _triton_forward(
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
    k = _triton_kernels(interp)
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
    dot_fp32, prec = _dot_flags(hidden, weight, interp)
    args = (hidden, weight, targets, part[0], part[1], part[2], n, v, d, per)
    args += (hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1))
    if k["tuned"]:
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), splits)  # noqa: E731
        k["fwd"][grid](*args, DOT_FP32=dot_fp32, PRECISION=prec)
    else:
        grid = (triton.cdiv(n, _INTERP_BLOCKS["BLOCK_N"]), splits)
        k["fwd"][grid](*args, DOT_FP32=dot_fp32, PRECISION=prec, **_INTERP_BLOCKS)
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


def _triton_backward(
    hidden: Tensor, weight: Tensor, targets: Tensor, lse: Tensor, g: Tensor, need_h: bool, need_w: bool
) -> tuple[Tensor | None, Tensor | None]:
    """Triton backward. ``g[N]`` fp32 (0 at ignored tokens). Returns fp32 grads (``None`` if not needed)."""
    interp = interpreting()
    k = _triton_kernels(interp)
    n, d = hidden.shape
    v = weight.shape[0]
    dev = hidden.device
    gh = torch.zeros((n, d), dtype=torch.float32, device=dev) if need_h else None
    gw = torch.zeros((v, d), dtype=torch.float32, device=dev) if need_w else None
    if n == 0 or not (need_h or need_w):
        return gh, gw
    dot_fp32, prec = _dot_flags(hidden, weight, interp)
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
    )
    flags = {"DOT_FP32": dot_fp32, "PRECISION": prec, "NEED_GH": need_h, "NEED_GW": need_w}
    if k["tuned"]:
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(v, meta["BLOCK_V"]))  # noqa: E731
        k["bwd"][grid](*args, **flags)
    else:
        grid = (triton.cdiv(n, _INTERP_BLOCKS["BLOCK_N"]), triton.cdiv(v, _INTERP_BLOCKS["BLOCK_V"]))
        k["bwd"][grid](*args, **flags, **_INTERP_BLOCKS)
    return gh, gw


# --------------------------------------------------------------------------------------------------------
# autograd wrapper and public API
# --------------------------------------------------------------------------------------------------------
class _TokenLogprobsFn(torch.autograd.Function):
    """logp[N] = log_softmax(hidden @ weight.T)[targets]; backward recomputes logits per chunk / tile."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        targets: Tensor,
        backend: str,
        chunk_tokens: int,
        chunk_vocab: int,
    ) -> Tensor:
        if backend == "triton":
            logp, lse, _ = _triton_forward(hidden, weight, targets)
        else:
            logp, lse = _torch_forward(hidden, weight, targets, chunk_tokens, chunk_vocab)
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.backend, ctx.chunks = backend, (chunk_tokens, chunk_vocab)
        return logp

    @staticmethod
    def backward(ctx: Any, grad_logp: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        hidden, weight, targets, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        g = torch.where(targets >= 0, grad_logp.float(), 0.0)
        if ctx.backend == "triton":
            gh, gw = _triton_backward(hidden, weight, targets, lse, g, need_h, need_w)
        else:
            gh, gw = _torch_backward(hidden, weight, targets, lse, g, need_h, need_w, *ctx.chunks)
        gh = gh.to(hidden.dtype) if gh is not None else None
        gw = gw.to(weight.dtype) if gw is not None else None
        return gh, gw, None, None, None, None


def _needs_grad(*tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _token_logprobs_impl(
    hidden: Tensor, weight: Tensor, targets: Tensor, backend: str, chunk_tokens: int, chunk_vocab: int
) -> Tensor:
    if _needs_grad(hidden, weight):
        return _TokenLogprobsFn.apply(hidden, weight, targets, backend, chunk_tokens, chunk_vocab)
    if backend == "triton":
        return _triton_forward(hidden, weight, targets)[0]
    return _torch_forward(hidden, weight, targets, chunk_tokens, chunk_vocab)[0]


def token_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor, *, backend: str | None = None) -> Tensor:
    """``log_softmax(hidden @ weight.T)[t, targets[t]]`` without materialising ``[N, V]`` logits.

    Args:
        hidden: ``[N, H]`` final hidden states (fp32 / bf16 / fp16).
        weight: ``[V, H]`` LM-head weight.
        targets: ``[N]`` int next-token ids; ``< 0`` = ignore (logp 0, no gradient).
        backend: ``"torch"`` | ``"triton"`` | ``None``/``"auto"`` (see :mod:`agentrm.kernels.dispatch`).

    Returns:
        ``[N]`` fp32 log-probabilities; differentiable w.r.t. ``hidden`` and ``weight``.
    """
    _check_lm_inputs(hidden, weight, targets)
    be = resolve_backend(backend, hidden)
    return _token_logprobs_impl(hidden, weight, targets, be, DEFAULT_CHUNK_TOKENS, DEFAULT_CHUNK_VOCAB)


def token_logprobs_chunked(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    chunk_vocab: int = DEFAULT_CHUNK_VOCAB,
) -> Tensor:
    """Pure-torch :func:`token_logprobs`, chunked over tokens and vocabulary (online LSE in fp32).

    Peak extra memory is ``O(chunk_tokens * chunk_vocab)`` fp32 (plus fp32 gradient buffers in backward).

    Args:
        hidden: ``[N, H]``. weight: ``[V, H]``. targets: ``[N]`` int, ``< 0`` = ignore.
    Returns:
        ``[N]`` fp32, differentiable (backward recomputes each chunk's logits).
    """
    _check_lm_inputs(hidden, weight, targets)
    return _token_logprobs_impl(hidden, weight, targets, "torch", chunk_tokens, chunk_vocab)


def _step_logratio_impl(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    step_ids: Tensor,
    ref_logp: Tensor,
    beta: float,
    num_steps: int,
    return_token_logp: bool,
    backend: str,
    chunk_tokens: int,
    chunk_vocab: int,
) -> Tensor | tuple[Tensor, Tensor]:
    _check_lm_inputs(hidden, weight, targets)
    _check_step_inputs(hidden.shape[0], step_ids, ref_logp, num_steps)
    if backend == "triton" and not _needs_grad(hidden, weight, ref_logp):
        # scoring path: segment sum fused into the combine kernel
        logp, _, rewards = _triton_forward(
            hidden, weight, targets, (step_ids, ref_logp, float(beta), num_steps)
        )
        assert rewards is not None
    else:
        logp = _token_logprobs_impl(hidden, weight, targets, backend, chunk_tokens, chunk_vocab)
        rewards = _segment_sum(logp, ref_logp, targets, step_ids, beta, num_steps)
    return (rewards, logp) if return_token_logp else rewards


def step_logratio(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    step_ids: Tensor,
    ref_logp: Tensor,
    beta: float,
    num_steps: int,
    *,
    return_token_logp: bool = False,
    backend: str | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Implicit-PRM step rewards ``r_s = beta * sum_{t in step s} (logp_t - ref_logp_t)``.

    Never materialises ``[N, V]`` logits. Without autograd (``torch.no_grad()`` or no input requiring grad)
    this is the scoring path (Triton: segment sum fused into the kernel); otherwise gradients flow to
    ``hidden``, ``weight`` (and ``ref_logp`` if it requires grad), correct for any upstream gradient on the
    rewards and on the returned token logp.

    Args:
        hidden: ``[N, H]`` policy hidden states. weight: ``[V, H]`` LM head.
        targets: ``[N]`` int next-token ids; ``< 0`` = ignore (the token contributes nothing).
        step_ids: ``[N]`` int step index per token in ``[0, num_steps)``; ``-1`` = not in any step.
        ref_logp: ``[N]`` reference-model log-probabilities of the same targets.
        beta: reward scale. num_steps: ``S`` (may be 0).
        return_token_logp: also return the policy ``logp[N]``.
        backend: ``"torch"`` | ``"triton"`` | ``None``/``"auto"``.

    Returns:
        ``rewards[S]`` fp32, or ``(rewards[S], logp[N])`` fp32 if ``return_token_logp``.
    """
    be = resolve_backend(backend, hidden)
    return _step_logratio_impl(
        hidden,
        weight,
        targets,
        step_ids,
        ref_logp,
        beta,
        num_steps,
        return_token_logp,
        be,
        DEFAULT_CHUNK_TOKENS,
        DEFAULT_CHUNK_VOCAB,
    )


def step_logratio_chunked(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    step_ids: Tensor,
    ref_logp: Tensor,
    beta: float,
    num_steps: int,
    *,
    return_token_logp: bool = False,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    chunk_vocab: int = DEFAULT_CHUNK_VOCAB,
) -> Tensor | tuple[Tensor, Tensor]:
    """Pure-torch chunked :func:`step_logratio` (the CPU path). Same arguments and returns.

    Peak extra memory ``O(chunk_tokens * chunk_vocab)``, independent of ``N`` and ``V``.
    """
    return _step_logratio_impl(
        hidden,
        weight,
        targets,
        step_ids,
        ref_logp,
        beta,
        num_steps,
        return_token_logp,
        "torch",
        chunk_tokens,
        chunk_vocab,
    )
