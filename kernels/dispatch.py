"""Backend selection shared by the kernels in :mod:`agentrm.kernels`.

Every op has two implementations:

* ``"torch"``: a pure-PyTorch path (chunked, memory-bounded); the CPU path and the test oracle's sibling.
* ``"triton"``: Triton kernels; used on CUDA, and on CPU tensors only under the Triton interpreter
  (``TRITON_INTERPRET=1``), which is how the test-suite exercises them without a GPU.

Resolution order for ``backend``:

1. an explicit ``"torch"`` or ``"triton"`` argument wins;
2. otherwise (``None`` or ``"auto"``) the environment variable ``AGENTRM_KERNEL_BACKEND``
   (``torch`` | ``triton`` | ``auto``) overrides the automatic choice;
3. auto: ``"triton"`` when the tensor lives on CUDA and Triton imports, else ``"torch"``.
"""

import functools
import os
from typing import Literal

import torch

__all__ = [
    "BACKEND_ENV",
    "Backend",
    "interpreter_ready",
    "interpreting",
    "resolve_backend",
    "triton_available",
]

BACKEND_ENV = "AGENTRM_KERNEL_BACKEND"
Backend = Literal["torch", "triton"]
_VALID = ("torch", "triton", "auto")


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """Whether ``import triton`` succeeds (cached: the answer cannot change within a process)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install raising at import time
        return False
    return True


def interpreting() -> bool:
    """Whether the Triton interpreter is on (``TRITON_INTERPRET=1``): kernels then run on CPU tensors.

    Read at call time; note that Triton itself reads the variable when a kernel is decorated, which is why
    the kernels in this package are decorated lazily, on first use (see ``_triton_kernels`` in each op).
    """
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def interpreter_ready() -> bool:
    """Whether Triton kernels can run on CPU tensors in this process.

    Needs ``TRITON_INTERPRET=1`` *and* that ``triton`` was first imported with it set: Triton's own jit'd
    standard library (``tl.sum``, ``tl.max``, ...) is decorated when ``triton.language`` is imported, and the
    interpreter cannot call compiled-mode functions. (Importing ``lightning`` or ``transformers`` imports
    ``triton``, so set the variable in the environment, before those imports.)
    """
    if not (interpreting() and triton_available()):
        return False
    import triton.language as tl
    from triton.runtime.jit import JITFunction

    return not isinstance(tl.sum, JITFunction)


def _normalise(name: str | None, source: str) -> str | None:
    if name is None:
        return None
    key = name.strip().lower()
    if key == "":
        return None
    if key not in _VALID:
        raise ValueError(f"{source}: unknown kernel backend {name!r}; expected one of {_VALID}")
    return key


def resolve_backend(backend: str | None, tensor: torch.Tensor) -> Backend:
    """Pick the implementation for an op whose main input is ``tensor``.

    Args:
        backend: ``"torch"``, ``"triton"``, ``"auto"`` or ``None`` (= auto).
        tensor: the op's main input; its device drives the automatic choice.

    Returns:
        ``"torch"`` or ``"triton"``.

    Raises:
        ValueError: unknown backend name (argument or environment).
        RuntimeError: ``"triton"`` requested but Triton is missing, or the tensor is on CPU without
            ``TRITON_INTERPRET=1``.
    """
    choice = _normalise(backend, "backend argument")
    if choice in (None, "auto"):
        env = _normalise(os.environ.get(BACKEND_ENV), f"${BACKEND_ENV}")
        choice = env if env in ("torch", "triton") else "auto"
    if choice == "auto":
        return "triton" if (tensor.is_cuda and triton_available()) else "torch"
    if choice == "triton":
        if not triton_available():
            raise RuntimeError("kernel backend 'triton' requested but triton is not importable")
        if not tensor.is_cuda and not interpreting():
            raise RuntimeError(
                f"kernel backend 'triton' requested for a tensor on {tensor.device}; Triton kernels run on "
                "CUDA, or on CPU only under the interpreter (set TRITON_INTERPRET=1 before importing triton)"
            )
        if not tensor.is_cuda and not interpreter_ready():
            raise RuntimeError(
                "TRITON_INTERPRET=1 is set but triton was imported before it was (triton's standard library "
                "was compiled-mode decorated); set TRITON_INTERPRET=1 before the first import of triton"
            )
        return "triton"
    return "torch"
