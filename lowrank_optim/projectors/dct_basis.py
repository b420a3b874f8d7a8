"""The orthonormal DCT-II matrix and the transforms ``G·C`` / ``Cᵀ·G`` it defines.

``C[i, j] = √(2/k)·c_i·cos(π·i·(2j+1)/(2k))`` with ``c_0 = 1/√2``, ``c_i = 1`` otherwise, so that
``C·Cᵀ = I``; it equals ``scipy.fft.dct(numpy.eye(k), type=2, norm='ortho', axis=0)``. The columns
of ``C`` are the candidate basis vectors of the DCT projection.

``G·C`` applies ``Cᵀ`` to every row of ``G``, i.e. the orthonormal inverse DCT (DCT-III) of each
row, which costs ``O(m·n·log n)`` through an FFT instead of the ``m·n²`` GEMM.

Entries are computed in float64 with the phase reduced exactly in integers: ``cos`` has period
``4k`` in units of ``π/(2k)``, so ``C[i, j] = √(2/k)·c_i·cos(π·p/(2k))`` with
``p = i·(2j+1) mod 4k``. The argument stays in ``[0, 2π)`` at every size, and any subset of columns
(:func:`dct_columns`) holds the same values as the whole matrix (:func:`dct_matrix`).
"""
from __future__ import annotations

import functools
import math

import numpy as np
import scipy.fft
import torch


def dct_columns(size: int, columns: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``C[:, columns]`` (``size×len(columns)``, contiguous) computed on ``columns``' device, nothing
    cached: the values of :func:`dct_matrix` without the ``size×size`` matrix. Computed in float64
    (module doc: exact phase reduction), whose temporaries are ``16·size·len(columns)`` bytes."""
    rows = torch.arange(size, dtype=torch.int64, device=columns.device).unsqueeze(1)
    phase = (rows * (2 * columns.to(torch.int64).unsqueeze(0) + 1)) % (4 * size)
    entries = math.sqrt(2.0 / size) * torch.cos(phase.to(torch.float64) * (math.pi / (2.0 * size)))
    entries[0] /= math.sqrt(2.0)
    return entries.to(dtype)


@functools.cache
def dct_matrix(size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``C`` of ``size``, built once per (size, dtype, device) and shared by every layer."""
    return dct_columns(size, torch.arange(size, device=device), dtype)


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
