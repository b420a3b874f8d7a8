"""Moving moments between slots when a column-subset subspace changes, PyTorch reference.

When both the old and the new subspace are column subsets of one orthonormal basis (the DCT
projection), ``P_newᵀ·P_old`` is a 0/1 matrix and moment transport is a gather: slot ``j`` of the
new moment holds old slot ``source_slots[j]``, or zero where ``source_slots[j] = −1`` (a column
not selected before)::

    right (moments m×r, slots are columns):  M_new[:, j] = M_old[:, s_j]   (0 if s_j = −1)
    left  (moments r×n, slots are rows):     M_new[j, :] = M_old[s_j, :]   (0 if s_j = −1)

Exact for both moments. The Triton moment update (:mod:`.moment_update_triton`) applies this gather
while it reads the moments, so a transporting refresh costs no extra pass.
"""
from __future__ import annotations

import torch


def remap_slots(moment: torch.Tensor, source_slots: torch.Tensor, dim: int) -> torch.Tensor:
    """A new tensor: ``moment`` gathered along ``dim`` at ``source_slots``, zero where −1."""
    kept = source_slots >= 0
    gathered = moment.index_select(dim, source_slots.clamp(min=0))
    mask_shape = (1, -1) if dim == 1 else (-1, 1)
    return gathered * kept.view(mask_shape).to(moment.dtype)
