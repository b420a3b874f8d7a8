"""The projector interface: how a projected optimizer picks and uses a rank-r subspace.

A projector compresses one side of an ``m×n`` gradient ``G`` with an orthonormal ``P ∈ ℝ^{k×r}``
(``k = n`` on the right, ``k = m`` on the left)::

    right:  R = G·P   (m×r),   ΔW = N·Pᵀ
    left:   R = Pᵀ·G  (r×n),   ΔW = P·N

A *subspace* is a dict of tensors (only tensors, so optimizer state loads with
``torch.load(weights_only=True)``) from which ``P`` can be rebuilt. A new projector is one file
with a subclass implementing :meth:`Projector.select`, :meth:`Projector.basis`,
:meth:`Projector.transport` and :meth:`Projector.overlap`, plus one line in
:data:`lowrank_optim.projectors.PROJECTORS`; the engine does not know which projector it runs.

Methods taking ``backend`` (a resolved ``"torch"`` or ``"triton"``, see
:mod:`lowrank_optim.kernels.backend`) route their work through :mod:`lowrank_optim.kernels`. A
projector whose ``P`` is a column subset of a fixed matrix says so through
:meth:`Projector.basis_columns` (the Triton kernels then read the columns by index) and
:meth:`Projector.transport_slots` (moment transport is then a slot gather fused into the moment update).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar

import torch

from ..geometry import compressed_size
from ..kernels.dispatch import project as _project
from ..kernels.dispatch import project_with_squared_norms as _project_with_squared_norms

if TYPE_CHECKING:
    from ..sharding import Sharding

Subspace = dict[str, torch.Tensor]
SUBSPACE_PREFIX = "proj_"        # a parameter's state stores its subspace's tensors under these keys


def stored_subspace(state: dict) -> Subspace:
    """The subspace a parameter's optimizer state holds (empty before its first refresh)."""
    return {key[len(SUBSPACE_PREFIX):]: value for key, value in state.items() if key.startswith(SUBSPACE_PREFIX)}

class Projector(ABC):
    """Chooses a subspace from a gradient and maps between full and projected spaces.

    ``options`` lists the projector's own param-group keys and their allowed values; the optimizer
    validates them and passes the group to the constructor. ``family`` says which optimizer may
    use it: ``"svd"`` projectors (a dense ``P`` from the gradient's singular vectors) are the
    choices of ``GaLoreAdamW(projector=...)``; ``"dct"`` is ``DCTProjAdam``'s.
    """

    name: ClassVar[str]
    family: ClassVar[str]
    options: ClassVar[dict[str, tuple]] = {}

    def __init__(self, group: dict, *, position: int = 0, side: str | None = None, rank: int | None = None):
        """A projector serves one parameter of ``group``: its 1-based ``position`` among the
        optimizer's parameters (a seed), its ``side`` and ``rank`` (None: given to each call)."""
        self.group = group
        self.position = position
        self.side = side
        self.rank = rank

    @property
    def generated(self) -> bool:
        """Whether the matrix ``P`` is cut from (or ``P`` itself) is drawn again at each use instead of
        kept (group key ``basis="generated"``; a group without the key: ``"cached"``)."""
        return self.group.get("basis", "cached") == "generated"

    @abstractmethod
    def select(self, grad: torch.Tensor, rank: int, side: str, backend: str = "torch",
               sharding: Sharding | None = None, previous: Subspace | None = None) -> Subspace:
        """A new subspace for ``grad``, replacing ``previous`` (empty or None at the first refresh;
        a projector may continue from it, as a seed chain does). Must not modify anything; raises on failure.

        With ``sharding`` (:mod:`lowrank_optim.sharding`) ``grad`` is this rank's shard, split
        along the dimension the projection keeps; every rank must select the same subspace."""

    def select_and_project(self, grad: torch.Tensor, rank: int, side: str, backend: str = "torch",
                           sharding: Sharding | None = None,
                           previous: Subspace | None = None) -> tuple[Subspace, torch.Tensor | None]:
        """:meth:`select`, plus ``R`` for the new subspace when selecting computes it anyway."""
        return self.select(grad, rank, side, backend, sharding, previous), None

    @abstractmethod
    def basis(self, subspace: Subspace, size: int, dtype: torch.dtype) -> torch.Tensor:
        """``P`` (``size×r``, orthonormal columns) in ``dtype``, on the subspace's device."""

    @abstractmethod
    def transport(self, moment: torch.Tensor, old: Subspace, new: Subspace, side: str,
                  second_moment: bool) -> torch.Tensor:
        """Express a moment accumulated in ``old`` coordinates in ``new`` coordinates."""

    @abstractmethod
    def subspace_bytes(self, size: int, rank: int, dtype: torch.dtype) -> int:
        """Bytes of the subspace state of a rank-``rank`` projection of size ``size`` (the first
        step's allocation, for summaries and memory accounting)."""

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

    def project_with_squared_norms(self, grad: torch.Tensor, subspace: Subspace, side: str, backend: str,
                                   norm_side: str | None) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`project` and the squared channel norms of ``grad`` along ``norm_side`` (``side``, or
        None for ``‖G‖²``), in one pass over ``grad`` where the backend can."""
        basis, indices = self.basis_columns(subspace, compressed_size(grad.shape, side), grad.dtype, backend)
        return _project_with_squared_norms(backend, grad, basis, indices, side, norm_side)
