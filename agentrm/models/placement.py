"""Where and how a model is loaded for inference: device, dtype, quantisation and attention, checked up front.

:func:`resolve_placement` turns the four config fields every model-loading config carries (search
scorers, HF policies, the LLM judge, the tree builder's policy) into a :class:`Placement`, and raises
at once, before anything is loaded or fetched, when the machine cannot honour them:

* ``device``: ``None``/``"auto"`` is CUDA when available (``cuda:<LOCAL_RANK>``), else CPU; an explicit
  ``cuda``/``cuda:N`` needs a visible GPU with that index.
* ``dtype``: ``None``/``"auto"`` is bf16 on CUDA and fp32 on CPU; otherwise any name of
  :data:`agentrm.models.backbone.DTYPES`.
* ``quantization``: ``nf4``/``int8`` through bitsandbytes, on a CUDA GPU or the CPU
  (:func:`agentrm.models.quant.check_quantization`); the weights are placed by ``device_map`` on the
  chosen device (``{"": "cpu"}`` on the CPU), compute in ``dtype`` (default bf16 on CUDA, fp32 on CPU).
* ``attn_implementation``: ``auto`` (flash-attention on CUDA when installed, else sdpa), ``eager``,
  ``sdpa``, ``flash_attention_2`` (needs flash-attn and a CUDA device) or ``flex_attention``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from agentrm.models.backbone import pick_attn_implementation, resolve_dtype
from agentrm.models.quant import check_quantization

ATTN_IMPLEMENTATIONS = ("auto", "eager", "sdpa", "flash_attention_2", "flex_attention")


class DeviceUnavailable(RuntimeError):
    """A device was asked for that this machine does not have."""


@dataclass(frozen=True)
class Placement:
    """A checked loading recipe: pass :meth:`load_kwargs` to ``build_backbone`` / ``*.from_pretrained``."""

    device: torch.device
    dtype: torch.dtype
    quantization: str | None
    attn_implementation: str

    def load_kwargs(self) -> dict[str, Any]:
        """``device``, ``dtype``, ``quantization`` and ``attn_implementation`` keyword arguments."""
        return {"device": self.device, "dtype": self.dtype, "quantization": self.quantization,
                "attn_implementation": self.attn_implementation}


def default_device() -> torch.device:
    """``cuda:<LOCAL_RANK>`` when CUDA is available, else ``cpu``."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def resolve_device(device: str | torch.device | None, field: str = "device") -> torch.device:
    """Parse and check ``device`` (``None``/``"auto"``: :func:`default_device`).

    Raises:
        ValueError: not a device name.
        DeviceUnavailable: a CUDA device that is not visible.
    """
    if device is None or device == "auto":
        return default_device()
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"{field}={device!r} is not a device (use cpu, cuda, cuda:0, ... or auto)") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceUnavailable(f"{field}={device!r} but no CUDA GPU is visible; set {field}: cpu "
                                    "(or leave it unset: CUDA when available, else CPU)")
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise DeviceUnavailable(f"{field}={device!r} but only {torch.cuda.device_count()} CUDA device(s) "
                                    "are visible")
        dev = torch.device("cuda", index)
    return dev


def resolve_placement(
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    quantization: str | None = None,
    attn_implementation: str = "auto",
    what: str = "model",
) -> Placement:
    """Check every loading option against this machine and fill in the defaults; loads nothing.

    Args:
        what: the config section named in error messages (e.g. ``scorers[0]``).

    Raises:
        ValueError, DeviceUnavailable, QuantizationUnavailable, ImportError: with a one-line
            message naming ``what`` and the field.
    """
    dev = resolve_device(device, f"{what}.device")
    try:
        check_quantization(quantization, dev)
    except Exception as e:
        raise type(e)(f"{what}: {e}") from None
    if dtype is None or dtype == "auto":
        torch_dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    else:
        try:
            torch_dtype = resolve_dtype(dtype)
        except ValueError as e:
            raise ValueError(f"{what}.dtype: {e}") from None
    if attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"{what}.attn_implementation={attn_implementation!r}; choose one of {ATTN_IMPLEMENTATIONS}")
    if attn_implementation == "flash_attention_2" and dev.type != "cuda":
        raise ValueError(f"{what}: attn_implementation='flash_attention_2' needs a CUDA device, got {dev}")
    try:
        attn = pick_attn_implementation(attn_implementation, dev)
    except ImportError as e:
        raise ImportError(f"{what}: {e}") from None
    return Placement(dev, torch_dtype, quantization, attn)
