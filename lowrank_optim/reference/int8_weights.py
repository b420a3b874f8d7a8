"""Float64 reference of the int8 weight format and its stochastically rounded update, written from
the definitions (no code shared with :mod:`lowrank_optim.kernels.int8_weight_update`)::

    s_i = max_j |W[i, j]| / 127, rounded to the scale dtype: up for bf16, to nearest for fp32
    t   = W[i, j] / s_i,  clamped to [−127, 127] (it passes 127 only by fp32 scales' rounding)
    q   = round(t)                   to nearest (ties to even)
    q   = ⌊t⌋ + [u < t − ⌊t⌋]        stochastic, u ∈ [0, 1) given
    update:  W = a·(s·q) − b·ΔW, then the above

Everything in float64; the noise ``u`` is an input (the tests pass the fast path's), so the two
differ only where fp32 rounding moves ``t`` across ``⌊t⌋ + u`` or a tie.
"""
from __future__ import annotations

import torch

CODE_MAX = 127


def reference_scales(weight: torch.Tensor, scale_dtype: torch.dtype) -> torch.Tensor:
    """Float64 values of the row scales of ``weight`` in ``scale_dtype``."""
    exact = weight.double().abs().amax(dim=1) / CODE_MAX
    stored = exact.to(scale_dtype)
    if scale_dtype == torch.bfloat16:
        stored = torch.where(stored.double() < exact, torch.nextafter(stored, torch.full_like(stored, torch.inf)),
                             stored)
    return stored.double()


def reference_quantize(weight: torch.Tensor, scale_dtype: torch.dtype,
                       noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, scales)`` as int64 and float64 tensors: to nearest, or stochastic with ``noise``."""
    weight = weight.double()
    scales = reference_scales(weight, scale_dtype)
    t = (weight / torch.where(scales > 0, scales, torch.ones_like(scales))[:, None]).clamp(-CODE_MAX, CODE_MAX)
    if noise is None:
        return torch.round(t).long(), scales
    low = torch.floor(t)
    return (low + (noise.double() < t - low).double()).long(), scales


def reference_dequantize(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``s_i·q[i, j]`` in float64."""
    return codes.double() * scales.double()[:, None]


def reference_int8_update(codes: torch.Tensor, scales: torch.Tensor, delta: torch.Tensor, *, a: float, b: float,
                          noise: torch.Tensor, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, scales)`` of ``SR(a·Ŵ − b·ΔW)`` with the uniform ``noise``, float64."""
    exact = a * reference_dequantize(codes, scales) - b * delta.double()
    return reference_quantize(exact, scale_dtype, noise)
