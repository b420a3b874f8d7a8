"""The orthonormal DCT-II matrix and the transforms ``G·C`` / ``Cᵀ·G`` it defines.

``C[i, j] = √(2/k)·c_i·cos(π·i·(2j+1)/(2k))`` with ``c_0 = 1/√2``, ``c_i = 1`` otherwise, so that
``C·Cᵀ = I``; it equals ``scipy.fft.dct(numpy.eye(k), type=2, norm='ortho', axis=0)``. The columns
of ``C`` are the candidate basis vectors of the DCT projection.

``G·C`` applies ``Cᵀ`` to every row of ``G``, i.e. the orthonormal inverse DCT (DCT-III) of each
row, which costs ``O(m·n·log n)`` through an FFT instead of the ``m·n²`` GEMM.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import scipy.fft
import torch


@functools.cache
def _dct_matrix_float64(size: int) -> torch.Tensor:
    i = torch.arange(size, dtype=torch.float64).unsqueeze(1)
    j = torch.arange(size, dtype=torch.float64).unsqueeze(0)
    c = math.sqrt(2.0 / size) * torch.cos(math.pi * i * (2.0 * j + 1.0) / (2.0 * size))
    c[0] /= math.sqrt(2.0)
    return c


@functools.cache
def dct_matrix(size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``C`` of ``size``, built once per (size, dtype, device) and shared by every layer."""
    return _dct_matrix_float64(size).to(device=device, dtype=dtype)


def dct_coefficients(grad: torch.Tensor, side: str, transform: str) -> torch.Tensor:
    """``S = G·C`` (right) or ``Cᵀ·G`` (left), by GEMM (``"matmul"``) or FFT (``"fft"``, CPU).

    The FFT path runs ``scipy.fft`` in float32 (float64 for float64 input) on all of torch's
    threads and returns ``S`` in ``grad``'s dtype.
    """
    if transform == "matmul":
        c = dct_matrix(grad.shape[1] if side == "right" else grad.shape[0], grad.dtype, grad.device)
        return grad @ c if side == "right" else c.T @ grad
    if grad.device.type != "cpu":
        raise ValueError(f"Invalid transform: {transform!r} runs on CPU tensors only, got {grad.device}")
    work_dtype = torch.float64 if grad.dtype == torch.float64 else torch.float32
    array = grad.detach().to(work_dtype).numpy()
    coefficients = scipy.fft.dct(array, type=3, norm="ortho", axis=1 if side == "right" else 0,
                                 workers=torch.get_num_threads())
    return torch.from_numpy(np.ascontiguousarray(coefficients)).to(grad.dtype)
