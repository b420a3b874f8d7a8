"""Stochastic rounding of fp32 values to bf16, for bf16 weights (``bf16_stochastic_round``).

Round-to-nearest drops an update smaller than half a bf16 ulp of the weight (``2^−9`` relative):
late in training most of them. Stochastic rounding keeps them in expectation. For an fp32 value
``x`` between the neighbouring bf16 values ``lo ≤ x < hi`` (``|hi − lo| = u``)::

    SR(x) = hi  with probability (x − lo) / u,   lo otherwise       ⇒   E[SR(x)] = x

Bit trick: the fp32 pattern of ``x`` is bf16's 16 high bits followed by 16 low bits; adding a
uniform random integer ``ρ ∈ [0, 2^16)`` to the whole pattern and truncating the low 16 bits
carries into the magnitude with probability ``low / 2^16``, which is the rule above (sign-magnitude:
the same holds for negative values; ±inf stay, NaN is kept as NaN).
"""
from __future__ import annotations

import torch

_LOW_BITS = 16
_HIGH_MASK = -(1 << _LOW_BITS)              # 0xFFFF0000 as an int32
_CHUNK = 1 << 22                            # values rounded per pass: bounds the temporaries


def stochastic_round_bf16(x: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """A bf16 tensor: each fp32 value of ``x`` rounded up or down with the probabilities above.
    Uses ``generator`` (on ``x``'s device) for reproducibility."""
    x = x.float().contiguous()
    noise = torch.randint(0, 1 << _LOW_BITS, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    rounded = (x.view(torch.int32) + noise).bitwise_and_(_HIGH_MASK).view(torch.float32)
    # the low 16 bits are zero, so this conversion is exact
    return torch.where(torch.isnan(x), x, rounded).to(torch.bfloat16)


def add_stochastic_round_(weight: torch.Tensor, update: torch.Tensor, *, alpha: float = 1.0,
                          generator: torch.Generator | None = None) -> torch.Tensor:
    """``weight ← SR(weight + alpha·update)`` in place for a bf16 ``weight``, the sum in fp32.

    Unbiased: ``E[weight_new] = weight + alpha·update`` (to fp32 rounding of the sum). Works in
    chunks of ``2^22`` values of a contiguous weight, so the fp32/int32 temporaries stay small."""
    if weight.dtype != torch.bfloat16:
        raise ValueError(f"stochastic rounding targets bf16 weights, got {weight.dtype}")
    if update.shape != weight.shape:
        raise ValueError(f"update of shape {tuple(update.shape)} does not match the weight's {tuple(weight.shape)}")
    if weight.is_contiguous() and update.is_contiguous():
        pairs = zip(weight.view(-1).split(_CHUNK), update.view(-1).split(_CHUNK))
    else:
        pairs = [(weight, update)]
    for weight_part, update_part in pairs:
        exact = torch.add(weight_part.float(), update_part.float(), alpha=alpha)
        weight_part.copy_(stochastic_round_bf16(exact, generator=generator))
    return weight
