"""Channels of a projected weight: the rows of ``G`` (``m×n``) on the right side (``R = G·P`` is
``m×r``), its columns on the left (``R = Pᵀ·G`` is ``r×n``): the dimension the projection keeps.
Per-channel factors (Fira's ``φ``, APOLLO's ``s``) are ratios of channel norms of ``N`` and ``R``."""
from __future__ import annotations

import torch

from .kernels.channel_scaling import channel_squared_norms

__all__ = ["along_channels", "channel_squared_norms"]


def along_channels(factors: torch.Tensor, side: str) -> torch.Tensor:
    """Per-channel ``factors`` shaped to broadcast against ``G``: ``m×1`` (right) or ``1×n`` (left)."""
    return factors.view(-1, 1) if side == "right" else factors.view(1, -1)
