"""Per-token log-probabilities of targets and per-step implicit-PRM rewards, without ``[N, V]`` logits.

The autograd and dispatch layer (``N`` tokens, hidden ``H``, vocabulary ``V``, ``S`` steps):

* :func:`token_logprobs` ``(hidden[N,H], weight[V,H], targets[N]) -> logp[N]`` (fp32):
  ``log_softmax(hidden @ weight.T)[t, targets[t]]``; ``targets[t] < 0`` means ignore (logp 0, no gradient).
* :func:`step_logratio` ``(..., step_ids[N], ref_logp[N], beta, num_steps) -> rewards[S]`` (fp32):
  ``r_s = beta * sum_{t: step_ids[t] == s, targets[t] >= 0} (logp_t - ref_logp_t)``; ``step_ids == -1`` ignores.
* :func:`token_logprobs_chunked` / :func:`step_logratio_chunked`: the same with ``backend="torch"`` and
  explicit chunk sizes; :func:`token_logprobs_eager` / :func:`step_logratio_eager`: the oracle.

Implementations live beside this file: :mod:`.logratio_reference` (eager oracle and the chunked torch path,
the CPU path) and :mod:`.logratio_triton` (the Triton kernels, used on CUDA). Both backends share one
autograd Function whose backward recomputes logits per chunk / tile, so memory never holds ``[N, V]``.
"""

from typing import Any

import torch
from torch import Tensor

from .dispatch import resolve_backend
from .logratio_reference import (
    DEFAULT_CHUNK_TOKENS,
    DEFAULT_CHUNK_VOCAB,
    check_lm_inputs,
    check_step_inputs,
    chunked_backward,
    chunked_forward,
    grad_filter_eps,
    segment_sum,
    step_logratio_eager,
    token_logprobs_eager,
)
from .logratio_triton import triton_backward, triton_forward

__all__ = [
    "step_logratio",
    "step_logratio_chunked",
    "step_logratio_eager",
    "token_logprobs",
    "token_logprobs_chunked",
    "token_logprobs_eager",
]


class _TokenLogprobsFn(torch.autograd.Function):
    """``logp[N] = log_softmax(hidden @ weight.T)[targets]``; backward recomputes logits per chunk / tile."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        targets: Tensor,
        backend: str,
        chunks: tuple[int, int],
        filter_eps: float,
    ) -> Tensor:
        logp, lse = _forward(hidden, weight, targets, backend, chunks)
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.backend, ctx.chunks, ctx.filter_eps = backend, chunks, filter_eps
        return logp

    @staticmethod
    def backward(ctx: Any, grad_logp: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        hidden, weight, targets, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        g = torch.where(targets >= 0, grad_logp.float(), 0.0)
        if ctx.backend == "triton":
            gh, gw = triton_backward(hidden, weight, targets, lse, g, need_h, need_w, ctx.filter_eps)
        else:
            gh, gw = chunked_backward(
                hidden, weight, targets, lse, g, need_h, need_w, *ctx.chunks, filter_eps=ctx.filter_eps
            )
        gh = gh.to(hidden.dtype) if gh is not None else None
        gw = gw.to(weight.dtype) if gw is not None else None
        return gh, gw, None, None, None, None


def _forward(
    hidden: Tensor, weight: Tensor, targets: Tensor, backend: str, chunks: tuple[int, int]
) -> tuple[Tensor, Tensor]:
    """``(logp[N], lse[N])`` fp32 from the chosen backend."""
    if backend == "triton":
        logp, lse, _ = triton_forward(hidden, weight, targets)
        return logp, lse
    return chunked_forward(hidden, weight, targets, *chunks)


def _needs_grad(*tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    backend: str | None = None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    chunk_vocab: int = DEFAULT_CHUNK_VOCAB,
    grad_filter: str | float | bool | None = None,
) -> Tensor:
    """``log_softmax(hidden @ weight.T)[t, targets[t]]`` without materialising ``[N, V]`` logits.

    Args:
        hidden: ``[N, H]`` final hidden states (fp32 / bf16 / fp16).
        weight: ``[V, H]`` LM-head weight.
        targets: ``[N]`` int next-token ids; ``< 0`` = ignore (logp 0, no gradient).
        backend: ``"torch"`` | ``"triton"`` | ``None``/``"auto"`` (see :mod:`agentrm.kernels.dispatch`).
        chunk_tokens, chunk_vocab: chunk sizes of the torch path (peak extra memory
            ``O(chunk_tokens * chunk_vocab)`` fp32).
        grad_filter: the backward's gradient filter: ``None`` (``$AGENTRM_KERNEL_GRAD_FILTER``, default
            ``"auto"``), ``"auto"``, ``"off"`` or a threshold (see
            :func:`agentrm.kernels.logratio_reference.grad_filter_eps`).

    Returns:
        ``[N]`` fp32 log-probabilities; differentiable w.r.t. ``hidden`` and ``weight``.
    """
    check_lm_inputs(hidden, weight, targets)
    be = resolve_backend(backend, hidden)
    chunks = (chunk_tokens, chunk_vocab)
    if _needs_grad(hidden, weight):
        eps = grad_filter_eps(grad_filter, hidden.dtype, weight.dtype)
        return _TokenLogprobsFn.apply(hidden, weight, targets, be, chunks, eps)
    return _forward(hidden, weight, targets, be, chunks)[0]


def token_logprobs_chunked(hidden: Tensor, weight: Tensor, targets: Tensor, **chunks: int) -> Tensor:
    """Pure-torch :func:`token_logprobs` (the CPU path); ``chunk_tokens`` / ``chunk_vocab`` as there."""
    return token_logprobs(hidden, weight, targets, backend="torch", **chunks)


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
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    chunk_vocab: int = DEFAULT_CHUNK_VOCAB,
    grad_filter: str | float | bool | None = None,
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
        chunk_tokens, chunk_vocab: chunk sizes of the torch path.
        grad_filter: the backward's gradient filter (as in :func:`token_logprobs`).

    Returns:
        ``rewards[S]`` fp32, or ``(rewards[S], logp[N])`` fp32 if ``return_token_logp``.
    """
    check_lm_inputs(hidden, weight, targets)
    check_step_inputs(hidden.shape[0], step_ids, ref_logp, num_steps)
    be = resolve_backend(backend, hidden)
    if be == "triton" and not _needs_grad(hidden, weight, ref_logp):
        # scoring path: segment sum fused into the combine kernel
        logp, _, rewards = triton_forward(hidden, weight, targets, (step_ids, ref_logp, float(beta), num_steps))
        assert rewards is not None
    else:
        logp = token_logprobs(
            hidden,
            weight,
            targets,
            backend=be,
            chunk_tokens=chunk_tokens,
            chunk_vocab=chunk_vocab,
            grad_filter=grad_filter,
        )
        rewards = segment_sum(logp, ref_logp, targets, step_ids, beta, num_steps)
    return (rewards, logp) if return_token_logp else rewards


def step_logratio_chunked(*args: Any, **kwargs: Any) -> Tensor | tuple[Tensor, Tensor]:
    """Pure-torch :func:`step_logratio` (the CPU path); same arguments, ``backend`` fixed to ``"torch"``."""
    return step_logratio(*args, backend="torch", **kwargs)
