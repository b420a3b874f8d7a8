"""Bytes of optimizer state, for memory reports: the one count used by the library, the training
script and the benchmarks, so that every optimizer (peers included) is measured the same way."""
from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from .sharding import local


def _tensors(value, seen: set[int]):
    """Every tensor reachable from ``value`` through containers and plain objects' attributes
    (this rank's shard of a DTensor; the inner tensors of a wrapper subclass). Objects are followed
    because peers keep tensors in them (``galore_torch``'s projector holds its projection matrix)."""
    subclass = isinstance(value, torch.Tensor) and is_traceable_wrapper_subclass(value)
    if subclass and not isinstance(value, DTensor):
        names, _ = value.__tensor_flatten__()      # torchao's OptimState8bit: no storage of its own
        for name in names:
            yield from _tensors(getattr(value, name), seen)
    elif isinstance(value, torch.Tensor):
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
    """Bytes of memory retained by the tensors in ``optimizer.state`` (:func:`tensor_bytes`)."""
    return tensor_bytes(optimizer.state)


def tensor_bytes(value) -> int:
    """Bytes retained by the tensors reachable from ``value``, each storage counted once and whole:
    a view (``galore_torch``'s ``Vh[:r]``) keeps its entire base tensor alive. For FSDP2-sharded
    state, the bytes of this rank's shards."""
    storages: dict[tuple[int, torch.device], int] = {}
    for tensor in _tensors(value, set()):
        storage = tensor.untyped_storage()
        storages[(storage.data_ptr(), tensor.device)] = storage.nbytes()
    return sum(storages.values())
