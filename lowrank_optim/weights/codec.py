"""Float weight ↔ int8 weight, and the seed of the rounding noise drawn from a generator.

The format and both roundings are :mod:`lowrank_optim.kernels.int8_weight_update`'s: per-row
scale ``s_i ≈ max_j |W[i, j]| / 127`` (rounded up to bf16 for bf16 scales), codes in
``[−127, 127]``; to nearest (``|Ŵ − W| ≤ s_i / 2``) or stochastically (``E[Ŵ] = W``).
"""
from __future__ import annotations

import torch

from ..kernels.int8_weight_update import SCALE_DTYPES, dequantize_rows, quantize_rows
from .tensor import int8_storage, int8_weight

SEED_HIGH = 1 << 62             # seeds are drawn from [0, 2^62): Philox takes any non-negative int64


def noise_seed(generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """One int64 seed drawn from ``generator`` (of any device), on ``device``: the counter-based
    rounding noise of one tensor. Drawing it from the parameter's generator
    (:func:`lowrank_optim.rounding.rounding_generator`) gives every data-parallel rank, and a
    resumed run, the same noise."""
    seed = torch.randint(0, SEED_HIGH, (1,), generator=generator, device=generator.device, dtype=torch.int64)
    return seed.to(device)


def quantize_weight(weight: torch.Tensor, *, scale_dtype: torch.dtype | None = None,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """An int8 weight storing the 2-D float ``weight`` (which keeps its ``requires_grad``): rounded
    to nearest, or stochastically with noise from ``generator``. ``scale_dtype``, the int8
    weight's apparent dtype, defaults to ``weight``'s (fp32 or bf16: ValueError otherwise)."""
    scale_dtype = weight.dtype if scale_dtype is None else scale_dtype
    if scale_dtype not in SCALE_DTYPES:
        raise ValueError(f"Invalid scale_dtype: {scale_dtype} (int8 weights compute in torch.float32 or "
                         "torch.bfloat16; convert the weight to one of them first)")
    seed = None if generator is None else noise_seed(generator, weight.device)
    codes, scales = quantize_rows(weight.detach(), scale_dtype=scale_dtype, seed=seed)
    return int8_weight(codes, scales, requires_grad=weight.requires_grad)


def dequantize_weight(weight: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``Ŵ`` of an int8 weight as a plain tensor (no gradient) in ``dtype`` (default: the weight's
    dtype): ``s_i·q[i, j]`` in fp32, rounded once."""
    codes, scales = int8_storage(weight)
    return dequantize_rows(codes, scales, dtype)
