"""Torch references for the log-ratio ops (``N`` tokens, hidden ``H``, vocabulary ``V``, ``S`` steps).

* :func:`token_logprobs_eager` / :func:`step_logratio_eager`: the obvious code (materialises ``[N, V]``
  logits); the test oracle.
* :func:`chunked_forward` / :func:`chunked_backward`: pure torch, chunked over tokens and vocabulary with an
  online log-sum-exp in fp32; peak extra memory ``O(chunk_tokens * chunk_vocab)``, independent of ``N`` and
  ``V``. The CPU path (reached through :func:`agentrm.kernels.step_logratio` with ``backend="torch"``).
* input checks and the ``O(N)`` segment sum shared by every path.
* :func:`grad_filter_eps`: the threshold of the backward's gradient filter, shared by both backends.

Gradient filtering (Cut Cross-Entropy's idea, Wijmans et al. 2024). The backward multiplies
``dlogits = g * (onehot - softmax)`` into ``grad_hidden`` and ``grad_weight``; where ``|onehot - p|`` is
below a threshold ``eps`` for every entry of a block, that block's products are skipped. The Triton
backward skips ``BLOCK_N x BLOCK_V`` tiles; the chunked torch path drops vocabulary columns of a chunk
(gathering the kept ones into a narrower GEMM). The error this introduces is at most the sum of the dropped
terms: ``|d grad_hidden[n, k]| <= |g_n| * sum_{v: |onehot - p|_nv < eps} |onehot - p|_nv * |W[v, k]|``
(and symmetrically for ``grad_weight``); ``tests/kernels`` check exactly this bound against the eager
reference. Default threshold (``"auto"``): ``finfo(dtype).eps / 32`` of the coarser of the hidden and weight
dtypes when that is a 16-bit type, i.e. ``2**-12`` for bf16 (Cut Cross-Entropy's rule and value) and
``2**-15`` for fp16: a dropped entry is below 1/32 of the spacing of the gradient's own dtype at ``|g|``.
With both in fp32, "auto" is off: the threshold would be ``2**-28``, which almost nothing falls below, and
the check alone added about 16% to the CPU path's forward+backward (N = 512, V = 131072, H = 256, random
inputs, one run on a shared 2-core machine: 8.1 s against 6.9 s). An
explicit threshold applies to any dtype. ``grad_filter="off"`` (or ``$AGENTRM_KERNEL_GRAD_FILTER=off``)
turns it off, and the backward is then exactly the unfiltered one.

The Triton kernels computing the same quantities are beside this file, in :mod:`.logratio_triton`.
"""

import math
import os

import torch
from torch import Tensor

DEFAULT_CHUNK_TOKENS = 1024
DEFAULT_CHUNK_VOCAB = 8192
GRAD_FILTER_ENV = "AGENTRM_KERNEL_GRAD_FILTER"
GRAD_FILTER_SCALE = 2.0**-5  # "auto" threshold = finfo(dtype).eps * GRAD_FILTER_SCALE (2**-12 for bf16)
_OFF = ("off", "0", "false", "no", "none")
_ON = ("auto", "on", "1", "true", "yes")


def grad_filter_eps(setting: str | float | bool | None, hidden_dtype: torch.dtype, weight_dtype: torch.dtype) -> float:
    """Threshold of the backward's gradient filter (module doc); ``0.0`` means off.

    Args:
        setting: ``None`` (use ``$AGENTRM_KERNEL_GRAD_FILTER``, default ``"auto"``), ``"auto"``/``"on"``/
            ``True`` (``finfo(dtype).eps / 32`` of the coarser of the two dtypes if it is 16-bit, else off),
            ``"off"``/``False``/``0``, or an explicit threshold in ``[0, 1)`` (a float or a numeric string).
        hidden_dtype, weight_dtype: dtypes of the op's ``hidden`` and ``weight``.

    Raises:
        ValueError: an unknown setting or a threshold outside ``[0, 1)`` (naming the variable if it came
            from the environment).
    """
    source = "grad_filter"
    if setting is None:
        setting, source = os.environ.get(GRAD_FILTER_ENV, "auto"), f"${GRAD_FILTER_ENV}"
    if isinstance(setting, bool):
        setting = "auto" if setting else "off"
    if isinstance(setting, str):
        key = setting.strip().lower() or "auto"
        if key in _OFF:
            return 0.0
        if key in _ON:
            coarser = max(torch.finfo(hidden_dtype), torch.finfo(weight_dtype), key=lambda f: f.eps)
            return float(coarser.eps * GRAD_FILTER_SCALE) if coarser.bits == 16 else 0.0
        try:
            setting = float(key)
        except ValueError:
            raise ValueError(f"{source}={setting!r}: expected 'auto', 'off' or a threshold in [0, 1)") from None
    value = float(setting)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{source}={setting!r}: a threshold must lie in [0, 1)")
    return value


# --------------------------------------------------------------------------------------------------------
# input checks and the (cheap, O(N)) segment sum shared by all paths
# --------------------------------------------------------------------------------------------------------
def check_lm_inputs(hidden: Tensor, weight: Tensor, targets: Tensor) -> None:
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


def check_step_inputs(n: int, step_ids: Tensor, ref_logp: Tensor, num_steps: int) -> None:
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


def segment_sum(
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
    check_lm_inputs(hidden, weight, targets)
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
    check_step_inputs(hidden.shape[0], step_ids, ref_logp, num_steps)
    logp = token_logprobs_eager(hidden, weight, targets)
    rewards = segment_sum(logp, ref_logp, targets, step_ids, beta, num_steps)
    return (rewards, logp) if return_token_logp else rewards


# --------------------------------------------------------------------------------------------------------
# chunked torch path (CPU path; memory O(chunk_tokens * chunk_vocab))
# --------------------------------------------------------------------------------------------------------
def mm_fp32(a: Tensor, b_t: Tensor) -> Tensor:
    """``a @ b_t`` as fp32. fp32 inputs, or CPU (upcast chunks: exact, and CPU bf16 GEMMs are slow anyway);
    on CUDA low-precision inputs use the native GEMM (fp32 accumulate, output rounded, as the eager path).
    """
    if a.dtype == torch.float32 and b_t.dtype == torch.float32:
        return a @ b_t
    if a.is_cuda:
        return (a @ b_t.to(a.dtype)).float()
    return a.float() @ b_t.float()


def chunked_forward(
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
            logits = mm_fp32(h, weight[v0:v1].T)  # [n_c, v_c] fp32
            in_chunk = (t >= v0) & (t < v1)
            local = (t - v0).clamp(0, v1 - v0 - 1).unsqueeze(1)
            tgt_logit += torch.where(in_chunk, logits.gather(1, local).squeeze(1), 0.0)
            # online log-sum-exp: merge this chunk's (fused, max-shifted) LSE into the running one
            run_lse = torch.logaddexp(run_lse, torch.logsumexp(logits, dim=1))
        lse_c = run_lse
        lse[n0:n1] = lse_c
        logp[n0:n1] = torch.where(t >= 0, tgt_logit - lse_c, 0.0)
    return logp, lse


def chunked_backward(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    lse: Tensor,
    g: Tensor,
    need_h: bool,
    need_w: bool,
    chunk_tokens: int,
    chunk_vocab: int,
    filter_eps: float = 0.0,
) -> tuple[Tensor | None, Tensor | None]:
    """Recompute-per-chunk backward. ``g[N]`` fp32 (already 0 at ignored tokens).

    ``filter_eps > 0``: within each chunk, vocabulary columns whose ``|onehot - p|`` is below ``filter_eps``
    for every token row with ``g != 0`` are left out of both GEMMs (gradient filtering, module doc);
    ``0`` runs exactly the unfiltered computation.

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
            dl = mm_fp32(h, w.T).sub_(lse_c).exp_()  # softmax p
            in_chunk = (t >= v0) & (t < v1)
            local = (t - v0).clamp(0, v1 - v0 - 1).unsqueeze(1)
            cols = None
            if filter_eps > 0.0:
                active = g_c != 0
                keep = ((dl >= filter_eps) & active.unsqueeze(1)).any(0)  # p >= eps off the target
                keep[local.squeeze(1)[in_chunk & active]] = True  # target columns: kept (conservative)
                if not bool(keep.all()):
                    cols = keep.nonzero().squeeze(1)
                    if cols.numel() == 0:
                        continue
            dl.mul_(-g_c.unsqueeze(1))  # -g * softmax
            dl.scatter_add_(1, local, torch.where(in_chunk, g_c, 0.0).unsqueeze(1))  # + g * onehot
            if cols is not None:  # the filter dropped some columns: narrower GEMMs over the kept ones
                dl, w = dl[:, cols], w[cols]
            if low_cuda:
                dl_op, w_op, h_op = dl.to(hidden.dtype), w.to(hidden.dtype), h
            else:
                dl_op, w_op, h_op = dl, w.float(), h.float()
            if gh is not None:
                gh[n0:n1] += dl_op @ w_op
            if gw is not None:
                if cols is None:
                    gw[v0:v1] += dl_op.T @ h_op
                else:
                    gw.index_add_(0, cols + v0, dl_op.T @ h_op)
    return gh, gw

