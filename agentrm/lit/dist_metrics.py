"""Collective-safe metric computation for DDP: every rank calls, whatever it saw.

A torchmetrics ``compute()`` all-gathers the metric states, so it is a collective: if
one rank skips it (say, because it saw no labelled step and its ``update_count`` is 0)
while another calls it, the job hangs.  :func:`synced_compute` first agrees on the global
number of observations (one all-reduce every rank joins), then all ranks either compute
or all skip.  List ("cat") states are gathered, not averaged, so the result equals the
single-process value over the union of the ranks' data.

Ranks must hold states of the same dtypes: update metrics on every validation batch,
with empty tensors when a batch has nothing to add (the modules do).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torchmetrics import Metric


def local_count(metric: Metric) -> float:
    """Observations held by this rank: elements of the first list state, else the count/weight state."""
    for name in metric._defaults:
        value = getattr(metric, name)
        if isinstance(value, list):
            return float(sum(int(t.numel()) for t in value))
    for name in ("total", "weight", "n_obs"):
        value = getattr(metric, name, None)
        if isinstance(value, torch.Tensor):
            return float(value.sum())
    return float(metric.update_count)


def global_count(metric: Metric) -> float:
    """:func:`local_count` summed over ranks (an all-reduce; every rank must call it)."""
    n = local_count(metric)
    if not (dist.is_available() and dist.is_initialized()):
        return n
    t = torch.tensor([n], dtype=torch.float64, device=metric.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item())


def synced_compute(metric: Metric) -> torch.Tensor | None:
    """The metric over all ranks' data, or ``None`` on every rank when no rank observed anything.

    Collective: call it on every rank.  Resets the metric.
    """
    try:
        if global_count(metric) == 0:
            return None
        return metric.compute()
    finally:
        metric.reset()
