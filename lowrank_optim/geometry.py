"""Shapes of a projection: which side of an ``m×n`` weight is compressed and what shapes follow.

A projection compresses one dimension of ``W`` (``m×n``) to rank ``r`` and keeps the other::

    right:  R = G·P  (m×r),  P ∈ ℝ^{n×r}     compresses the columns, keeps the rows
    left:   R = Pᵀ·G (r×n),  P ∈ ℝ^{m×r}     compresses the rows, keeps the columns

The moments live in ``R``'s shape; their *slots* (one per basis vector) are its columns on the
right and its rows on the left (the storage layouts ``"columns"`` and ``"rows"``,
:mod:`lowrank_optim.kernels.layout`). This module imports nothing: every other module may use it.
"""
from __future__ import annotations

SIDE_MODES = ("auto", "std", "reverse_std", "left", "right")
AUTOMATIC_SIDE_MODES = ("auto", "std")   # the modes that pick the smaller side from the shape


def resolve_side(shape, mode: str) -> str:
    """``"left"`` or ``"right"`` for a weight of ``shape`` under a side mode.

    ``auto``/``std`` compress the smaller dimension (right when ``m ≥ n``), ``reverse_std`` the
    larger one, ``left``/``right`` force the side.
    """
    m, n = shape
    if mode in AUTOMATIC_SIDE_MODES:
        return "right" if m >= n else "left"
    if mode == "reverse_std":
        return "left" if m >= n else "right"
    if mode in ("left", "right"):
        return mode
    raise ValueError(f"Invalid projection side mode: {mode!r} (expected one of {SIDE_MODES})")


def compressed_size(shape, side: str) -> int:
    """``k``: the dimension the projection compresses (the basis has ``k`` rows)."""
    return shape[1] if side == "right" else shape[0]


def projected_shape(shape, side: str, rank: int) -> tuple[int, int]:
    """Shape of ``R`` (and of the moments) for a weight of ``shape``."""
    return (shape[0], rank) if side == "right" else (rank, shape[1])


def kept_dim(side: str) -> int:
    """The dimension of ``W`` a projection keeps: rows (0) on the right, columns (1) on the left."""
    return 0 if side == "right" else 1
