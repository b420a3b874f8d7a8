"""The functional API of quantized moments: quantize, dequantize, start and transform them.

State is two plain tensors per moment, ``codes`` (uint8) and ``scales`` (fp32), laid out as
:mod:`lowrank_optim.kernels.quantized_moment_update` describes; every function takes the map by
``(bits, signed)`` (``signed=True`` for the first moment, False for the second) and the layout
(:func:`lowrank_optim.kernels.layout.layout_for` maps a projection side to it).
``block_size=None`` is the default of :mod:`.policy` for ``bits``. The step and the slot remap
run through :mod:`lowrank_optim.kernels.dispatch` and
:func:`lowrank_optim.kernels.quantized_moment_update.remap_quantized_slots`, called by
:class:`lowrank_optim.moments.QuantizedMoments`.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from lowrank_optim.kernels import quantized_moment_update as _reference
from lowrank_optim.kernels.quantized_moment_update import fill_byte, storage_shapes

from .maps import codebook
from .policy import resolve_block_size


def quantize(x: torch.Tensor, bits: int, signed: bool, layout: str, *, block_size: int | None = None,
             noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, scales)`` of ``x``: per block, ``scale = max |x|`` and ``code`` the nearest level of
    the map to ``x / scale`` — or, with ``noise`` (each value's ``u``,
    :func:`lowrank_optim.kernels.quantized_moment_update.rounding_noise`), one of the two levels
    around it, stochastically (the fused step's rounding of a map that rounds stochastically)."""
    block_size = resolve_block_size(bits, block_size)
    return _reference.quantize_blockwise(x, codebook(bits, signed, x.device), bits=bits, layout=layout,
                                         block_size=block_size, noise=noise)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, bits: int, signed: bool, shape, layout: str, *,
               block_size: int | None = None) -> torch.Tensor:
    """The fp32 moment of ``shape``: ``levels[code]·scale``."""
    block_size = resolve_block_size(bits, block_size)
    return _reference.dequantize_blockwise(codes, scales, codebook(bits, signed, codes.device), bits=bits,
                                           layout=layout, block_size=block_size, shape=shape)


def quantized_zeros(shape, bits: int, signed: bool, layout: str, *, block_size: int | None = None,
                    device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The state of an all-zero moment (scales 0, codes at the level nearest zero), allocated
    directly: no float temporary of the moment's size."""
    block_size = resolve_block_size(bits, block_size)
    code_shape, scale_shape = storage_shapes(shape, bits, layout, block_size)
    fill = fill_byte(codebook(bits, signed).fill_code, bits)
    return (torch.full(code_shape, fill, dtype=torch.uint8, device=device),
            torch.zeros(scale_shape, dtype=torch.float32, device=device))


def requantize_transformed(codes: torch.Tensor, scales: torch.Tensor,
                           transform: Callable[[torch.Tensor], torch.Tensor], *, bits: int, signed: bool, shape,
                           layout: str, block_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """New state of ``transform(dequantize(state))``: dequantize, transform in fp32, re-quantize.

    For moment transports that are not slot moves, such as an SVD subspace rotation
    (``M ← M·(P_oldᵀ·P_new)`` on the right, ``(P_newᵀ·P_old)·M`` on the left). ``transform`` takes and
    returns an fp32 moment of ``shape``. The second moment must stay non-negative: the unsigned map
    has no negative levels (a negative value is stored as the lowest level)."""
    moment = dequantize(codes, scales, bits, signed, shape, layout, block_size=block_size)
    transformed = transform(moment)
    if tuple(transformed.shape) != tuple(shape):
        raise ValueError(f"transform returned shape {tuple(transformed.shape)} for a moment of shape {tuple(shape)}")
    return quantize(transformed, bits, signed, layout, block_size=block_size)
