"""Randomized SVD projection (GaLore 2, arXiv 2504.20437): GaLore's ``P`` without a full SVD.

``P`` approximates the top-``r`` left singular vectors of ``A`` (``A = G`` on the left side,
``A = Gᵀ`` on the right, ``a×b``) by a randomized range finder (Halko, Martinsson and Tropp 2011)
with ``q = POWER_ITERATIONS`` subspace iterations::

    Q = qr(A·Ω),  Ω ∈ ℝ^{b×(r+p)} Gaussian
    repeat q times:  Q ← qr(Aᵀ·Q);  Q ← qr(A·Q)
    Qᵀ·A = Ũ·Σ·Ṽᵀ  (a thin SVD of an (r+p)×b matrix);   P = Q·Ũ[:, :r]

with ``p = OVERSAMPLING`` extra columns. The cost is ``O(m·n·(r+p)·(2q+2))`` GEMM work plus QRs of ``a×(r+p)``
matrices and a small SVD, against a thin SVD of all of ``G``. ``Ω`` is drawn from a generator seeded by
the gradient's shape, so the refresh is deterministic (ranks of DDP, and a resumed run, draw the
same ``Ω``). Everything else (transport, overlap, FSDP2 gathering) is :class:`SVDProjector`'s.
Selected by ``GaLoreAdamW(projector="randomized_svd")``.
"""
from __future__ import annotations

import torch

from .svd import SVDProjector

OVERSAMPLING = 8         # extra sketch columns: the error bound decays like σ_{r+1}·(…)^(1/(2q+1))
POWER_ITERATIONS = 2     # subspace iterations; GaLore 2 and torch.svd_lowrank use 2
SEED = 0x6A1


class RandomizedSVDProjector(SVDProjector):
    name = "randomized_svd"

    def singular_vectors(self, grad: torch.Tensor, rank: int, side: str) -> torch.Tensor:
        matrix = grad if side == "left" else grad.T          # P spans the column space of ``matrix``
        rows, cols = matrix.shape
        sketch = min(rank + OVERSAMPLING, rows, cols)
        generator = torch.Generator(device=matrix.device).manual_seed(SEED + rows * 65_537 + cols)
        omega = torch.randn(cols, sketch, generator=generator, device=matrix.device, dtype=matrix.dtype)
        basis = torch.linalg.qr(matrix @ omega).Q
        for _ in range(POWER_ITERATIONS):
            basis = torch.linalg.qr(matrix.T @ basis).Q
            basis = torch.linalg.qr(matrix @ basis).Q
        left_vectors, _, _ = torch.linalg.svd(basis.T @ matrix, full_matrices=False)
        return basis @ left_vectors[:, :rank]
