"""Moving moments between slots when a column-subset subspace changes, PyTorch reference.

When both the old and the new subspace are column subsets of one orthonormal basis (the DCT
projection), ``P_newᵀ·P_old`` is a 0/1 matrix and moment transport is a gather: slot ``j`` of the
new moment holds old slot ``source_slots[j]``, or zero where ``source_slots[j] = −1`` (a column
not selected before)::

    "columns" (right, moments m×r):  M_new[:, j] = M_old[:, s_j]   (0 if s_j = −1)
    "rows"    (left, moments r×n):    M_new[j, :] = M_old[s_j, :]   (0 if s_j = −1)

Exact for both moments. The Triton moment update (:mod:`.moment_update_triton`) applies this gather
while it reads the moments, so a transporting refresh costs no extra pass.
"""
from __future__ import annotations

import torch

from .layout import slot_broadcast_shape, slot_dim


def remap_slots(moment: torch.Tensor, source_slots: torch.Tensor, layout: str) -> torch.Tensor:
    """A new tensor: ``moment`` (``"columns"`` or ``"rows"``, :mod:`.layout`) gathered along its
    slot dimension at ``source_slots``, zero where −1."""
    kept = source_slots.view(slot_broadcast_shape(layout)) >= 0          # raises for "flat"
    gathered = moment.index_select(slot_dim(layout), source_slots.clamp(min=0))
    return gathered * kept.to(moment.dtype)
