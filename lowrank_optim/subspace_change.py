"""A parameter's subspace replaced at a refresh, and its moments moved by the group's policy.

When ``P`` changes the moments follow ``moments``: ``"keep"`` (slot ``i`` stays slot ``i``, though it
now holds the new ``i``-th direction), ``"reset"`` (zeroed, with the per-slot step counts) or
``"transport"`` (re-expressed in the new basis: ``M ← M·P_oldᵀP_new`` for a dense ``P``, done now; for
a column subset of a fixed basis a slot gather whose source slots are returned, so the moment update
applies it fused; per-slot counts follow their slots).
"""
from __future__ import annotations

import torch

from .geometry import compressed_size
from .moments import Moments
from .projectors import SUBSPACE_PREFIX, Projector, Subspace, stored_subspace


def install_subspace(state: dict, new: Subspace, moments: Moments, projector: Projector, *, policy: str, side: str,
                     shape) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Store ``new`` in the state of a parameter of ``shape`` and move its moments by ``policy``
    (module doc); returns ``(source slots of a deferred slot gather or None, overlap with the old
    subspace: 0 on the first)``."""
    old = stored_subspace(state)
    source_slots = None
    if old and policy == "reset":
        moments.zero_()
        if "slot_steps" in state:
            state["slot_steps"].zero_()
    elif old and policy == "transport":
        source_slots = projector.transport_slots(old, new)
        if source_slots is None:
            moments.transform_(lambda m: projector.transport(m, old, new, side, False),
                               lambda v: projector.transport(v, old, new, side, True))
        elif "slot_steps" in state:
            kept = source_slots >= 0
            state["slot_steps"] = state["slot_steps"][source_slots.clamp(min=0)] * kept
    overlap = projector.overlap(old, new, compressed_size(shape, side)) if old else torch.tensor(0.0)
    for key in [k for k in state if k.startswith(SUBSPACE_PREFIX)]:
        del state[key]
    for key, tensor in new.items():
        state[SUBSPACE_PREFIX + key] = tensor
    return source_slots, overlap
