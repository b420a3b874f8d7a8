"""FSDP2-sharded parameters (``fully_shard``, DTensor) as the optimizers see them.

A step on a sharded parameter works on this rank's shard: ``param.to_local()`` and
``param.grad.to_local()`` are views updated in place, and the moments are DTensors sharded like
the parameter (so ``torch.distributed.checkpoint`` saves, loads and reshards them; 8/4-bit
moments as DTensors of their codes and scales, :mod:`lowrank_optim.quantization.sharded`). What needs
the whole matrix goes through :class:`Sharding`, over the process group of the sharded mesh
dimension:

* DCT selection: every rank scores the candidate columns on its own rows (or columns); the
  scores are sums over the dimension that is sharded, so one all-reduce of ``k`` numbers gives
  every rank the same scores, hence the same indices. Projection, moments and update stay local.
* SVD selection (GaLore): the gradient is all-gathered (``m·n`` numbers per refresh, the costly
  path) and rank 0 of the group broadcasts ``P``, so every rank holds the same ``P``.
* a few scalars: finiteness of gradients, the scaled residual's norm, refresh statistics.

**Layout.** A projection compresses one dimension and keeps the other: the right side
(``R = G·P``, ``m×r``) keeps the rows, the left side (``R = Pᵀ·G``, ``r×n``) the columns. Sharded
along the dimension it keeps, everything but the selection is local; sharded along the dimension
it compresses, every step would need an ``r×n`` reduction. So:

* :func:`projection_shard_placement` is the ``shard_placement_fn`` for ``fully_shard`` that
  shards left-projected (wide) weights by columns (``Shard(1)``) and all else by rows
  (``Shard(0)``). FSDP2 shards dims other than 0 only evenly, so a wide weight whose column count
  is not divisible by the group size stays row-sharded.
* On a row-sharded weight the automatic side choices (``proj_side="auto"``, GaLore's ``"std"``)
  pick the right side (and ``Shard(1)`` the left side), whatever the shape: the side that stays
  local. With :func:`projection_shard_placement` that is the side an unsharded run picks; with
  FSDP2's default (``Shard(0)`` everywhere) wide weights are projected on the right.
  An explicit side on a weight sharded along it raises an error naming the parameter.

Supported placements: a 1-D mesh (FSDP2) or an HSDP mesh (replicate × shard) with one ``Shard``
placement; other layouts (tensor parallel, strided shards) raise an error naming the parameter.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from .geometry import AUTOMATIC_SIDE_MODES, kept_dim, resolve_side


@dataclass(frozen=True)
class Sharding:
    """How one parameter is sharded: its mesh and placements, the tensor dimension that is split
    (None: replicated only) and the process group it is split over."""

    mesh: DeviceMesh
    placements: tuple
    dim: int | None
    group: dist.ProcessGroup | None
    shape: torch.Size

    @classmethod
    def of(cls, tensor: torch.Tensor, label: str) -> Sharding | None:
        """The sharding of a DTensor parameter, None for a plain tensor."""
        if not isinstance(tensor, DTensor):
            return None
        shards = [(mesh_dim, p) for mesh_dim, p in enumerate(tensor.placements) if type(p) is Shard]
        others = [p for p in tensor.placements if type(p) not in (Shard, Replicate)]
        if others or len(shards) > 1:
            raise ValueError(f"{label}: placements {tensor.placements} are not supported (one Shard "
                             "placement over a 1-D FSDP2 or an HSDP mesh, the rest Replicate)")
        if not shards:
            return cls(tensor.device_mesh, tuple(tensor.placements), None, None, tensor.shape)
        mesh_dim, shard = shards[0]
        return cls(tensor.device_mesh, tuple(tensor.placements), shard.dim,
                   tensor.device_mesh.get_group(mesh_dim), tensor.shape)

    @property
    def is_split(self) -> bool:
        return self.dim is not None

    @property
    def shards(self) -> int:
        """The number of ranks the split dimension is divided over (1 when replicated only)."""
        return dist.get_world_size(self.group) if self.is_split else 1

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over the ranks holding the other shards (in place)."""
        if self.is_split:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
        return tensor

    def max_(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.is_split:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self.group)
        return tensor

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        """The whole matrix of which ``local`` is this rank's shard (an all-gather)."""
        return self.distribute(local, self.shape).full_tensor()

    def broadcast_(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` as held by rank 0 of the group (in place)."""
        if self.is_split:
            dist.broadcast(tensor, src=dist.get_global_rank(self.group, 0), group=self.group)
        return tensor

    def distribute(self, local: torch.Tensor, shape: tuple[int, ...]) -> DTensor:
        """``local`` as this rank's shard of a DTensor of global ``shape``, placed like the parameter."""
        stride = torch.empty(shape, device="meta").stride()
        return DTensor.from_local(local, self.mesh, self.placements, run_check=False, shape=torch.Size(shape),
                                  stride=stride)


def placed_like(shard: torch.Tensor, dtensor: DTensor) -> DTensor:
    """``shard`` as this rank's part of a DTensor with ``dtensor``'s mesh, placements, shape and
    stride. Built as FSDP2 builds its sharded gradients (no view of ``shard`` is taken, unlike
    ``DTensor.from_local``): ``shard`` may be a storage-less gradient stand-in, which has none."""
    return DTensor(shard, dtensor._spec, requires_grad=False)


def summed(tensor: torch.Tensor, sharding: Sharding | None) -> torch.Tensor:
    """``tensor`` summed over the shards of ``sharding`` (in place), or as it is without one."""
    return tensor if sharding is None else sharding.sum_(tensor)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a view, updated in place), or the tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def moment_storage(sharding: Sharding | None, local_shape: tuple[int, ...]) -> dict:
    """The storage keywords of a moments view (:class:`lowrank_optim.moments.Moments`) of a
    parameter of ``sharding`` whose moment has ``local_shape`` on this rank: ``unwrap`` (its
    shard), ``wrap`` (a DTensor placed like the parameter) and ``local_shape``."""
    if sharding is None:
        return {"unwrap": local}
    return {"unwrap": local, "wrap": sharding.distribute, "local_shape": tuple(local_shape)}


def local_side(sharding: Sharding | None, side: str, mode: str, label: str) -> str:
    """The projection side for a parameter of ``sharding``: ``side`` (from its shape) unless that
    compresses the sharded dimension; then the other side for an automatic ``mode``, else an error."""
    if sharding is None or sharding.dim is None or sharding.dim == kept_dim(side):
        return side
    if mode in AUTOMATIC_SIDE_MODES:
        return "right" if sharding.dim == 0 else "left"
    raise ValueError(f"{label}: side mode {mode!r} projects on the {side} side, which compresses dimension "
                     f"{sharding.dim}, the one FSDP shards (placements {sharding.placements}); use an "
                     f"automatic side ({', '.join(map(repr, AUTOMATIC_SIDE_MODES))}) or shard with "
                     "lowrank_optim.sharding.projection_shard_placement")


def projection_shard_placement(world_size: int | None = None, side_mode: str = "auto"):
    """A ``shard_placement_fn`` for ``fully_shard``: columns (``Shard(1)``) for weights projected
    on the left by ``side_mode`` (wide ones for ``"auto"``/``"std"``) when their column count
    divides evenly over ``world_size`` ranks (default: the default group's size), rows otherwise.

    ``fully_shard(block, shard_placement_fn=projection_shard_placement())`` keeps every projected
    step local (module doc) and makes the sharded run pick the same sides as an unsharded one.
    """
    size = dist.get_world_size() if world_size is None else world_size

    def placement(param: torch.nn.Parameter) -> Shard:
        if param.ndim == 2 and resolve_side(param.shape, side_mode) == "left" and param.shape[1] % size == 0:
            return Shard(1)
        return Shard(0)

    return placement
