"""Batch tokenised trajectories into padded tensors."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from agentrm.data.tokenize import TokenizedTrajectory


def collate_trajectories(items: Sequence[TokenizedTrajectory], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Pad a list of tokenised trajectories (right padding).

    Returns a dict with
        input_ids ``[B, T]`` long, attention_mask ``[B, T]`` long,
        token_step ``[B, T]`` long: index of the step whose action contains the token, ``-1`` elsewhere,
        step_end_idx ``[B, S]`` long (``-1`` padding), step_mask ``[B, S]`` bool (real step),
        step_values ``[B, S]`` float (``nan`` where unlabeled or padding),
        step_parent / step_action ``[B, S]`` long (sibling keys, ``0`` padding),
        success ``[B]`` float, reward ``[B]`` float, task_key ``[B]`` long (hash of the task type).
    """
    B = len(items)
    T = max(1, max(len(it.input_ids) for it in items))
    S = max(1, max(len(it.step_end_idx) for it in items))
    input_ids = torch.full((B, T), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    token_step = torch.full((B, T), -1, dtype=torch.long)
    step_end_idx = torch.full((B, S), -1, dtype=torch.long)
    step_values = torch.full((B, S), math.nan, dtype=torch.float32)
    step_parent = torch.zeros((B, S), dtype=torch.long)
    step_action = torch.zeros((B, S), dtype=torch.long)
    for b, it in enumerate(items):
        n, s = len(it.input_ids), len(it.step_end_idx)
        input_ids[b, :n] = torch.tensor(it.input_ids, dtype=torch.long)
        attention_mask[b, :n] = 1
        for i, (a, e) in enumerate(zip(it.step_start_idx, it.action_end_idx)):
            token_step[b, a : e + 1] = i
        if s:
            step_end_idx[b, :s] = torch.tensor(it.step_end_idx, dtype=torch.long)
            step_values[b, :s] = torch.tensor(it.step_values, dtype=torch.float32)
            step_parent[b, :s] = torch.tensor(it.step_parent, dtype=torch.long)
            step_action[b, :s] = torch.tensor(it.step_action, dtype=torch.long)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "token_step": token_step,
        "step_end_idx": step_end_idx,
        "step_mask": step_end_idx >= 0,
        "step_values": step_values,
        "step_parent": step_parent,
        "step_action": step_action,
        "success": torch.tensor([float(it.success) for it in items]),
        "reward": torch.tensor([it.reward for it in items], dtype=torch.float32),
        "task_key": torch.tensor([it.task_key for it in items], dtype=torch.long),
    }
