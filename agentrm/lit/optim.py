"""Optimiser and warm-up/cosine schedule shared by the LightningModules."""

from __future__ import annotations

import math

import torch


def adamw_with_warmup_cosine(module, lr: float, weight_decay: float, warmup_steps: int, total_steps: int):
    """AdamW (no decay on biases and norms) with linear warm-up then cosine decay to 10% of ``lr``.

    Returns the dict Lightning's ``configure_optimizers`` expects (scheduler stepped per step).
    """
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=lr
    )
    total = max(1, total_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = min(1.0, (step - warmup_steps) / max(1, total - warmup_steps))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
