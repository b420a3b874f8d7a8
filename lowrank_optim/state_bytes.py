"""Bytes of optimizer state, for memory reports."""
from __future__ import annotations

import torch

from .sharding import local


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Total bytes of every tensor held in ``optimizer.state`` (moments, indices, projections, steps);
    for FSDP2-sharded state, the bytes of this rank's shards."""
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                total += local(value).numel() * value.element_size()
    return total
