r"""The seeded Gaussian projection of APOLLO (Zhu et al., arXiv 2412.05270): ``P`` drawn from a seed,
never in the optimizer state.

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
gradient's device; the CPU draw makes ``P`` the same on every device, rank and resume.

Where ``P`` lives between uses (group key ``basis``, as the DCT's):

* ``"cached"`` (the default): the projector object keeps the ``P`` of the current seed, outside the
  optimizer state (one ``k×r`` matrix per weight in the step's dtype, the size of GaLore's stored
  ``P``), drawn again after a load or a copy. A step reads nothing back to the host: the seed is
  read once per refresh.
* ``"generated"``: nothing but the seed is kept; ``P`` is drawn at each step (``k·r`` normal draws
  on the CPU: at rank 1 a few microseconds, at 1024×256 about 1 ms, against the ``m·k·r`` GEMM that
  uses it) and, off the CPU, copied to the device, which waits for that copy at every step. The
  seed's value is kept on the host (read once per refresh).

A refresh draws the new ``P`` once: :meth:`GaussianProjector.overlap` draws it and the step's
projection reuses that draw; the old ``P`` comes from the cache when it holds it exactly (fp32 or fp64).
:func:`projection_overlap` needs no QR (Gram matrices and two ``r×r`` Cholesky factors).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from .base import Projector, Subspace

if TYPE_CHECKING:
    from ..sharding import Sharding

NEXT_SEED_DRAWS = 15      # apollo-torch's chain: the last of 15 draws seeds the next refresh
EXACT_DTYPES = (torch.float32, torch.float64)     # a cached P in these holds the fp32 draw exactly


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


def projection_overlap(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    r"""``‖Q_oldᵀ·Q_new‖²_F / r`` for ``P = Q·R`` (``k×r``, full column rank) without a QR: with the
    Gram matrices ``P_oldᵀP_old = L_old L_oldᵀ``, ``P_newᵀP_new = L_new L_newᵀ`` (Cholesky) and
    ``C = P_oldᵀP_new``, ``Q_oldᵀQ_new = L_old⁻¹ C L_new⁻ᵀ``. One fp32 GEMM of ``[P_old, P_new]``,
    then float64 on ``2r×2r`` (a near-square ``P``'s Gram is ill-conditioned)."""
    rank = old.shape[1]
    both = torch.cat([old, new], dim=1).float()
    gram = (both.T @ both).double()
    low_old = torch.linalg.cholesky(gram[:rank, :rank])
    low_new = torch.linalg.cholesky(gram[rank:, rank:])
    half = torch.linalg.solve_triangular(low_old, gram[:rank, rank:], upper=False)      # L_old⁻¹ C
    full = torch.linalg.solve_triangular(low_new, half.T, upper=False)                  # (L_old⁻¹ C L_new⁻ᵀ)ᵀ
    return (full.square().sum() / rank).float()


class GaussianProjector(Projector):
    """``proj="random"`` of :class:`~lowrank_optim.APOLLOAdamW` (module doc); built with the
    parameter's ``side`` and ``rank``."""

    name = "random"
    family = "random"

    def __init__(self, group: dict, **served):
        super().__init__(group, **served)
        self._drawn: tuple[torch.Tensor, torch.dtype, torch.Tensor] | None = None   # "cached": (seed, dtype, P)
        self._seed: tuple[torch.Tensor, int] | None = None        # "generated": the seed tensor and its value
        self._fresh: tuple[torch.Tensor, torch.Tensor] | None = None   # a refresh's draw: (new seed, fp32 CPU P)

    def select(self, grad: torch.Tensor, rank: int, side: str, backend: str = "torch",
               sharding: Sharding | None = None, previous: Subspace | None = None) -> Subspace:
        seed = next_seed(int(previous["seed"])) if previous else self.group["seed"] + self.position
        return {"seed": torch.tensor(seed, dtype=torch.int64, device=grad.device)}

    def basis(self, subspace: Subspace, size: int, dtype: torch.dtype) -> torch.Tensor:
        seed = subspace["seed"]
        if not self.generated and self._drawn is not None and self._drawn[0] is seed and self._drawn[1] == dtype:
            return self._drawn[2]
        matrix = self._draw(seed, size).to(device=seed.device, dtype=dtype)
        if not self.generated:
            self._drawn = (seed, dtype, matrix)
        return matrix

    def _draw(self, seed: torch.Tensor, size: int) -> torch.Tensor:
        """The fp32 CPU ``P`` of ``seed``: the refresh's draw when it is that seed's, else a new draw."""
        if self._fresh is not None and self._fresh[0] is seed:
            matrix, self._fresh = self._fresh[1], None
            return matrix
        if self._seed is None or self._seed[0] is not seed:
            self._seed = (seed, int(seed))
        return gaussian_projection(self._seed[1], size, self.rank, self.side)

    def transport(self, moment: torch.Tensor, old: Subspace, new: Subspace, side: str,
                  second_moment: bool) -> torch.Tensor:
        raise ValueError("moments='transport' with proj='random': two random subspaces share no directions "
                         "to carry the moments along; pass moments='keep' (apollo-torch's) or 'reset'")

    def subspace_bytes(self, size: int, rank: int, dtype: torch.dtype) -> int:
        return torch.int64.itemsize               # the seed; P is drawn from it

    def overlap(self, old: Subspace, new: Subspace, size: int) -> torch.Tensor:
        """:func:`projection_overlap` of the old and new ``P`` (≈ r/k for independent draws); the new
        draw is kept for the step's projection (module doc)."""
        cached = self._drawn
        if cached is not None and cached[0] is old["seed"] and cached[1] in EXACT_DTYPES:
            old_matrix = cached[2].to(device="cpu", dtype=torch.float32)
        else:
            old_matrix = gaussian_projection(int(old["seed"]), size, self.rank, self.side)
        self._seed = (new["seed"], int(new["seed"]))
        new_matrix = gaussian_projection(self._seed[1], size, self.rank, self.side)
        self._fresh = (new["seed"], new_matrix)
        return projection_overlap(old_matrix, new_matrix).to(new["seed"].device)
