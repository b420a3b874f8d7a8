"""What the Triton kernels of this package share: autotuning that also runs under the interpreter,
GEMM input precision, and the check that a launch can run where its tensors live."""
from __future__ import annotations

import time

import torch

from .backend import KERNEL_DTYPES, interpreting


def autotune_options() -> dict:
    """Extra ``triton.autotune`` arguments. Under ``TRITON_INTERPRET=1`` the default benchmarker
    needs a GPU, so configs are timed with the host clock instead: every config still runs, which
    lets CPU tests prove that autotuning in-place kernels leaves one update only. Evaluated when the
    kernel is defined."""
    return {"do_bench": _host_clock_bench} if interpreting() else {}


def _host_clock_bench(kernel_call, quantiles) -> list[float]:
    start = time.perf_counter()
    kernel_call()
    elapsed_ms = (time.perf_counter() - start) * 1e3
    return [elapsed_ms] * len(quantiles)


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: full-precision ``"ieee"`` for fp32 operands unless torch allows
    TF32 for fp32 matmuls (``torch.backends.cuda.matmul.allow_tf32``, or
    ``torch.set_float32_matmul_precision("high")``); Triton's default ``"tf32"`` otherwise (16-bit
    operands ignore it)."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def check_launchable(*tensors: torch.Tensor) -> None:
    """Triton kernels run on CUDA tensors (CPU tensors only under the interpreter) of the float
    dtypes in :data:`.backend.KERNEL_DTYPES`."""
    for tensor in tensors:
        if tensor.device.type != "cuda" and not interpreting():
            raise RuntimeError(f"backend='triton' got a tensor on {tensor.device}: Triton kernels run on CUDA "
                               "tensors (CPU tensors only under TRITON_INTERPRET=1); use backend='auto' or 'torch'")
        if tensor.is_floating_point() and tensor.dtype not in KERNEL_DTYPES:
            raise RuntimeError(f"backend='triton' got a {tensor.dtype} tensor: the kernels take "
                               f"{', '.join(map(str, KERNEL_DTYPES))}; use backend='auto' or 'torch'")
