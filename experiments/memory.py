"""Memory numbers for the logs and the results table."""

from __future__ import annotations

import resource

import torch
from torch import nn

from lowrank_optim.state_bytes import optimizer_state_bytes

__all__ = ["optimizer_state_bytes", "parameter_counts", "peak_memory_bytes"]


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak CUDA memory allocated on ``device``, or the process's peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
