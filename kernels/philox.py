"""Counter-based random bits: Triton's ``tl.randint4x(seed, counter)`` reproduced in PyTorch, and the
word stream that the int8 weights' stochastic rounding draws from it.

Stochastic rounding of int8 weights (:mod:`.int8_weight_update`) draws the noise of the value at
position ``p`` (row-major, ``p = i·n + j``) as a pure function of ``(seed, p)``: the PyTorch path
and the Triton kernel then draw bit-identical noise, on any device and in any chunking, from one
63-bit seed per tensor.

**Philox-4x32-10** (Salmon et al., SC'11), exactly as ``triton/language/random.py`` runs it. Counter
``(c0, c1, c2, c3) = (k mod 2³², ⌊k / 2³²⌋, 0, 0)`` for a counter value ``k``, key
``(k0, k1) = (seed mod 2³², ⌊seed / 2³²⌋)``; ten rounds of::

    c0' = hi(B·c2) ⊕ c1 ⊕ k0      c1' = lo(B·c2)      c2' = hi(A·c0) ⊕ c3 ⊕ k1      c3' = lo(A·c0)
    k0 += 0x9E3779B9,  k1 += 0xBB67AE85                  (mod 2³²)

with ``A = 0xD2511F53``, ``B = 0xCD9E8D57``, ``hi``/``lo`` the high/low 32 bits of the 64-bit
product; ``tl.randint4x`` returns the final ``(c0, c1, c2, c3)`` (``tl.randint`` only ``c0``).

**The stream.** Word ``p`` uses the four output words of one counter for four positions::

    x_p = philox(seed, ⌊p / 4⌋)[p mod 4]        ∈ [0, 2³²)

NOTE: four words per Philox call rather than ``tl.randint``'s one: the PyTorch path evaluates a
quarter of the Philox rounds (measured on one CPU thread, a 4096×1024 int8 update ran 2.5–4×
faster than with one word per position: Philox is most of its time), and the Triton kernel, which
evaluates ``tl.randint4x`` of ``⌊p / 4⌋`` for every position and keeps word ``p mod 4``, does the
work ``tl.randint`` did before (that too computes all four words and drops three). Philox's four
words are designed to be used together (Random123's and cuRAND's ``*4`` generators do).

**In PyTorch.** Torch 2.13 has no right shift nor addition for uint32/uint64 tensors on CPU, so the
words are int64 tensors. Each product is one int64 multiplication: for ``x, A < 2³²`` the product
is below ``2⁶⁴`` and int64 multiplication wraps modulo ``2⁶⁴``, so the int64 result holds the bits
of the uint64 product ``P``: ``hi = (P >> 32) mod 2³²`` (the shift is arithmetic, its sign bits
are masked off), ``lo = P mod 2³²``. Only the multiplied words ``c0``, ``c2`` must lie in
``[0, 2³²)``; ``c1``, ``c3`` keep the whole product, whose high half only reaches bits above 31 of
the next ``c0``, ``c2``, which the mask clears. The operations run in place where they can, on
cache-sized pieces (the caller's chunks). Measured and not kept: the first round written out for
``c2 = c3 = 0`` (2 % faster, within the noise of the measurement); words as int32 bit patterns with
``hi``/``lo`` read as int32 views of the product (1.5× slower: strided reads and conversions).
"""
from __future__ import annotations

import torch

_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_ROUNDS = 10
_WORD = 0xFFFFFFFF
_WORDS_PER_COUNTER = 4


def philox_randint4x(seed: torch.Tensor, counters: torch.Tensor, third_word: int = 0) -> tuple[torch.Tensor, ...]:
    """``tl.randint4x(seed, counters)``: four int64 tensors ``(c0, c1, c2, c3)`` of values in
    ``[0, 2³²)``, each shaped as ``counters``; with ``third_word`` (in ``[0, 2³²)``) the counter's
    ``c2`` (``tl.philox(seed, c0, c1, third_word, 0)``).

    ``seed``: an int64 tensor with one value in ``[0, 2⁶³)``; ``counters``: int64 read as 64-bit
    patterns, ``c0`` the low word and ``c1`` the high one (a pattern with the top bit set is a
    negative int64: its high word still comes out right, the arithmetic shift's sign bits are
    masked off in the first round)."""
    seed = seed.reshape(())
    k0, k1 = seed & _WORD, seed >> 32
    c0, c1 = counters & _WORD, counters >> 32
    c2, c3 = torch.full_like(counters, third_word), torch.zeros_like(counters)
    for round_index in range(_ROUNDS):
        if round_index > 0:
            k0, k1 = (k0 + _KEY_A) & _WORD, (k1 + _KEY_B) & _WORD
        product_b, product_a = c2.mul_(_ROUND_B), c0.mul_(_ROUND_A)     # in place: c0, c2 are not read again
        c0 = (product_b >> 32).bitwise_xor_(c1).bitwise_xor_(k0).bitwise_and_(_WORD)
        c2 = (product_a >> 32).bitwise_xor_(c3).bitwise_xor_(k1).bitwise_and_(_WORD)
        c1, c3 = product_b, product_a
    return c0, c1 & _WORD, c2, c3 & _WORD


def philox_words(seed: torch.Tensor, start: int, count: int, device: torch.device | None = None) -> torch.Tensor:
    """``x_p`` for ``p`` in ``[start, start + count)`` (module doc): an int64 tensor of ``count``
    values in ``[0, 2³²)`` on ``device`` (default: the seed's)."""
    first = start // _WORDS_PER_COUNTER
    stop = (start + count + _WORDS_PER_COUNTER - 1) // _WORDS_PER_COUNTER
    counters = torch.arange(first, stop, device=device or seed.device)
    words = torch.stack(philox_randint4x(seed, counters), dim=1).view(-1)
    skip = start - first * _WORDS_PER_COUNTER
    return words[skip:skip + count]
