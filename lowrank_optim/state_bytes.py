"""Bytes of optimizer state, for memory reports."""
from __future__ import annotations

import torch


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Total bytes of every tensor held in ``optimizer.state`` (moments, indices, projections, steps)."""
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
    return total
