"""Python-integer reference of Philox-4x32-10 and of the int8 weights' noise stream, written from
the definitions (no code shared with :mod:`lowrank_optim.kernels.philox`): one counter at a time,
arbitrary 128-bit counters and 64-bit keys, so it also runs Random123's known-answer vectors
(``A, B = MULTIPLIERS``; ``hi``/``lo`` the high/low 32 bits of the 64-bit product)::

    round:   c0, c1, c2, c3 = hi(B·c2) ⊕ c1 ⊕ k0, lo(B·c2), hi(A·c0) ⊕ c3 ⊕ k1, lo(A·c0)
    key:     k0, k1 = k0 + 0x9E3779B9, k1 + 0xBB67AE85  (mod 2³²), after each of the ten rounds
    stream:  x_p = philox((k mod 2³², ⌊k / 2³²⌋, 0, 0), (seed mod 2³², ⌊seed / 2³²⌋))[p mod 4],  k = ⌊p / 4⌋
"""
from __future__ import annotations

MULTIPLIERS = (0xD2511F53, 0xCD9E8D57)
KEY_STEPS = (0x9E3779B9, 0xBB67AE85)
ROUNDS = 10
MASK = (1 << 32) - 1


def reference_philox4x32(counter: tuple[int, int, int, int], key: tuple[int, int]) -> tuple[int, int, int, int]:
    """The four output words of Philox-4x32-10 at ``counter`` with ``key`` (32-bit words)."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(ROUNDS):
        product_a, product_b = MULTIPLIERS[0] * c0, MULTIPLIERS[1] * c2
        c0, c1, c2, c3 = ((product_b >> 32) ^ c1 ^ k0, product_b & MASK,
                          (product_a >> 32) ^ c3 ^ k1, product_a & MASK)
        k0, k1 = (k0 + KEY_STEPS[0]) & MASK, (k1 + KEY_STEPS[1]) & MASK
    return c0, c1, c2, c3


def reference_stream_word(seed: int, position: int) -> int:
    """``x_p`` of ``seed`` at ``position``: a value in ``[0, 2³²)``."""
    counter = position // 4
    words = reference_philox4x32((counter & MASK, counter >> 32, 0, 0), (seed & MASK, seed >> 32))
    return words[position % 4]
