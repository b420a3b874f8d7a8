"""Are gradients free of inf/nan: the one check every optimizer of the library uses.

One host sync for any number of tensors. Norms of 16-bit tensors are taken in fp32 (a large but
finite fp16 gradient must not overflow to inf). A DTensor (FSDP2 shard) is finite when all its
shards are: one all-reduce per process group of the sharded ones.
"""
from __future__ import annotations

import torch

from .sharding import Sharding, local


def finite_flags(tensors: list[torch.Tensor]) -> list[bool]:
    """For each tensor, whether it holds no inf or nan."""
    if not tensors:
        return []
    flags = _local_finite_flags([local(t) for t in tensors])
    by_group: dict[int, tuple[Sharding, list[int]]] = {}
    for index, tensor in enumerate(tensors):
        sharding = Sharding.of(tensor, f"gradient {index}")
        if sharding is not None and sharding.is_split:
            by_group.setdefault(id(sharding.group), (sharding, []))[1].append(index)
    for sharding, indices in by_group.values():
        bad = sharding.max_(torch.logical_not(flags[indices]).to(torch.int32))
        flags[indices] = bad == 0
    return flags.tolist()


def all_finite(tensors: list[torch.Tensor]) -> bool:
    return all(finite_flags(tensors))


def _local_finite_flags(tensors: list[torch.Tensor]) -> torch.Tensor:
    norms: list[torch.Tensor | None] = [None] * len(tensors)
    by_dtype: dict[torch.dtype, list[int]] = {}
    for index, tensor in enumerate(tensors):
        by_dtype.setdefault(tensor.dtype, []).append(index)
    for dtype, indices in by_dtype.items():
        norm_dtype = torch.float32 if dtype.itemsize < 4 else None
        for index, norm in zip(indices, torch._foreach_norm([tensors[i] for i in indices], dtype=norm_dtype)):
            norms[index] = norm.float()
    return torch.stack([n.to(norms[0].device) for n in norms]).isfinite()
