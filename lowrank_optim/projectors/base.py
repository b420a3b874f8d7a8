"""The projector interface: how a projected optimizer picks and uses a rank-r subspace.

A projector compresses one side of an ``m×n`` gradient ``G`` with an orthonormal ``P ∈ ℝ^{k×r}``
(``k = n`` on the right, ``k = m`` on the left)::

    right:  R = G·P   (m×r),   ΔW = N·Pᵀ
    left:   R = Pᵀ·G  (r×n),   ΔW = P·N

A *subspace* is a dict of tensors (only tensors, so optimizer state loads with
``torch.load(weights_only=True)``) from which ``P`` can be rebuilt. A new projector implements
:meth:`Projector.select`, :meth:`Projector.basis` and :meth:`Projector.transport`, and is listed in
:data:`lowrank_optim.projectors.PROJECTORS`.

Methods taking ``backend`` (a resolved ``"torch"`` or ``"triton"``, see
:mod:`lowrank_optim.kernels.backend`) route their work through :mod:`lowrank_optim.kernels`. A
projector whose ``P`` is a column subset of a fixed matrix says so through
:meth:`Projector.basis_columns` (the Triton kernels then read the columns by index) and
:meth:`Projector.transport_slots` (moment transport is then a slot gather fused into the moment update).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from ..kernels.dispatch import project as _project
from ..sharding import Sharding

Subspace = dict[str, torch.Tensor]

SIDE_MODES = ("auto", "std", "reverse_std", "left", "right")


def resolve_side(shape: torch.Size, mode: str) -> str:
    """``"left"`` or ``"right"`` for a weight of ``shape`` under a side mode.

    ``auto``/``std`` compress the smaller dimension (right when ``m ≥ n``), ``reverse_std`` the
    larger one, ``left``/``right`` force the side.
    """
    m, n = shape
    if mode in ("auto", "std"):
        return "right" if m >= n else "left"
    if mode == "reverse_std":
        return "left" if m >= n else "right"
    if mode in ("left", "right"):
        return mode
    raise ValueError(f"Invalid projection side mode: {mode!r} (expected one of {SIDE_MODES})")


def compressed_size(shape: torch.Size, side: str) -> int:
    """``k``: the dimension the projection compresses."""
    return shape[1] if side == "right" else shape[0]


def projected_shape(shape: torch.Size, side: str, rank: int) -> tuple[int, int]:
    """Shape of ``R`` (and of the moments) for a weight of ``shape``."""
    return (shape[0], rank) if side == "right" else (rank, shape[1])


class Projector(ABC):
    """Chooses a subspace from a gradient and maps between full and projected spaces.

    ``options`` lists the projector's own param-group keys and their allowed values; the optimizer
    validates them and passes the group to the constructor.
    """

    name: ClassVar[str]
    options: ClassVar[dict[str, tuple]] = {}

    def __init__(self, group: dict):
        self.group = group

    @abstractmethod
    def select(self, grad: torch.Tensor, rank: int, side: str, backend: str = "torch",
               sharding: Sharding | None = None) -> Subspace:
        """A new subspace for ``grad``. Must not modify anything; raises on failure.

        With ``sharding`` (:mod:`lowrank_optim.sharding`) ``grad`` is this rank's shard, split
        along the dimension the projection keeps; every rank must select the same subspace."""

    def select_and_project(self, grad: torch.Tensor, rank: int, side: str, backend: str = "torch",
                           sharding: Sharding | None = None) -> tuple[Subspace, torch.Tensor | None]:
        """:meth:`select`, plus ``R`` for the new subspace when selecting computes it anyway."""
        return self.select(grad, rank, side, backend, sharding), None

    @abstractmethod
    def basis(self, subspace: Subspace, size: int, dtype: torch.dtype) -> torch.Tensor:
        """``P`` (``size×r``, orthonormal columns) in ``dtype``, on the subspace's device."""

    @abstractmethod
    def transport(self, moment: torch.Tensor, old: Subspace, new: Subspace, side: str,
                  second_moment: bool) -> torch.Tensor:
        """Express a moment accumulated in ``old`` coordinates in ``new`` coordinates."""

    @abstractmethod
    def overlap(self, old: Subspace, new: Subspace, size: int) -> torch.Tensor:
        """``‖P_oldᵀ·P_new‖²_F / r`` ∈ [0, 1]: 1 when the subspace did not move (a 0-d tensor)."""

    def basis_columns(self, subspace: Subspace, size: int, dtype: torch.dtype,
                      backend: str = "torch") -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(B, idx)`` with ``P = B[:, idx]``, or ``(P, None)`` for a dense ``P`` (the default)."""
        return self.basis(subspace, size, dtype), None

    def transport_slots(self, old: Subspace, new: Subspace) -> torch.Tensor | None:
        """When :meth:`transport` is a slot gather (:mod:`lowrank_optim.kernels.slot_remap`), the
        source slot of each new slot (−1: none); None (the default) otherwise."""
        return None

    def project(self, grad: torch.Tensor, subspace: Subspace, side: str, backend: str = "torch") -> torch.Tensor:
        """``R = G·P`` (right) or ``Pᵀ·G`` (left)."""
        basis, indices = self.basis_columns(subspace, compressed_size(grad.shape, side), grad.dtype, backend)
        return _project(backend, grad, basis, indices, side)
