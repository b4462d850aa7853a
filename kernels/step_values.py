"""Value-head readout at step ends: ``values[s] = head_w . hidden[step_end_idx[s]] + head_b`` (``S`` steps).

Gather-then-dot: the ``Linear(H, 1)`` head runs on the ``S`` step-end rows only, never on all ``N`` tokens.

Implementations:

* :func:`step_values_eager`: the obvious code (head on every token, then index); the test oracle.
* :func:`step_values_torch`: gather-then-dot in torch (``index_select`` + matvec); the CPU path.
* Triton (CUDA, or CPU under ``TRITON_INTERPRET=1``): ``_values_fwd_kernel`` loads ``BLOCK_S`` gathered rows
  and reduces the dot over ``H`` in ``BLOCK_K`` slices in fp32 (optionally applying a sigmoid);
  ``_values_bwd_kernel`` (grid ``(S blocks, H blocks)``) scatters ``g_s * head_w`` into the step-end rows of
  ``grad_hidden`` and accumulates ``sum_s g_s * hidden[idx_s]`` into ``grad_head_w``, both with fp32 atomics
  (atomics on ``grad_hidden`` make duplicate indices in ``step_end_idx`` correct). ``grad_head_b = sum(g)``.
"""

import functools
from typing import Any

import torch
from torch import Tensor

from .dispatch import interpreting, resolve_backend, triton_available

__all__ = ["step_values", "step_values_eager", "step_values_torch"]


def _as_bias(head_b: Tensor | float, ref: Tensor) -> Tensor:
    if isinstance(head_b, Tensor):
        if head_b.numel() != 1:
            raise ValueError(f"head_b must be a scalar (numel 1); got shape {tuple(head_b.shape)}")
        return head_b
    return torch.tensor(float(head_b), dtype=torch.float32, device=ref.device)


def _check(hidden: Tensor, head_w: Tensor, step_end_idx: Tensor) -> None:
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be [N, H]; got {tuple(hidden.shape)}")
    if head_w.shape != (hidden.shape[1],):
        raise ValueError(f"head_w must be [H={hidden.shape[1]}]; got {tuple(head_w.shape)}")
    if step_end_idx.dim() != 1 or step_end_idx.dtype.is_floating_point or step_end_idx.dtype == torch.bool:
        raise ValueError(
            f"step_end_idx must be a 1-D integer tensor; got {step_end_idx.dtype} {tuple(step_end_idx.shape)}"
        )
    if not step_end_idx.is_cuda and step_end_idx.numel():
        lo, hi = int(step_end_idx.min()), int(step_end_idx.max())
        if lo < 0 or hi >= hidden.shape[0]:
            raise IndexError(f"step_end_idx must lie in [0, N={hidden.shape[0]}); got range [{lo}, {hi}]")


def step_values_eager(
    hidden: Tensor, head_w: Tensor, head_b: Tensor | float, step_end_idx: Tensor, *, sigmoid: bool = False
) -> Tensor:
    """Reference: head on all ``N`` tokens (fp32), then index the step ends.

    Args:
        hidden: ``[N, H]``. head_w: ``[H]``. head_b: scalar tensor or float. step_end_idx: ``[S]`` int64.
    Returns:
        ``[S]`` fp32 (sigmoid applied if ``sigmoid``).
    """
    _check(hidden, head_w, step_end_idx)
    all_values = hidden.float() @ head_w.float() + _as_bias(head_b, hidden).float().reshape(())
    out = all_values[step_end_idx.long()]
    return torch.sigmoid(out) if sigmoid else out


def step_values_torch(
    hidden: Tensor, head_w: Tensor, head_b: Tensor | float, step_end_idx: Tensor, *, sigmoid: bool = False
) -> Tensor:
    """Gather-then-dot in torch (the CPU path): ``hidden[step_end_idx] @ head_w + head_b`` in fp32.

    Args:
        hidden: ``[N, H]``. head_w: ``[H]``. head_b: scalar tensor or float. step_end_idx: ``[S]`` int64.
    Returns:
        ``[S]`` fp32; differentiable through plain autograd.
    """
    _check(hidden, head_w, step_end_idx)
    rows = hidden.index_select(0, step_end_idx.long()).float()  # [S, H]
    out = rows @ head_w.float() + _as_bias(head_b, hidden).float().reshape(())
    return torch.sigmoid(out) if sigmoid else out


if triton_available():
    import triton
    import triton.language as tl

    def _values_fwd_kernel(
        h_ptr,
        w_ptr,
        b_ptr,
        idx_ptr,
        out_ptr,
        S,
        D,
        stride_hn,
        stride_hd,
        BLOCK_S: tl.constexpr,
        BLOCK_K: tl.constexpr,
        SIGMOID: tl.constexpr,
    ):
        offs_s = tl.program_id(0).to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)
        mask_s = offs_s < S
        rows = tl.load(idx_ptr + offs_s, mask=mask_s, other=0).to(tl.int64)
        acc = tl.zeros([BLOCK_S], tl.float32)
        for k0 in range(0, D, BLOCK_K):
            offs_k = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
            mask_k = offs_k < D
            h = tl.load(
                h_ptr + rows[:, None] * stride_hn + offs_k[None, :] * stride_hd,
                mask=mask_s[:, None] & mask_k[None, :],
                other=0.0,
            ).to(tl.float32)
            w = tl.load(w_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
            acc += tl.sum(h * w[None, :], axis=1)
        acc += tl.load(b_ptr).to(tl.float32)
        if SIGMOID:
            acc = tl.sigmoid(acc)
        tl.store(out_ptr + offs_s, acc, mask=mask_s)

    def _values_bwd_kernel(
        h_ptr,
        w_ptr,
        idx_ptr,
        g_ptr,  # [S] fp32 gradient w.r.t. the pre-activation value
        gh_ptr,  # [N, D] fp32 contiguous, zero-initialised
        gw_ptr,  # [D] fp32, zero-initialised
        S,
        D,
        stride_hn,
        stride_hd,
        BLOCK_S: tl.constexpr,
        BLOCK_K: tl.constexpr,
        NEED_GH: tl.constexpr,
        NEED_GW: tl.constexpr,
    ):
        offs_s = tl.program_id(0).to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)
        offs_k = tl.program_id(1).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_s = offs_s < S
        mask_k = offs_k < D
        mask = mask_s[:, None] & mask_k[None, :]
        rows = tl.load(idx_ptr + offs_s, mask=mask_s, other=0).to(tl.int64)
        g = tl.load(g_ptr + offs_s, mask=mask_s, other=0.0)
        if NEED_GH:
            w = tl.load(w_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
            tl.atomic_add(
                gh_ptr + rows[:, None] * D + offs_k[None, :],
                g[:, None] * w[None, :],
                mask=mask,
                sem="relaxed",
            )
        if NEED_GW:
            h = tl.load(h_ptr + rows[:, None] * stride_hn + offs_k[None, :] * stride_hd, mask=mask, other=0.0)
            tl.atomic_add(
                gw_ptr + offs_k, tl.sum(g[:, None] * h.to(tl.float32), axis=0), mask=mask_k, sem="relaxed"
            )


_INTERP = {"BLOCK_S": 16, "BLOCK_K": 32}
_CUDA = {"BLOCK_S": 16, "BLOCK_K": 256, "num_warps": 4}


@functools.lru_cache(maxsize=4)
def _kernels(interpret: bool) -> tuple[Any, Any]:
    """Decorate lazily so that ``TRITON_INTERPRET`` is read at first use (``interpret`` keys the cache)."""
    return triton.jit(_values_fwd_kernel), triton.jit(_values_bwd_kernel)


def _triton_forward(hidden: Tensor, head_w: Tensor, bias: Tensor, idx: Tensor, sigmoid: bool) -> Tensor:
    interp = interpreting()
    fwd, _ = _kernels(interp)
    s, d = idx.shape[0], hidden.shape[1]
    out = torch.empty(s, dtype=torch.float32, device=hidden.device)
    if s == 0:
        return out
    cfg = _INTERP if interp else _CUDA
    grid = (triton.cdiv(s, cfg["BLOCK_S"]),)
    fwd[grid](
        hidden,
        head_w.contiguous(),
        bias.reshape(1),
        idx,
        out,
        s,
        d,
        hidden.stride(0),
        hidden.stride(1),
        SIGMOID=sigmoid,
        **cfg,
    )
    return out


def _triton_backward(
    hidden: Tensor, head_w: Tensor, idx: Tensor, g: Tensor, need_h: bool, need_w: bool
) -> tuple[Tensor | None, Tensor | None]:
    interp = interpreting()
    _, bwd = _kernels(interp)
    s, (n, d) = idx.shape[0], hidden.shape
    gh = torch.zeros((n, d), dtype=torch.float32, device=hidden.device) if need_h else None
    gw = torch.zeros(d, dtype=torch.float32, device=hidden.device) if need_w else None
    if s == 0 or not (need_h or need_w):
        return gh, gw
    cfg = _INTERP if interp else _CUDA
    grid = (triton.cdiv(s, cfg["BLOCK_S"]), triton.cdiv(d, cfg["BLOCK_K"]))
    dummy = g
    bwd[grid](
        hidden,
        head_w.contiguous(),
        idx,
        g.contiguous(),
        gh if need_h else dummy,
        gw if need_w else dummy,
        s,
        d,
        hidden.stride(0),
        hidden.stride(1),
        NEED_GH=need_h,
        NEED_GW=need_w,
        **cfg,
    )
    return gh, gw


class _StepValuesFn(torch.autograd.Function):
    """Triton gather-then-dot with a Triton backward (grad for hidden, head_w, head_b)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, hidden: Tensor, head_w: Tensor, bias: Tensor, idx: Tensor, sigmoid: bool
    ) -> Tensor:
        out = _triton_forward(hidden, head_w, bias, idx, sigmoid)
        ctx.save_for_backward(hidden, head_w, bias, idx, out)
        ctx.sigmoid = sigmoid
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        hidden, head_w, bias, idx, out = ctx.saved_tensors
        g = grad_out.float()
        if ctx.sigmoid:
            g = g * out * (1.0 - out)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        gh, gw = _triton_backward(hidden, head_w, idx, g, need_h, need_w)
        gb = g.sum().reshape(bias.shape).to(bias.dtype) if need_b else None
        return (
            gh.to(hidden.dtype) if gh is not None else None,
            gw.to(head_w.dtype) if gw is not None else None,
            gb,
            None,
            None,
        )


def step_values(
    hidden: Tensor,
    head_w: Tensor,
    head_b: Tensor | float,
    step_end_idx: Tensor,
    *,
    sigmoid: bool = False,
    backend: str | None = None,
) -> Tensor:
    """Value head at step ends only: ``values[s] = hidden[step_end_idx[s]] . head_w + head_b``.

    Args:
        hidden: ``[N, H]`` hidden states (any float dtype).
        head_w: ``[H]`` value-head weight (``Linear(H, 1).weight[0]``).
        head_b: scalar tensor (numel 1) or float bias.
        step_end_idx: ``[S]`` int64 row indices into ``hidden`` (``S`` may be 0; duplicates allowed).
        sigmoid: apply a sigmoid to the values.
        backend: ``"torch"`` | ``"triton"`` | ``None``/``"auto"``.

    Returns:
        ``[S]`` fp32, differentiable w.r.t. ``hidden``, ``head_w`` and a tensor ``head_b``.
    """
    _check(hidden, head_w, step_end_idx)
    be = resolve_backend(backend, hidden)
    if be == "torch":
        return step_values_torch(hidden, head_w, head_b, step_end_idx, sigmoid=sigmoid)
    bias = _as_bias(head_b, hidden)
    idx = step_end_idx.to(device=hidden.device, dtype=torch.int64).contiguous()
    return _StepValuesFn.apply(hidden, head_w, bias, idx, sigmoid)
