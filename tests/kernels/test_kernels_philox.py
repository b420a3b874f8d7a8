"""The PyTorch Philox-4x32-10 and the noise stream of the int8 weights against the Python-integer
reference, and that reference against Random123's known answers. Tolerance: none (integers).

Triton's ``tl.randint4x`` itself is compared in ``test_kernels_int8_weight_update.py`` (it needs the
interpreter); together: Random123 = reference = PyTorch = Triton.
"""
import pytest
import torch
from lowrank_optim.kernels.philox import philox_randint4x, philox_words

from lowrank_optim.reference.philox import reference_philox4x32, reference_stream_word

# Random123 tests/kat_vectors (DEShawResearch/random123 v1.14.0), the "philox4x32 10" lines:
# counter (4 words), key (2 words), output (4 words).
KNOWN_ANSWERS = [
    ((0x00000000, 0x00000000, 0x00000000, 0x00000000), (0x00000000, 0x00000000),
     (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF),
     (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]
SEEDS = [0, 1, 0xFFFFFFFF, 0x299F31D0A4093822, 2**63 - 1]     # the last: every bit of both key words but one


@pytest.mark.parametrize("counter, key, expected", KNOWN_ANSWERS)
def test_the_reference_gives_random123s_known_answers(counter, key, expected):
    assert reference_philox4x32(counter, key) == expected


def test_the_fast_philox_gives_the_known_answer_it_can_take():
    """Counters ``(k mod 2³², ⌊k / 2³²⌋, 0, 0)`` and keys below ``2⁶³``: only the all-zero vector."""
    words = philox_randint4x(torch.tensor([0]), torch.tensor([0]))
    assert tuple(int(w) for w in words) == KNOWN_ANSWERS[0][2]


@pytest.mark.parametrize("seed", SEEDS)
def test_the_fast_philox_is_the_reference(seed):
    """300 counters: small ones, around 2³² (the carry into the second word) and near 2⁶³."""
    counters = torch.cat([torch.arange(100), 2**32 - 50 + torch.arange(100), 2**63 - 100 + torch.arange(100)])
    words = torch.stack(philox_randint4x(torch.tensor([seed]), counters), dim=1)
    expected = [reference_philox4x32((k & 0xFFFFFFFF, k >> 32, 0, 0), (seed & 0xFFFFFFFF, seed >> 32))
                for k in counters.tolist()]
    assert words.tolist() == [list(e) for e in expected]


@pytest.mark.parametrize("seed", [12345, 2**62 + 987654321])
@pytest.mark.parametrize("start", [0, 3, 2**34 + 6])
def test_the_stream_is_the_reference_in_any_chunking(seed, start):
    seed_tensor = torch.tensor([seed])
    whole = philox_words(seed_tensor, start, 61)
    assert whole.tolist() == [reference_stream_word(seed, start + p) for p in range(61)]
    for cuts in ([1, 2, 3, 4, 5, 6, 40], [7, 0, 54], [61]):         # pieces of every alignment, an empty one
        bounds = torch.tensor([0, *cuts]).cumsum(0).tolist()
        pieces = [philox_words(seed_tensor, start + lo, hi - lo) for lo, hi in zip(bounds, bounds[1:])]
        assert torch.equal(torch.cat(pieces), whole)
