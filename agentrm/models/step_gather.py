"""Batched adapter from ``[B, T, H]`` hidden states and ``[B, S]`` step indices to the flat kernels."""

from __future__ import annotations

import torch

from agentrm.kernels import step_values


def flat_step_index(step_end_idx: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Map ``[B, S]`` per-sequence step-end indices (``-1`` pad) to flat indices into ``B*T``.

    Returns ``(flat_idx [M], valid [B, S])`` where ``M = valid.sum()``.
    """
    valid = step_end_idx >= 0
    offsets = torch.arange(step_end_idx.shape[0], device=step_end_idx.device, dtype=torch.long)[:, None] * seq_len
    return (step_end_idx + offsets)[valid], valid


def gather_step_values(
    hidden: torch.Tensor, head_w: torch.Tensor, head_b: torch.Tensor, step_end_idx: torch.Tensor,
    backend: str | None = None,
) -> torch.Tensor:
    """Value head applied only at step ends, through :func:`agentrm.kernels.step_values`.

    Args:
        hidden: ``[B, T, H]`` final hidden states.
        head_w: ``[H]``; head_b: scalar tensor.
        step_end_idx: ``[B, S]`` (``-1`` pad).
    Returns:
        ``[B, S]`` float32 values, ``0`` at padding.
    """
    B, T, H = hidden.shape
    flat_idx, valid = flat_step_index(step_end_idx, T)
    vals = step_values(hidden.reshape(B * T, H), head_w, head_b, flat_idx, backend=backend)
    out = torch.zeros(step_end_idx.shape, dtype=torch.float32, device=hidden.device)
    return out.masked_scatter(valid, vals)
