"""SVD projection (GaLore): ``P`` = the top-``r`` singular vectors of the gradient.

Right side ``P = V[:, :r]`` (``Vh[:r]ᵀ``), left side ``P = U[:, :r]``, from
``torch.linalg.svd(G.float(), full_matrices=False)``: the SVD always runs in fp32 (CUDA has no
bf16 SVD) and ``P`` is stored in the gradient's dtype, as ``galore_torch`` does.

The SVD runs in PyTorch on every backend; with ``backend="triton"`` the dense ``P`` enters the
fused back-projection and weight-update kernel (:mod:`lowrank_optim.kernels.weight_update_triton`).

Transport (LDAdam-style rotation): with ``M = P_newᵀ·P_old``, the first moment becomes ``M·m``
(left) or ``m·Mᵀ`` (right). The second moment is rotated with the element-wise square ``M∘M``
(``v`` stays non-negative; exact when ``M`` is a permutation, a heuristic otherwise).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .base import Projector, Subspace

if TYPE_CHECKING:
    from ..sharding import Sharding


class SVDProjector(Projector):
    name = "svd"
    family = "svd"

    def select(self, grad: torch.Tensor, rank: int, side: str, backend: str = "torch",
               sharding: Sharding | None = None, previous: Subspace | None = None) -> Subspace:
        """On an FSDP2 shard the whole gradient is all-gathered first (``m·n`` numbers: the costly
        path) and ``P`` is broadcast from the group's first rank, so all ranks hold the same ``P``."""
        full = grad if sharding is None else sharding.gather(grad)
        matrix = self.singular_vectors(full.float(), rank, side).to(grad.dtype).contiguous()
        return {"matrix": matrix if sharding is None else sharding.broadcast_(matrix)}

    def singular_vectors(self, grad: torch.Tensor, rank: int, side: str) -> torch.Tensor:
        """``P``: the top-``rank`` right (``V[:, :r]``) or left (``U[:, :r]``) singular vectors of
        the fp32 ``grad``, by a full thin SVD."""
        u, _, vh = torch.linalg.svd(grad, full_matrices=False)
        return vh[:rank].T if side == "right" else u[:, :rank]

    def basis(self, subspace: Subspace, size: int, dtype: torch.dtype) -> torch.Tensor:
        return subspace["matrix"].to(dtype)

    def transport(self, moment: torch.Tensor, old: Subspace, new: Subspace, side: str,
                  second_moment: bool) -> torch.Tensor:
        rotation = new["matrix"].float().T @ old["matrix"].float()
        if second_moment:
            rotation = rotation.square()
        rotated = moment.float() @ rotation.T if side == "right" else rotation @ moment.float()
        return rotated.to(moment.dtype)

    def subspace_bytes(self, size: int, rank: int, dtype: torch.dtype) -> int:
        return size * rank * dtype.itemsize        # P, in the gradient's dtype

    def overlap(self, old: Subspace, new: Subspace, size: int) -> torch.Tensor:
        rotation = new["matrix"].float().T @ old["matrix"].float()
        return rotation.square().sum() / rotation.shape[0]
