"""Fused kernels for agentrm (imported as ``agentrm.kernels``; the folder is top-level ``kernels/``).

Each op has a pure-torch reference (the CPU path and test oracle), a Triton path used on CUDA, dispatch by
device (:mod:`agentrm.kernels.dispatch`) and an autograd wrapper:

* :func:`token_logprobs` / :func:`step_logratio`: target log-probs and implicit-PRM step rewards without
  materialising ``[N, V]`` logits.
* :func:`step_values`: value head evaluated only at step-end tokens.
"""

from .dispatch import BACKEND_ENV, interpreter_ready, interpreting, resolve_backend, triton_available
from .step_logratio import (
    step_logratio,
    step_logratio_chunked,
    step_logratio_eager,
    token_logprobs,
    token_logprobs_chunked,
    token_logprobs_eager,
)
from .step_values import step_values, step_values_eager, step_values_torch

__all__ = [
    "BACKEND_ENV",
    "interpreter_ready",
    "interpreting",
    "resolve_backend",
    "step_logratio",
    "step_logratio_chunked",
    "step_logratio_eager",
    "step_values",
    "step_values_eager",
    "step_values_torch",
    "token_logprobs",
    "token_logprobs_chunked",
    "token_logprobs_eager",
    "triton_available",
]
