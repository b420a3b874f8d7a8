"""How a moment is laid out in storage: the one vocabulary of slots for every moment kernel.

A projected moment has one *slot* per basis vector; a plain parameter has none::

    "columns":  a right-projected m×r moment (R = G·P); slot j is column j     slot dim 1
    "rows":     a left-projected r×n moment (R = Pᵀ·G); slot i is row i         slot dim 0
    "flat":     a plain parameter's moment, any shape; no slots                 slot dim None

Slot remaps (a DCT subspace change), per-slot bias corrections and the blocks of quantized moments
all index slots along :func:`slot_dim`. Self-contained (imports nothing).
"""
from __future__ import annotations

LAYOUTS = ("flat", "columns", "rows")
_LAYOUT_OF_SIDE = {"right": "columns", "left": "rows", None: "flat"}
_SLOT_DIM = {"columns": 1, "rows": 0, "flat": None}


def check_layout(layout) -> None:
    """ValueError naming the value unless it is one of :data:`LAYOUTS`."""
    if layout not in LAYOUTS:
        raise ValueError(f"Invalid layout: {layout!r} (expected one of {', '.join(map(repr, LAYOUTS))})")


def layout_for(side: str | None) -> str:
    """The layout of a moment projected on ``side``: ``"columns"`` for ``"right"`` (``m×r``),
    ``"rows"`` for ``"left"`` (``r×n``), ``"flat"`` for None (a plain parameter)."""
    if side not in _LAYOUT_OF_SIDE:
        raise ValueError(f"Invalid side: {side!r} (expected 'right', 'left' or None)")
    return _LAYOUT_OF_SIDE[side]


def slot_dim(layout: str) -> int | None:
    """The dimension of a moment (and of its quantized storage) that indexes slots: 1 for
    ``"columns"``, 0 for ``"rows"``, None for ``"flat"``."""
    check_layout(layout)
    return _SLOT_DIM[layout]


def slot_broadcast_shape(layout: str) -> tuple[int, int]:
    """The view shape of a per-slot vector that broadcasts against a 2-D moment in ``layout``:
    ``(1, -1)`` for ``"columns"``, ``(-1, 1)`` for ``"rows"``."""
    dim = slot_dim(layout)
    if dim is None:
        raise ValueError("per-slot values need the 'columns' or 'rows' layout, got 'flat'")
    return (1, -1) if dim == 1 else (-1, 1)
