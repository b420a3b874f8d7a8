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

from .layer import SSTLinear
from .sampling import sample_active_indices

MOMENT_KEYS = ("exp_avg", "exp_avg_sq")


def resample_layer_(
    layer: SSTLinear,
    state_s: dict,
    state_U: dict,
    state_V: dict,
    *,
    generator: torch.Generator,
    sampling: str,
    resvd: bool,
) -> None:
    """Re-SVD ``layer`` if ``resvd``, then draw and load its next active pairs, carrying the state over.

    The state dicts are updated in place; empty ones (a layer never stepped) are left empty.
    """
    if resvd:
        layer.resvd_()
        _restart_(state_s, "step")
    previous = layer.active_indices.clone()
    layer.set_active_indices_(sample_active_indices(layer.s, layer.rank, generator, sampling))
    for state in (state_U, state_V):
        if resvd:
            _restart_(state, "column_steps")
        else:
            carry_over_columns_(state, previous, layer.active_indices, layer.spectral_size)


def carry_over_columns_(state: dict, previous: torch.Tensor, current: torch.Tensor, spectral_size: int) -> None:
    """Move each kept pair's moments and step count from its column in ``previous`` to its column in
    ``current``; columns of pairs not in ``previous`` get zeros."""
    if not state:
        return
    slot = torch.full((spectral_size,), -1, dtype=torch.int64, device=previous.device)
    slot[previous] = torch.arange(previous.numel(), device=previous.device)
    source = slot[current]
    kept = source >= 0
    source = source.clamp_min(0)
    for key in MOMENT_KEYS:
        moments = state[key]
        moments.copy_(torch.where(kept, moments.index_select(1, source), 0.0))
    steps = state["column_steps"]
    steps.copy_(torch.where(kept, steps[source], 0))


def _restart_(state: dict, step_key: str) -> None:
    if not state:
        return
    for key in (*MOMENT_KEYS, step_key):
        state[key].zero_()
