"""Memory numbers for the logs and the results table."""

from __future__ import annotations

import resource

import torch
from torch import nn

from lowrank_optim.sharding import local


def _tensors(value, seen: set[int]):
    """Every tensor reachable from ``value`` through containers and plain objects' attributes
    (this rank's shard of a DTensor)."""
    if isinstance(value, torch.Tensor):
        yield local(value)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item, seen)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item, seen)
    elif hasattr(value, "__dict__") and id(value) not in seen:
        seen.add(id(value))  # objects can reference each other
        yield from _tensors(vars(value), seen)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of memory retained by the tensors in ``optimizer.state``, each storage counted once.

    Unlike ``lowrank_optim.state_bytes.optimizer_state_bytes`` this also follows objects stored in the
    state, such as ``galore_torch``'s projector holding its projection matrix, so peer baselines are
    measured the same way; and it counts whole storages, because a view (``galore_torch``'s
    ``Vh[:r]``) keeps its entire base tensor alive.
    """
    storages: dict[tuple[int, torch.device], int] = {}
    for tensor in _tensors(optimizer.state, set()):
        storage = tensor.untyped_storage()
        storages[(storage.data_ptr(), tensor.device)] = storage.nbytes()
    return sum(storages.values())


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak CUDA memory allocated on ``device``, or the process's peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
