"""Channels of a projected weight: the rows of ``G`` (``m×n``) on the right side (``R = G·P`` is
``m×r``), its columns on the left (``R = Pᵀ·G`` is ``r×n``): the dimension the projection keeps.
Per-channel factors (Fira's ``φ``, APOLLO's ``s``) are ratios of channel norms of ``N`` and ``R``."""
from __future__ import annotations

import torch

from .kernels.layout import layout_for, slot_dim


def channel_squared_norms(matrix: torch.Tensor, side: str) -> torch.Tensor:
    """``‖matrix_c‖²`` of each channel ``c`` (1-D), in at least fp32: a fused norm along contiguous
    rows, a sum of squares across rows (where the strided norm reduction is several times slower on CPU)."""
    dim = slot_dim(layout_for(side))
    dtype = torch.promote_types(matrix.dtype, torch.float32)
    if dim == matrix.ndim - 1 and matrix.is_contiguous():
        return torch.linalg.vector_norm(matrix, dim=dim, dtype=dtype).square()
    return matrix.to(dtype).square().sum(dim=dim)


def along_channels(factors: torch.Tensor, side: str) -> torch.Tensor:
    """Per-channel ``factors`` shaped to broadcast against ``G``: ``m×1`` (right) or ``1×n`` (left)."""
    return factors.view(-1, 1) if side == "right" else factors.view(1, -1)
