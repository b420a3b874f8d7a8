"""A slow float64 reference of the quantization scheme, written independently of the fast path.

Loops over slots and blocks; picks the nearest level by ``argmin |t^(1/p) − level^(1/p)|`` in the
map's rounding domain (``p`` = :func:`~.maps.rounding_power`: 2 for the 4-bit second moment, else
1; a tie to the larger level, as the fast path's midpoint search) in float64 on the float64 map; builds the byte layout
element by element. Tests compare the fp32 fast path (and through it the Triton kernel) with it.
"""
from __future__ import annotations

import math

import torch

from lowrank_optim.kernels.layout import slot_broadcast_shape, slot_dim
from lowrank_optim.kernels.quantized_moment_update import slot_geometry, storage_shapes

from .maps import quantization_map, rounding_power


def _slots(x: torch.Tensor, layout: str) -> list[torch.Tensor]:
    if layout == "flat":
        return [x.reshape(-1)]
    if layout == "rows":
        return [x[i] for i in range(x.shape[0])]
    return [x[:, j] for j in range(x.shape[1])]


def _slot_storage(storage: torch.Tensor, layout: str, slot: int) -> torch.Tensor:
    """The part of a codes/scales storage that belongs to ``slot`` (a view, writable)."""
    if layout == "flat":
        return storage
    return storage[:, slot] if layout == "columns" else storage[slot]


def reference_quantize(x: torch.Tensor, bits: int, signed: bool, layout: str, block_size: int,
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, scales)`` in the fast path's storage; scales float64 (absmax of the float64 values)."""
    levels = quantization_map(bits, signed)
    power = rounding_power(bits, signed)
    code_shape, scale_shape = storage_shapes(x.shape, bits, layout, block_size)
    codes = torch.zeros(code_shape, dtype=torch.int64)
    scales = torch.zeros(scale_shape, dtype=torch.float64)
    per_byte = 8 // bits
    for slot, values in enumerate(_slots(x.double().cpu(), layout)):
        slot_codes = torch.empty(values.numel(), dtype=torch.int64)
        for block in range(math.ceil(values.numel() / block_size)):
            chunk = values[block * block_size:(block + 1) * block_size]
            absmax = float(chunk.abs().max())
            _slot_storage(scales, layout, slot)[block] = absmax
            normalized = chunk / absmax if absmax > 0 else torch.zeros_like(chunk)
            distance = (normalized[:, None].pow(1.0 / power) - levels[None, :].pow(1.0 / power)).abs()
            # argmin over the reversed levels: a tie goes to the larger level
            slot_codes[block * block_size:block * block_size + chunk.numel()] = \
                levels.numel() - 1 - distance.flip(1).argmin(dim=1)
        index = torch.arange(values.numel())
        shifted = slot_codes << (bits * (index % per_byte))       # value 2k: low nibble, 2k+1: high
        _slot_storage(codes, layout, slot).index_add_(0, index // per_byte, shifted)
    return codes.to(torch.uint8), scales


def reference_dequantize(codes: torch.Tensor, scales: torch.Tensor, bits: int, signed: bool, shape, layout: str,
                         block_size: int) -> torch.Tensor:
    """The float64 moment the state stands for: ``levels64[code]·scale``."""
    levels = quantization_map(bits, signed)
    n_slots, length = slot_geometry(shape, layout)
    codes, scales = codes.cpu().long(), scales.cpu().double()
    per_byte = 8 // bits
    index = torch.arange(length)
    slot_values = torch.zeros(n_slots, length, dtype=torch.float64)
    for slot in range(n_slots):
        byte = _slot_storage(codes, layout, slot)[index // per_byte]
        code = (byte >> (bits * (index % per_byte))) & ((1 << bits) - 1)
        slot_values[slot] = levels[code] * _slot_storage(scales, layout, slot)[index // block_size]
    if layout == "flat":
        return slot_values.reshape(shape)
    return slot_values.t().contiguous() if layout == "columns" else slot_values


def reference_quantized_adam_step(grad: torch.Tensor, m_codes, m_scales, v_codes, v_scales, *, beta1: float,
                                  beta2: float, eps, bias_correction1, bias_correction2, bits: int, layout: str,
                                  block_size: int, source_slots: torch.Tensor | None = None) -> dict:
    """One step in float64 from the given state: dequantize, (remap), update, ``N``, re-quantize.

    Returns the float64 ``update``, ``exp_avg``, ``exp_avg_sq`` (before re-quantization) and the
    re-quantized state (``m_codes``, ``m_scales``, ``v_codes``, ``v_scales``)."""
    shape = grad.shape
    exp_avg = reference_dequantize(m_codes, m_scales, bits, True, shape, layout, block_size)
    exp_avg_sq = reference_dequantize(v_codes, v_scales, bits, False, shape, layout, block_size)
    if source_slots is not None:
        kept = (source_slots.cpu() >= 0).double().view(slot_broadcast_shape(layout))
        index = source_slots.cpu().clamp(min=0)
        exp_avg = exp_avg.index_select(slot_dim(layout), index) * kept
        exp_avg_sq = exp_avg_sq.index_select(slot_dim(layout), index) * kept
    as64 = lambda value: value.double().cpu() if isinstance(value, torch.Tensor) else value
    grad = grad.double().cpu()
    exp_avg = beta1 * exp_avg + (1 - beta1) * grad
    exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * grad * grad
    bc1, bc2, eps = as64(bias_correction1), as64(bias_correction2), as64(eps)
    update = (exp_avg / bc1) / (torch.sqrt(exp_avg_sq / bc2) + eps)
    new_m = reference_quantize(exp_avg, bits, True, layout, block_size)
    new_v = reference_quantize(exp_avg_sq, bits, False, layout, block_size)
    return dict(update=update, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq, m_codes=new_m[0], m_scales=new_m[1],
                v_codes=new_v[0], v_scales=new_v[1])
