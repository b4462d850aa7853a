"""Public fused linear cross-entropy kernels used as peers of ``agentrm.kernels.step_logratio`` in the
kernel benchmarks (``bench/bench_kernels.py``, ``bench/gpu_check.py``). CUDA only; optional installs.

Both compute the per-token cross-entropy of ``hidden @ weight.T`` without materialising ``[N, V]`` logits;
with ``reduction="none"`` that is ``-logp`` per token, the quantity our op needs, so the peers run the same
per-token computation and the same ``O(N)`` segment sum into step rewards as our op:

* ``liger``: Liger-Kernel's ``liger_fused_linear_cross_entropy(..., reduction="none")`` (package
  ``liger-kernel``). Chunked over tokens: logits of a chunk in HBM, gradients computed chunk by chunk.
* ``cce``: Cut Cross-Entropy's ``linear_cross_entropy(..., reduction="none")`` (package
  ``cut-cross-entropy``, Wijmans et al. 2024), with its default gradient filter.

Both take one dtype for ``hidden`` and ``weight``: the benchmarks run them on same-dtype cases only.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import torch

# backend name -> (import name, distribution name)
PEERS = {"liger": ("liger_kernel", "liger-kernel"), "cce": ("cut_cross_entropy", "cut-cross-entropy")}
IGNORE_INDEX = -100


def available(name: str) -> bool:
    """Whether the peer's package is importable (without importing it)."""
    return importlib.util.find_spec(PEERS[name][0]) is not None


def peer_version(name: str) -> str:
    try:
        return version(PEERS[name][1])
    except PackageNotFoundError:
        return "not installed"


def token_nll_fn(name: str) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """``f(hidden[N, H], weight[V, H], targets[N]) -> nll[N]`` (fp32 or the input dtype; 0 at ignored)."""
    if name == "liger":
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        def liger(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            return liger_fused_linear_cross_entropy(hidden, weight, targets, ignore_index=IGNORE_INDEX,
                                                    reduction="none")

        return liger
    if name == "cce":
        from cut_cross_entropy import linear_cross_entropy

        def cce(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            return linear_cross_entropy(hidden, weight, targets, ignore_index=IGNORE_INDEX, reduction="none")

        return cce
    raise ValueError(f"unknown peer {name!r}; expected one of {sorted(PEERS)}")


def step_logratio_peer(name: str, inp: dict[str, Any], steps: int, beta: float):
    """A callable returning ``(rewards[S], logp[N])`` through the peer's per-token op, like our op with
    ``return_token_logp=True``. ``inp``: the benchmark inputs (hidden, weight, targets, step_ids, ref)."""
    from agentrm.kernels.logratio_reference import segment_sum

    nll = token_nll_fn(name)
    targets = torch.where(inp["targets"] >= 0, inp["targets"], IGNORE_INDEX)

    def op():
        logp = -nll(inp["hidden"], inp["weight"], targets).float()
        return segment_sum(logp, inp["ref"], inp["targets"], inp["step_ids"], beta, steps), logp

    return op
