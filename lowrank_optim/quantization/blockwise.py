"""The functional API of quantized moments: quantize, dequantize, start, move and update them.

State is two plain tensors per moment, ``codes`` (uint8) and ``scales`` (fp32), laid out as
:mod:`lowrank_optim.kernels.quantized_moment_update` describes; every function takes the map by
``(bits, signed)`` (``signed=True`` for the first moment, False for the second) and the layout
(:func:`layout_for` maps a projection side to it). ``block_size=None`` is the default of
:mod:`.policy` for ``bits``.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from lowrank_optim.kernels import quantized_moment_update as _reference
from lowrank_optim.kernels.quantized_moment_update import check_layout, storage_shapes

from .maps import codebook
from .policy import resolve_block_size

QUANTIZED_BACKENDS = ("torch", "triton")


def layout_for(side: str | None) -> str:
    """The layout of a moment: ``"columns"`` for a right-projected ``m×r`` moment (slots are
    columns), ``"rows"`` for a left-projected ``r×n`` one, ``"flat"`` for a plain parameter (None)."""
    layouts = {"right": "columns", "left": "rows", None: "flat"}
    if side not in layouts:
        raise ValueError(f"Invalid side: {side!r} (expected 'right', 'left' or None)")
    return layouts[side]


def quantize(x: torch.Tensor, bits: int, signed: bool, layout: str, *,
             block_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, scales)`` of ``x``: per block, ``scale = max |x|`` and ``code`` the nearest level of
    the map to ``x / scale``."""
    block_size = resolve_block_size(bits, block_size)
    return _reference.quantize_blockwise(x, codebook(bits, signed, x.device), bits=bits, layout=layout,
                                         block_size=block_size)


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
    fill = codebook(bits, signed).fill_code
    fill_byte = fill if bits == 8 else fill | (fill << 4)
    return (torch.full(code_shape, fill_byte, dtype=torch.uint8, device=device),
            torch.zeros(scale_shape, dtype=torch.float32, device=device))


def remap_quantized_slots(codes: torch.Tensor, scales: torch.Tensor, source_slots: torch.Tensor, *, bits: int,
                          signed: bool, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """New state whose slot ``j`` is old slot ``source_slots[j]`` (zero where −1): the DCT's moment
    transport, moving codes and scales of whole slots. ``dequantize`` of the result equals the
    remapped dequantized moment exactly."""
    return _reference.remap_quantized_slots(codes, scales, source_slots, layout=layout, bits=bits,
                                            fill_code=codebook(bits, signed).fill_code)


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


def quantized_adam_moment_update_(
    grad: torch.Tensor,
    m_codes: torch.Tensor,
    m_scales: torch.Tensor,
    v_codes: torch.Tensor,
    v_scales: torch.Tensor,
    *,
    beta1: float,
    beta2: float,
    eps: float | torch.Tensor,
    bias_correction1: float | torch.Tensor,
    bias_correction2: float | torch.Tensor,
    bits: int,
    layout: str,
    block_size: int | None = None,
    source_slots: torch.Tensor | None = None,
    backend: str = "torch",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One Adam moment step on quantized state: ``(N, m_codes, m_scales, v_codes, v_scales)``.

    Dequantizes ``m``, ``v`` to fp32, applies ``m ← β1·m + (1−β1)·R``, ``v ← β2·v + (1−β2)·R²``,
    returns ``N = (m / bc1) / (√(v / bc2) + ε)`` computed from those fp32 moments (fp32, the
    gradient's shape) and re-quantizes. The state is updated in place and returned as it is;
    with ``source_slots`` (the DCT transport, :func:`remap_quantized_slots`) it is remapped first
    and new tensors are returned. ``bias_correction1/2`` and ``eps`` may be tensors broadcasting
    against the moment (per-slot corrections; the Triton kernel takes one value per slot).
    ``backend``: ``"torch"`` (reference, any device) or ``"triton"`` (the fused kernel)."""
    if backend not in QUANTIZED_BACKENDS:
        raise ValueError(f"Invalid backend: {backend!r} (expected 'torch' or 'triton'; resolve 'auto' first)")
    check_layout(layout)
    block_size = resolve_block_size(bits, block_size)
    arguments = dict(m_codebook=codebook(bits, True, grad.device), v_codebook=codebook(bits, False, grad.device),
                     beta1=beta1, beta2=beta2, eps=eps, bias_correction1=bias_correction1,
                     bias_correction2=bias_correction2, bits=bits, layout=layout, block_size=block_size,
                     source_slots=source_slots)
    if backend == "triton":
        from lowrank_optim.kernels.quantized_moment_update_triton import quantized_adam_moment_update_triton
        return quantized_adam_moment_update_triton(grad, m_codes, m_scales, v_codes, v_scales, **arguments)
    return _reference.quantized_adam_moment_update_(grad, m_codes, m_scales, v_codes, v_scales, **arguments)
