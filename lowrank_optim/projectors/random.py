r"""The seeded Gaussian projection of APOLLO (Zhu et al., arXiv 2412.05270): ``P`` never stored.

``P ∈ ℝ^{k×r}`` (``k`` the compressed size) has independent ``N(0, 1/r)`` entries, so
``E‖Pᵀg‖² = ‖g‖²``. It is drawn from a seed, and the subspace state is that seed alone (one int64):

* the first seed of the parameter at position ``p`` (1-based, over every parameter of the
  optimizer, in order) is ``group["seed"] + p``; each refresh continues the chain,
  ``s_{k+1}`` = the last of 15 int64 draws of a CPU generator seeded with ``s_k``;
* ``P`` is drawn in float32 on the CPU from ``s_k`` (``randn`` of ``(k, r)`` on the left, ``(r, k)``
  on the right, transposed), divided by ``√r``, then cast and moved to the seed's device (the
  gradient's).

These are apollo-torch 1.0.3's seeds and draws (tested against it and
:class:`~lowrank_optim.reference.ReferenceAPOLLOAdamW` in float64), except that it draws on the
gradient's device; the CPU draw makes ``P`` the same on every device, rank and resume. The ``P`` of
the current seed is kept by the projector object, outside the optimizer state (one ``k×r`` matrix
per weight, the size of GaLore's stored ``P``), and drawn again after a load or a copy: the seed is
read to the host once per refresh, never per step.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from .base import Projector, Subspace

if TYPE_CHECKING:
    from ..sharding import Sharding

NEXT_SEED_DRAWS = 15      # apollo-torch's chain: the last of 15 draws seeds the next refresh


def next_seed(seed: int) -> int:
    """The seed of the refresh after the one drawn from ``seed`` (module doc)."""
    generator = torch.Generator().manual_seed(seed)
    return int(torch.randint(0, torch.iinfo(torch.int64).max, (NEXT_SEED_DRAWS,), generator=generator)[-1])


def gaussian_projection(seed: int, size: int, rank: int, side: str) -> torch.Tensor:
    """``P`` (``size×rank``, fp32, CPU) of ``seed`` (module doc)."""
    generator = torch.Generator().manual_seed(seed)
    shape = (size, rank) if side == "left" else (rank, size)
    draw = torch.randn(shape, generator=generator, dtype=torch.float32).div_(math.sqrt(rank))
    return draw if side == "left" else draw.T


class GaussianProjector(Projector):
    """``proj="random"`` of :class:`~lowrank_optim.APOLLOAdamW` (module doc); built with the
    parameter's ``side`` and ``rank``."""

    name = "random"
    family = "random"

    def __init__(self, group: dict, **served):
        super().__init__(group, **served)
        self._drawn: tuple[torch.Tensor, torch.dtype, torch.Tensor] | None = None

    def select(self, grad: torch.Tensor, rank: int, side: str, backend: str = "torch",
               sharding: Sharding | None = None, previous: Subspace | None = None) -> Subspace:
        seed = next_seed(int(previous["seed"])) if previous else self.group["seed"] + self.position
        return {"seed": torch.tensor(seed, dtype=torch.int64, device=grad.device)}

    def basis(self, subspace: Subspace, size: int, dtype: torch.dtype) -> torch.Tensor:
        seed = subspace["seed"]
        if self._drawn is None or self._drawn[0] is not seed or self._drawn[1] != dtype:
            matrix = gaussian_projection(int(seed), size, self.rank, self.side).to(device=seed.device, dtype=dtype)
            self._drawn = (seed, dtype, matrix)
        return self._drawn[2]

    def transport(self, moment: torch.Tensor, old: Subspace, new: Subspace, side: str,
                  second_moment: bool) -> torch.Tensor:
        raise ValueError("moments='transport' with proj='random': two random subspaces share no directions "
                         "to carry the moments along; pass moments='keep' (apollo-torch's) or 'reset'")

    def subspace_bytes(self, size: int, rank: int, dtype: torch.dtype) -> int:
        return torch.int64.itemsize               # the seed; P is drawn from it

    def overlap(self, old: Subspace, new: Subspace, size: int) -> torch.Tensor:
        """``‖Q_oldᵀ·Q_new‖²_F / r`` of the orthonormalized projections (≈ r/k for independent draws)."""
        rank = self.rank
        old_q = torch.linalg.qr(gaussian_projection(int(old["seed"]), size, rank, self.side))[0]
        new_q = torch.linalg.qr(gaussian_projection(int(new["seed"]), size, rank, self.side))[0]
        return ((old_q.T @ new_q).square().sum() / rank).to(new["seed"].device)
