"""Data parallelism under ``torchrun``: process group, devices, FSDP2 sharding, and reductions.

With ``WORLD_SIZE`` > 1 (set by ``torchrun``) the script joins a process group (``nccl`` on CUDA,
``gloo`` on CPU), each rank on its own GPU (``LOCAL_RANK``); the data loaders shard by rank and the
model is wrapped in ``DistributedDataParallel``, or with ``--fsdp`` sharded by FSDP2
(:func:`shard_model`). A single process needs none of it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from experiments.errors import UsageError
from lowrank_optim.registry import available_optimizers, optimizer_info
from lowrank_optim.sharding import projection_shard_placement


@dataclass(frozen=True)
class DistributedContext:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def pick_device(requested: str, local_rank: int) -> torch.device:
    """``auto``: the local GPU when CUDA is available, else the CPU."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        return torch.device("cuda", local_rank)
    return torch.device(requested)


def setup_distributed(requested_device: str, fsdp: bool = False) -> DistributedContext:
    """Join the process group when launched by ``torchrun`` with several processes (or with one,
    for ``fsdp``, which always needs a group)."""
    world_size = world_size_from_env()
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(requested_device, local_rank)
    if fsdp and "MASTER_ADDR" not in os.environ:
        raise UsageError("--fsdp", "needs a process group: launch with torchrun (--nproc_per_node N, 1 included)")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if (world_size > 1 or fsdp) and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistributedContext(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def check_fsdp_supported(optimizer: str, parameterization: str) -> None:
    """Raise :class:`UsageError` unless ``--fsdp`` can train ``optimizer`` on ``parameterization``:
    the registry's optimizers whose steps work on DTensor shards (``OptimizerInfo.fsdp``)."""
    supported = [name for name in available_optimizers() if optimizer_info(name).fsdp]
    if optimizer not in supported or parameterization != "dense":
        raise UsageError(
            "--fsdp",
            f"trains the optimizers {', '.join(supported)} with the dense parameterization; "
            f"got optimizer {optimizer!r}, parameterization {parameterization!r} (use DDP for those)",
        )


def shard_model(model: nn.Module, context: DistributedContext) -> nn.Module:
    """FSDP2: ``fully_shard`` every decoder layer, then the root, over all ranks.

    Weights are laid out by :func:`lowrank_optim.sharding.projection_shard_placement`: a projected
    weight is split along the dimension its projection keeps, so DCT steps need one all-reduce of
    column scores per refresh and nothing else (GaLore's SVD gathers the gradient)."""
    mesh = init_device_mesh(context.device.type, (context.world_size,))
    placement = projection_shard_placement(context.world_size)
    for module in model.modules():
        if type(module).__name__.endswith("DecoderLayer"):
            fully_shard(module, mesh=mesh, shard_placement_fn=placement)
    return fully_shard(model, mesh=mesh, shard_placement_fn=placement)


def all_reduce_sum(values: torch.Tensor, context: DistributedContext) -> torch.Tensor:
    """Sum ``values`` over ranks (identity for one process)."""
    if context.enabled:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def barrier(context: DistributedContext) -> None:
    if context.enabled:
        dist.barrier()


def teardown_distributed(context: DistributedContext) -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
