"""Which implementation runs an optimizer's projected step: the PyTorch reference or Triton.

A param group's ``backend`` is one of :data:`BACKENDS`:

* ``"torch"``: the PyTorch reference (any device);
* ``"triton"``: the fused Triton kernels (CUDA tensors; CPU tensors under ``TRITON_INTERPRET=1``,
  which is how the tests run them without a GPU);
* ``"auto"``: Triton for CUDA parameters whose weight and moment dtypes the kernels cover
  (:data:`KERNEL_DTYPES`) when ``triton`` imports, else PyTorch; decided per parameter.

This module never imports Triton itself unless asked whether it can.
"""
from __future__ import annotations

import functools
import importlib
import os

import torch

from ..validation import check_choice

BACKENDS = ("auto", "torch", "triton")
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@functools.cache
def triton_available() -> bool:
    """Whether ``import triton`` succeeds (checked once)."""
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    """Whether Triton kernels run on the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_backend(backend) -> None:
    """ValueError naming the value when ``backend`` is not a choice or asks for a missing Triton."""
    check_choice("backend", backend, BACKENDS)
    if backend == "triton" and not triton_available():
        raise ValueError("Invalid backend: 'triton' (the triton package does not import; "
                         "pip install 'lowrank-optim[triton]', or use backend='auto' or 'torch')")


def resolve_backend(backend: str, device: torch.device, dtypes: tuple[torch.dtype, ...] = ()) -> str:
    """``"torch"`` or ``"triton"`` for a parameter on ``device`` whose tensors have ``dtypes``."""
    if backend == "auto":
        supported = all(dtype in KERNEL_DTYPES for dtype in dtypes)
        return "triton" if device.type == "cuda" and supported and triton_available() else "torch"
    return backend
