"""The end of an SST iteration: optionally re-SVD a layer, then draw its next active pairs.

Optimizer state of an SST layer (see :class:`~lowrank_optim.sst.optimizer.SSTAdamW`):
``state[s] = {exp_avg, exp_avg_sq, step}`` and, for ``U_active`` and ``V_active``,
``{exp_avg, exp_avg_sq, column_steps}``, where column ``j`` belongs to pair ``active_indices[j]``.

* A pair that stays active keeps its moments and step count, moved to its new column.
* A swapped-in pair starts from zero moments and step 0.
* A re-SVD replaces every singular vector and reorders ``s``: all of the layer's moments restart.
"""

from __future__ import annotations

import torch

from ..moments import Moments
from .layer import SSTLinear
from .sampling import sample_active_indices


def resample_layer_(
    layer: SSTLinear,
    moments_s: Moments,
    moments_U: Moments,
    moments_V: Moments,
    *,
    generator: torch.Generator,
    sampling: str,
    resvd: bool,
) -> None:
    """Re-SVD ``layer`` if ``resvd``, then draw and load its next active pairs, carrying the state over.

    The moments (views of the state dicts, float or quantized) are updated in place; a layer never
    stepped has none and is left so.
    """
    if resvd:
        layer.resvd_()
        _restart_(moments_s, "step")
    previous = layer.active_indices.clone()
    layer.set_active_indices_(sample_active_indices(layer.s, layer.rank, generator, sampling))
    for moments in (moments_U, moments_V):
        if resvd:
            _restart_(moments, "column_steps")
        else:
            carry_over_columns_(moments, previous, layer.active_indices, layer.spectral_size)


def carry_over_columns_(moments: Moments, previous: torch.Tensor, current: torch.Tensor, spectral_size: int) -> None:
    """Move each kept pair's moments and step count from its column in ``previous`` to its column in
    ``current``; columns of pairs not in ``previous`` get zeros (a slot remap of the moments)."""
    if not moments.exists:
        return
    slot = torch.full((spectral_size,), -1, dtype=torch.int64, device=previous.device)
    slot[previous] = torch.arange(previous.numel(), device=previous.device)
    source = slot[current]
    moments.remap_slots(source)
    steps = moments.state["column_steps"]
    steps.copy_(torch.where(source >= 0, steps[source.clamp_min(0)], 0))


def _restart_(moments: Moments, step_key: str) -> None:
    if not moments.exists:
        return
    moments.zero_()
    moments.state[step_key].zero_()
