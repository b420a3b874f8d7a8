"""Channel-scaled weight updates (APOLLO's) and channel norms (also Fira's residual), PyTorch reference.

For a weight ``W`` (``m×n``), its gradient ``G`` and per-channel factors ``f`` (APOLLO's ``s``,
with the norm-growth limiter's factor already folded in by the caller)::

    W ← a·W − b·(f∘G)        right: f (m,) scales rows,   f∘G[i, j] = f_i·G[i, j]
                             left:  f (n,) scales columns, f∘G[i, j] = f_j·G[i, j]
                             f 0-d: the whole tensor (scale_type="tensor")

with ``(a, b)`` of :func:`.weight_update.update_coefficients`. ``f∘G`` is never formed: fp32 and
fp64 weights take one ``mul_`` and one ``addcmul_`` in place (the update APOLLO's rule has always
run); bf16/fp16 weights are computed in fp32 and rounded once, as the Triton kernel does.

The limiter needs ``‖f∘G‖ = sqrt(Σ_c f_c²·‖G_c‖²)``, so the only pass over ``G`` before the update
is :func:`channel_squared_norms`: ``‖G_c‖²`` per channel (rows on the right, columns on the left),
or ``‖G‖²`` (0-d) for ``side=None``, in at least fp32. Self-contained apart from :mod:`.layout`.
"""
from __future__ import annotations

import torch

from .layout import layout_for, slot_dim

LOW_PRECISION = (torch.bfloat16, torch.float16)


def channel_squared_norms(matrix: torch.Tensor, side: str | None) -> torch.Tensor:
    """``‖matrix_c‖²`` of each channel ``c`` (1-D; ``side`` None: the whole tensor, 0-d), in at
    least fp32: a fused norm along contiguous rows, a sum of squares across rows (where the strided
    norm reduction is several times slower on CPU)."""
    dim = slot_dim(layout_for(side))
    dtype = torch.promote_types(matrix.dtype, torch.float32)
    if dim is None:
        # NOTE: one fused pass, no m×n temporary of squares (3× faster than square().sum() on CPU at 4096×1024).
        return torch.linalg.vector_norm(matrix, dtype=dtype).square()
    if dim == matrix.ndim - 1 and matrix.is_contiguous():
        return torch.linalg.vector_norm(matrix, dim=dim, dtype=dtype).square()
    return matrix.to(dtype).square().sum(dim=dim)


def factor_shape(weight_shape: torch.Size, side: str, factors: torch.Tensor) -> tuple[int, ...]:
    """The shape ``factors`` broadcast to against ``G``: ``()`` for a 0-d ``f``, ``m×1`` (right) or
    ``1×n`` (left) for one per channel. ValueError naming the shapes otherwise."""
    if side not in ("left", "right"):
        raise ValueError(f"Invalid side: {side!r} (expected 'left' or 'right')")
    if len(weight_shape) != 2:
        raise ValueError(f"the scaled weight update takes a 2-D weight, got shape {tuple(weight_shape)}")
    if factors.ndim == 0:
        return ()
    m, n = weight_shape
    channels = m if side == "right" else n
    if tuple(factors.shape) != (channels,):
        raise ValueError(f"factors of shape {tuple(factors.shape)} do not scale the "
                         f"{'rows' if side == 'right' else 'columns'} of a {m}×{n} gradient "
                         f"(expected ({channels},) or a 0-d tensor)")
    return (m, 1) if side == "right" else (1, n)


def scaled_weight_update_(weight: torch.Tensor, grad: torch.Tensor, factors: torch.Tensor, side: str, *,
                          a: float, b: float) -> None:
    """``W ← a·W − b·(f∘G)`` in place (module doc); ``factors`` ``f`` 1-D (one per channel of
    ``side``) or 0-d."""
    if grad.shape != weight.shape:
        raise ValueError(f"grad {tuple(grad.shape)} does not match the weight {tuple(weight.shape)}")
    coefficients = factors.reshape(factor_shape(weight.shape, side, factors))
    if weight.dtype in LOW_PRECISION:
        # NOTE: fp32 math, one rounding of the result (the Triton kernel's; no double rounding of a·W).
        exact = weight.float().mul_(a).addcmul_(grad.float(), coefficients.float(), value=-b)
        weight.copy_(exact)
        return
    if a != 1.0:
        weight.mul_(a)
    weight.addcmul_(grad, coefficients.to(weight.dtype), value=-b)
