"""DCT projection: the subspace is ``r`` columns of a fixed orthonormal DCT basis.

Selection (ALGORITHMS.md §3). Right side: ``S = G·C``, score of column ``j`` is ``‖S[:, j]‖_p``;
left side: ``S = Cᵀ·G``, score of row ``i`` is ``‖S[i, :]‖_p``. The ``r`` best-scoring indices are
kept *sorted by decreasing score* (ties: lower index first), so slot ``i`` always holds the
``i``-th best column, as slot ``i`` of an SVD holds the ``i``-th singular direction.

``score="l2"`` picks the subset that minimises the projection error ``‖G − G·P·Pᵀ‖_F`` among all
``r``-column subsets of ``C`` (the error is ``‖G‖² − Σ_{j∈idx} ‖G·c_j‖²``); ``score="l1"`` is the
paper's default (reference code ``ell_norm=1``).

The only per-layer state is the ``r`` indices (int64). ``basis="cached"`` (the default) builds ``C``
once per size, dtype and device and shares it (``k²`` values: an fp32 ``C`` of LLaMA-7B's 4096
is 0.010 B/param, and bf16 weights with fp32 moments use a bf16 one too). ``basis="generated"``
keeps no ``C``: ``P = C[:, idx]`` is computed from the formula at each use
(:func:`~.dct_basis.dct_columns`; ``k·r`` cosines, against the ``m·k·r`` GEMM that uses them), and
a GEMM refresh scores the columns ``max(r, SCORE_BLOCK)`` at a time, so no ``m×k`` ``S`` exists
either (``R`` is then projected afresh). Both give the same values.

Moment transport is exact and free: both subspaces are column subsets of one orthonormal ``C``, so
``P_newᵀ·P_old`` is a 0/1 matrix matching equal indices.

``backend="triton"``: the scores come from a fused kernel that never writes ``S`` (``transform`` is
then unused), and projection and back-projection read the selected columns of a cached
column-major copy of ``C`` by index (:mod:`lowrank_optim.kernels.column_select_triton`). With
``basis="generated"`` there is no ``C`` for those kernels to read: the scores are the blocked GEMMs
above, and the kernels take the generated dense ``P`` (GaLore's case: projection by one GEMM, the
moment and weight kernels unchanged).
"""
from __future__ import annotations

import functools

import torch

from ..geometry import compressed_size
from ..kernels.column_select import scores_from_coefficients, top_columns
from ..kernels.layout import layout_for, slot_dim
from ..kernels.slot_remap import remap_slots
from ..sharding import Sharding, summed
from .base import Projector, Subspace
from .dct_basis import dct_coefficients, dct_columns, dct_matrix

SCORE_BLOCK = 256     # basis="generated": fewest columns per scoring GEMM (else r)


class DCTProjector(Projector):
    name = "dct"
    family = "dct"
    options = {"score": ("l1", "l2"), "transform": ("auto", "matmul", "fft"), "basis": ("cached", "generated")}

    def select(self, grad: torch.Tensor, rank: int, side: str, backend: str = "torch",
               sharding: Sharding | None = None, previous: Subspace | None = None) -> Subspace:
        return self.select_and_project(grad, rank, side, backend, sharding)[0]

    def select_and_project(self, grad: torch.Tensor, rank: int, side: str, backend: str = "torch",
                           sharding: Sharding | None = None,
                           previous: Subspace | None = None) -> tuple[Subspace, torch.Tensor | None]:
        """The PyTorch path computes all of ``S`` to score the columns, so ``R`` is ``S``'s selected
        columns (rows on the left) for free; the Triton path scores without forming ``S``, and so
        do the blocked GEMMs of ``basis="generated"`` (which has no ``C`` for the kernel to read).

        On an FSDP2 shard the scores are sums over the sharded dimension: each rank scores its
        own shard and one all-reduce of the ``k`` scores gives every rank the same indices."""
        if backend == "triton" and not self.generated:
            from ..kernels.column_select_triton import column_scores_triton
            basis = _column_major_dct(compressed_size(grad.shape, side), grad.dtype, grad.device)
            scores = column_scores_triton(grad, basis, side, self.group["score"])
            return {"indices": top_columns(summed(scores, sharding), rank)}, None
        transform = self.group["transform"]
        if transform == "auto":
            transform = "fft" if grad.device.type == "cpu" else "matmul"
        if self.generated and transform == "matmul":
            scores = _blocked_scores(grad, side, self.group["score"], max(rank, SCORE_BLOCK))
            return {"indices": top_columns(summed(scores, sharding), rank)}, None
        coefficients = dct_coefficients(grad, side, transform)
        scores = scores_from_coefficients(coefficients, side, self.group["score"])
        indices = top_columns(summed(scores, sharding), rank)
        return {"indices": indices}, coefficients.index_select(slot_dim(layout_for(side)), indices)

    def basis(self, subspace: Subspace, size: int, dtype: torch.dtype) -> torch.Tensor:
        indices = subspace["indices"]
        if self.generated:
            return dct_columns(size, indices, dtype)
        return dct_matrix(size, dtype, indices.device).index_select(1, indices)

    def basis_columns(self, subspace: Subspace, size: int, dtype: torch.dtype,
                      backend: str = "torch") -> tuple[torch.Tensor, torch.Tensor]:
        """``(C, idx)``; for Triton ``C`` is column-major, so the kernels' gathered columns are contiguous.
        ``(P, None)`` with ``basis="generated"``."""
        if self.generated:
            return self.basis(subspace, size, dtype), None
        indices = subspace["indices"]
        matrix = _column_major_dct if backend == "triton" else dct_matrix
        return matrix(size, dtype, indices.device), indices

    def transport(self, moment: torch.Tensor, old: Subspace, new: Subspace, side: str,
                  second_moment: bool) -> torch.Tensor:
        """Slot ``j`` of the result holds the old moment of index ``new[j]`` if it was selected
        before, else zero. Exact for both moments (no rotation, ``v`` stays non-negative)."""
        return remap_slots(moment, self.transport_slots(old, new), layout_for(side))

    def transport_slots(self, old: Subspace, new: Subspace) -> torch.Tensor:
        return _source_slots(old["indices"], new["indices"])

    def subspace_bytes(self, size: int, rank: int, dtype: torch.dtype) -> int:
        return rank * torch.int64.itemsize         # the indices; C is shared and rebuilt from its size

    def overlap(self, old: Subspace, new: Subspace, size: int) -> torch.Tensor:
        """Fraction of the new indices that were selected before."""
        return (_source_slots(old["indices"], new["indices"]) >= 0).float().mean()


def _blocked_scores(grad: torch.Tensor, side: str, norm: str, block: int) -> torch.Tensor:
    """Every column's score from ``S = G·C`` (``Cᵀ·G``) formed ``block`` generated columns at a time."""
    size = compressed_size(grad.shape, side)
    scores = []
    for start in range(0, size, block):
        columns = dct_columns(size, torch.arange(start, min(start + block, size), device=grad.device), grad.dtype)
        coefficients = grad @ columns if side == "right" else columns.T @ grad
        scores.append(scores_from_coefficients(coefficients, side, norm))
    return torch.cat(scores)


@functools.cache
def _column_major_dct(size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``C`` stored column by column (same values as :func:`dct_matrix`), cached like it (and
    without it: the row-major ``C`` is not kept)."""
    return dct_columns(size, torch.arange(size, device=device), dtype).T.contiguous().T


def _source_slots(old_indices: torch.Tensor, new_indices: torch.Tensor) -> torch.Tensor:
    """For each new index, its slot among ``old_indices``, or -1.

    An ``r×r`` comparison rather than a lookup table sized by the largest index: no value is read
    back to the host, so ``torch.compile`` traces it without guarding on the indices."""
    matches = new_indices.unsqueeze(1) == old_indices.unsqueeze(0)
    return torch.where(matches.any(dim=1), matches.int().argmax(dim=1), -1)
