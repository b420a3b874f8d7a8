"""SST's draw of the active singular-vector pairs: distribution, no replacement, reproducibility."""

import pytest
import torch
from scipy.stats import chi2

from lowrank_optim.sst import sample_active_indices, sampling_probabilities

S = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.5, 0.25, 0.2, 0.05])
DRAWS = 8_000
# Fixed seed, so the statistic is a fixed number: the bound is the chi-square quantile at 1 - 1e-6
# (df = 7: 40.5), far above what a correct sampler gives and far below a wrong distribution's value.
BOUND = chi2.ppf(1 - 1e-6, df=len(S) - 1)


def _first_draw_counts(scheme: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    firsts = [int(sample_active_indices(S, 3, generator, scheme)[0]) for _ in range(DRAWS)]
    return torch.bincount(torch.tensor(firsts), minlength=len(S)).double()


def _chi_square(counts: torch.Tensor, probabilities: torch.Tensor) -> float:
    expected = probabilities * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("scheme", ["s", "mixed"])
def test_first_draw_follows_the_scheme(scheme):
    counts = _first_draw_counts(scheme)
    proportional = S.double() / S.double().sum()
    expected = proportional if scheme == "s" else 0.5 * (1.0 / len(S) + proportional)
    assert _chi_square(counts, expected) < BOUND
    other = 0.5 * (1.0 / len(S) + proportional) if scheme == "s" else proportional
    assert _chi_square(counts, other) > 10 * BOUND  # the test tells the two schemes apart
    assert _chi_square(counts, torch.full((len(S),), 1.0 / len(S), dtype=torch.float64)) > 10 * BOUND


def test_probabilities_formulas():
    proportional = S.double() / S.double().sum()
    torch.testing.assert_close(sampling_probabilities(S, "s"), proportional, rtol=0, atol=1e-15)
    torch.testing.assert_close(sampling_probabilities(S, "mixed"), 0.5 * (1 / 8 + proportional), rtol=0, atol=1e-15)
    torch.testing.assert_close(sampling_probabilities(torch.zeros(4), "s"), torch.full((4,), 0.25, dtype=torch.float64))


def test_draws_are_distinct_and_reproducible():
    generator = torch.Generator().manual_seed(5)
    everything = sample_active_indices(S, len(S), generator)
    assert sorted(everything.tolist()) == list(range(len(S)))
    first = sample_active_indices(S, 4, torch.Generator().manual_seed(7))
    again = sample_active_indices(S, 4, torch.Generator().manual_seed(7))
    assert torch.equal(first, again) and first.dtype == torch.int64 and first.unique().numel() == 4


def test_zero_singular_values_are_drawn_last():
    s = torch.tensor([1.0, 0.0, 0.0, 2.0, 0.0])
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        drawn = sample_active_indices(s, 4, generator).tolist()
        assert sorted(drawn[:2]) == [0, 3]  # every positive one, first
        assert len(set(drawn)) == 4 and set(drawn[2:]) <= {1, 2, 4}


@pytest.mark.parametrize(
    "s,rank,scheme,message",
    [
        (torch.tensor([1.0, -0.5]), 1, "s", r"Invalid s: 1 of 2 values are negative or not finite, e.g. -0\.5"),
        (torch.tensor([1.0, float("nan")]), 1, "s", r"Invalid s: 1 of 2 .* e\.g\. nan"),
        (torch.ones(2, 2), 1, "s", r"Invalid s: shape \(2, 2\)"),
        (torch.ones(3), 4, "s", r"Invalid rank: 4 \(expected an integer in \[1, 3\]\)"),
        (torch.ones(3), 0, "s", r"Invalid rank: 0"),
        (torch.ones(3), 1, "uniform", r"Invalid sampling: 'uniform' \(expected one of 's', 'mixed'\)"),
    ],
)
def test_rejects(s, rank, scheme, message):
    with pytest.raises(ValueError, match=message):
        sample_active_indices(s, rank, torch.Generator(), scheme)
