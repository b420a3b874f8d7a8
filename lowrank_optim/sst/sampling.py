r"""Which singular-vector pairs become trainable: ``r`` of ``k`` drawn without replacement.

Two schemes for the draw probabilities ``p`` over the k pairs:

* ``"s"`` (SST paper): :math:`p_i = s_i / \sum_j s_j`: pairs with large singular values train more often.
* ``"mixed"`` (later SST version; unverified): :math:`p_i = \tfrac12\,(1/k + s_i / \sum_j s_j)`: every pair
  keeps at least half the uniform chance, so small singular values still get updated.

"Without replacement" means successive draws, each from ``p`` renormalised over the pairs not yet drawn
(``torch.multinomial(p, r, replacement=False)``). The first of the ``r`` draws therefore has exactly the
distribution ``p``. When fewer than ``r`` pairs have ``p_i > 0`` (``s`` clamped to zero), all of them are
drawn and the rest are filled uniformly from the zero-probability pairs. The draws run on the CPU with a
caller-owned ``torch.Generator``, so they are reproducible and resumable on any device.
"""

from __future__ import annotations

import torch

from ..validation import InvalidHyperparameter

SAMPLING_SCHEMES = ("s", "mixed")


def sampling_probabilities(s: torch.Tensor, scheme: str) -> torch.Tensor:
    """The draw probabilities ``p`` (float64, CPU, summing to 1) for singular values ``s ≥ 0``.

    With ``Σs = 0`` both schemes fall back to uniform.
    """
    if scheme not in SAMPLING_SCHEMES:
        choices = ", ".join(map(repr, SAMPLING_SCHEMES))
        raise InvalidHyperparameter("sampling", scheme, f"Invalid sampling: {scheme!r} (expected one of {choices})")
    weights = s.detach().to(device="cpu", dtype=torch.float64)
    if weights.ndim != 1 or weights.numel() == 0:
        raise ValueError(f"Invalid s: shape {tuple(s.shape)} (expected a non-empty vector)")
    invalid = ~torch.isfinite(weights) | (weights < 0)
    if invalid.any():
        raise ValueError(
            f"Invalid s: {int(invalid.sum())} of {weights.numel()} values are negative or not finite, e.g. "
            f"{weights[invalid][0].item()!r} (expected finite singular values >= 0)"
        )
    uniform = torch.full_like(weights, 1.0 / weights.numel())
    total = weights.sum()
    if total == 0:
        return uniform
    proportional = weights / total
    if scheme == "s":
        return proportional
    return 0.5 * (uniform + proportional)


def sample_active_indices(s: torch.Tensor, rank: int, generator: torch.Generator, scheme: str = "s") -> torch.Tensor:
    """``rank`` distinct pair indices (int64, CPU, in draw order) drawn from ``sampling_probabilities``."""
    probabilities = sampling_probabilities(s, scheme)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= probabilities.numel():
        raise ValueError(f"Invalid rank: {rank!r} (expected an integer in [1, {probabilities.numel()}])")
    positive = int((probabilities > 0).sum())
    if positive >= rank:
        return torch.multinomial(probabilities, rank, replacement=False, generator=generator)
    drawn = torch.multinomial(probabilities, positive, replacement=False, generator=generator)
    zero_probability = torch.nonzero(probabilities == 0).flatten()
    fill = zero_probability[torch.randperm(zero_probability.numel(), generator=generator)[: rank - positive]]
    return torch.cat([drawn, fill])
