"""Counter-based random bits: Triton's ``tl.randint(seed, offset)`` reproduced in PyTorch.

Stochastic rounding of int8 weights (:mod:`.int8_weight_update`) draws each value's noise as a
pure function of ``(seed, offset)``: the PyTorch path and the Triton kernel then draw bit-identical
noise, on any device and in any chunking, from one 63-bit seed per tensor.

Philox-4x32-10 (Salmon et al., SC'11), exactly as ``triton/language/random.py`` runs it. Counter
``(c0, c1, c2, c3) = (offset mod 2³², ⌊offset / 2³²⌋, 0, 0)``, key
``(k0, k1) = (seed mod 2³², ⌊seed / 2³²⌋)``; ten rounds of::

    c0' = hi(B·c2) ⊕ c1 ⊕ k0      c1' = lo(B·c2)      c2' = hi(A·c0) ⊕ c3 ⊕ k1      c3' = lo(A·c0)
    k0 += 0x9E3779B9,  k1 += 0xBB67AE85                  (mod 2³²)

with ``A = 0xD2511F53``, ``B = 0xCD9E8D57``, ``hi``/``lo`` the high/low 32 bits of the 64-bit
product; ``tl.randint`` returns the final ``c0``.

NOTE: PyTorch has no uint32 arithmetic, so the words are int64 tensors holding values in
``[0, 2³²)``, and each product is formed from 16-bit halves (no partial sum reaches 2⁵⁰): a full
64-bit product would overflow int64.
"""
from __future__ import annotations

import torch

_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_ROUNDS = 10
_WORD = 0xFFFFFFFF
_HALF = 0xFFFF


def _mul_hi_lo(constant: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hi, lo)`` words of ``constant · x`` for ``x`` in ``[0, 2³²)`` (int64)."""
    c_hi, c_lo = constant >> 16, constant & _HALF
    x_hi, x_lo = x >> 16, x & _HALF
    low_low, low_high, high_low = x_lo * c_lo, x_hi * c_lo, x_lo * c_hi
    middle = (low_low >> 16) + (low_high & _HALF) + (high_low & _HALF)
    hi = x_hi * c_hi + (low_high >> 16) + (high_low >> 16) + (middle >> 16)
    lo = (low_low & _HALF) | ((middle & _HALF) << 16)
    return hi & _WORD, lo


def philox_randint(seed: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``tl.randint(seed, offsets)``: int64 values in ``[0, 2³²)``, one per offset.

    ``seed``: an int64 tensor with one value in ``[0, 2⁶³)``; ``offsets``: non-negative int64."""
    seed = seed.reshape(())
    k0, k1 = seed & _WORD, seed >> 32
    c0, c1 = offsets & _WORD, offsets >> 32
    c2 = c3 = torch.zeros_like(offsets)
    for _ in range(_ROUNDS):
        hi_b, lo_b = _mul_hi_lo(_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _WORD, (k1 + _KEY_B) & _WORD
    return c0
