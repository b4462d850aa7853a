"""Torch references for the log-ratio ops (``N`` tokens, hidden ``H``, vocabulary ``V``, ``S`` steps).

* :func:`token_logprobs_eager` / :func:`step_logratio_eager`: the obvious code (materialises ``[N, V]``
  logits); the test oracle.
* :func:`chunked_forward` / :func:`chunked_backward`: pure torch, chunked over tokens and vocabulary with an
  online log-sum-exp in fp32; peak extra memory ``O(chunk_tokens * chunk_vocab)``, independent of ``N`` and
  ``V``. The CPU path (reached through :func:`agentrm.kernels.step_logratio` with ``backend="torch"``).
* input checks and the ``O(N)`` segment sum shared by every path.

The Triton kernels computing the same quantities are beside this file, in :mod:`.logratio_triton`.
"""

import math

import torch
from torch import Tensor

DEFAULT_CHUNK_TOKENS = 1024
DEFAULT_CHUNK_VOCAB = 8192


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
            dl = mm_fp32(h, w.T).sub_(lse_c).exp_().mul_(-g_c.unsqueeze(1))  # -g * softmax
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

