"""DCT projection: the subspace is ``r`` columns of a fixed orthonormal DCT basis.

Selection (ALGORITHMS.md §3). Right side: ``S = G·C``, score of column ``j`` is ``‖S[:, j]‖_p``;
left side: ``S = Cᵀ·G``, score of row ``i`` is ``‖S[i, :]‖_p``. The ``r`` best-scoring indices are
kept *sorted by decreasing score* (ties: lower index first), so slot ``i`` always holds the
``i``-th best column, as slot ``i`` of an SVD holds the ``i``-th singular direction.

``score="l2"`` picks the subset that minimises the projection error ``‖G − G·P·Pᵀ‖_F`` among all
``r``-column subsets of ``C`` (the error is ``‖G‖² − Σ_{j∈idx} ‖G·c_j‖²``); ``score="l1"`` is the
paper's default (reference code ``ell_norm=1``).

The only per-layer state is the ``r`` indices (int64); ``C`` is rebuilt from its size and cached.
Moment transport is exact and free: both subspaces are column subsets of one orthonormal ``C``, so
``P_newᵀ·P_old`` is a 0/1 matrix matching equal indices.
"""
from __future__ import annotations

import torch

from .base import Projector, Subspace
from .dct_basis import dct_coefficients, dct_matrix


class DCTProjector(Projector):
    name = "dct"
    options = {"score": ("l1", "l2"), "transform": ("auto", "matmul", "fft")}

    def select(self, grad: torch.Tensor, rank: int, side: str) -> Subspace:
        transform = self.group["transform"]
        if transform == "auto":
            transform = "fft" if grad.device.type == "cpu" else "matmul"
        coefficients = dct_coefficients(grad, side, transform)
        reduce_dim = 0 if side == "right" else 1
        if self.group["score"] == "l1":
            scores = coefficients.abs().sum(dim=reduce_dim, dtype=torch.float32)
        else:
            scores = coefficients.float().square().sum(dim=reduce_dim)
        order = torch.sort(scores, descending=True, stable=True).indices
        return {"indices": order[:rank].clone()}

    def basis(self, subspace: Subspace, size: int, dtype: torch.dtype) -> torch.Tensor:
        indices = subspace["indices"]
        return dct_matrix(size, dtype, indices.device).index_select(1, indices)

    def transport(self, moment: torch.Tensor, old: Subspace, new: Subspace, side: str,
                  second_moment: bool) -> torch.Tensor:
        """Slot ``j`` of the result holds the old moment of index ``new[j]`` if it was selected
        before, else zero. Exact for both moments (no rotation, ``v`` stays non-negative)."""
        source_slot = _source_slots(old["indices"], new["indices"])
        kept = source_slot >= 0
        dim = 1 if side == "right" else 0
        gathered = moment.index_select(dim, source_slot.clamp(min=0))
        mask_shape = (1, -1) if side == "right" else (-1, 1)
        return gathered * kept.view(mask_shape).to(moment.dtype)

    def overlap(self, old: Subspace, new: Subspace, size: int) -> torch.Tensor:
        """Fraction of the new indices that were selected before."""
        return (_source_slots(old["indices"], new["indices"]) >= 0).float().mean()


def _source_slots(old_indices: torch.Tensor, new_indices: torch.Tensor) -> torch.Tensor:
    """For each new index, its slot among ``old_indices``, or -1."""
    size = int(max(old_indices.max(), new_indices.max())) + 1
    slot_of = torch.full((size,), -1, dtype=torch.int64, device=new_indices.device)
    slot_of[old_indices] = torch.arange(old_indices.numel(), device=new_indices.device)
    return slot_of[new_indices]
