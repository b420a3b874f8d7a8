"""Which implementation runs an optimizer's projected step: the PyTorch reference or Triton.

A param group's ``backend`` is one of :data:`BACKENDS`:

* ``"torch"``: the PyTorch reference (any device);
* ``"triton"``: the fused Triton kernels (CUDA tensors; CPU tensors under ``TRITON_INTERPRET=1``,
  which is how the tests run them without a GPU). Asked for explicitly, it never falls back:
  :func:`resolve_backend` raises where the kernels cannot run;
* ``"auto"``: Triton for CUDA parameters whose weight and moment dtypes the kernels cover
  (:data:`KERNEL_DTYPES`) when ``triton`` imports, else PyTorch; decided per parameter.

This module never imports Triton itself unless asked whether it can, and nothing of the library
above this package.
"""
from __future__ import annotations

import functools
import importlib
import os

import torch

BACKENDS = ("auto", "torch", "triton")
RESOLVED_BACKENDS = ("torch", "triton")          # what resolve_backend returns, what kernels run on
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_INSTALL_HINT = "pip install 'lowrank-optim[triton]', or use backend='auto' or 'torch'"


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
    """At construction: ValueError naming the value when ``backend`` is not one of
    :data:`BACKENDS`, or is ``"triton"`` and the triton package does not import."""
    if backend not in BACKENDS:
        raise ValueError(f"Invalid backend: {backend!r} (expected one of {', '.join(map(repr, BACKENDS))})")
    if backend == "triton" and not triton_available():
        raise ValueError(f"Invalid backend: 'triton' (the triton package does not import; {_INSTALL_HINT})")


def resolve_backend(backend: str, device: torch.device, dtypes: tuple[torch.dtype, ...] = ()) -> str:
    """``"torch"`` or ``"triton"`` for a parameter on ``device`` whose tensors have ``dtypes``.

    ``"auto"`` picks Triton only where it can run (CUDA, every dtype in :data:`KERNEL_DTYPES`,
    triton importable); an explicit ``"triton"`` that cannot run raises ``ValueError`` naming the
    reason (no triton; a non-CUDA device without ``TRITON_INTERPRET=1``; an uncovered dtype)."""
    check_backend(backend)
    supported = all(dtype in KERNEL_DTYPES for dtype in dtypes)
    if backend == "auto":
        return "triton" if device.type == "cuda" and supported and triton_available() else "torch"
    if backend == "triton":
        if device.type != "cuda" and not interpreting():
            raise ValueError(f"Invalid backend: 'triton' for a parameter on {device} (the kernels run on CUDA "
                             "tensors, CPU tensors only under TRITON_INTERPRET=1); use backend='auto' or 'torch'")
        if not supported:
            uncovered = sorted({str(dtype) for dtype in dtypes if dtype not in KERNEL_DTYPES})
            raise ValueError(f"Invalid backend: 'triton' for {', '.join(uncovered)} tensors (the kernels take "
                             f"{', '.join(map(str, KERNEL_DTYPES))}); use backend='auto' or 'torch'")
    return backend
