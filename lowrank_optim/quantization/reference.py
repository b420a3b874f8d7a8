"""A slow float64 reference of the quantization scheme, written independently of the fast path.

Loops over slots and blocks; picks the nearest level by ``argmin |t^(1/p) − level^(1/p)|`` in the
map's rounding domain (``p`` = :func:`~.maps.rounding_power`: 2 for the 4-bit second moment, else
1; a tie to the larger level, as the fast path's midpoint search) in float64 on the float64 map; builds the byte layout
element by element. Tests compare the fp32 fast path (and through it the Triton kernel) with it.

Stochastic rounding (the fused step's, for a map :func:`~.maps.rounds_stochastically` names) takes
each value's 24-bit noise ``u`` as an input: ``t`` between the float64 levels ``q_k ≤ t < q_{k+1}``
(``k`` at most the last but one) takes code ``k + 1`` when
``u < 2²⁴·(t^(1/p) − q_k^(1/p))/(q_{k+1}^(1/p) − q_k^(1/p))`` (``p`` the rounding power).
The noise is a hash of the fast path's fp32 values (``lowrank_optim.kernels.quantized_moment_update``),
which float64 does not reproduce; tests derive it from those values with
:mod:`lowrank_optim.reference.philox`.
"""
from __future__ import annotations

import math

import torch

from lowrank_optim.kernels.layout import slot_broadcast_shape, slot_dim
from lowrank_optim.kernels.quantized_moment_update import NOISE_BITS, slot_geometry, storage_shapes

from .maps import quantization_map, rounding_power, rounds_stochastically


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


def _stochastic_codes(normalized: torch.Tensor, noise: torch.Tensor, levels: torch.Tensor, power: int) -> torch.Tensor:
    lower = torch.tensor([int((levels[1:] <= t).sum()) for t in normalized.tolist()], dtype=torch.int64)
    lower = lower.clamp(max=levels.numel() - 2)
    root, root_levels = normalized.pow(1.0 / power), levels.pow(1.0 / power)
    chance = (root - root_levels[lower]) / (root_levels[lower + 1] - root_levels[lower])
    return lower + (noise.double() < chance * 2.0**NOISE_BITS).long()


def reference_quantize(x: torch.Tensor, bits: int, signed: bool, layout: str, block_size: int,
                       noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, scales)`` in the fast path's storage; scales float64 (absmax of the float64 values).
    To the nearest level, or stochastically with ``noise`` (each value's ``u``, ``x``'s shape)."""
    levels = quantization_map(bits, signed)
    power = rounding_power(bits, signed)
    code_shape, scale_shape = storage_shapes(x.shape, bits, layout, block_size)
    codes = torch.zeros(code_shape, dtype=torch.int64)
    scales = torch.zeros(scale_shape, dtype=torch.float64)
    per_byte = 8 // bits
    slot_noise = None if noise is None else _slots(noise.cpu(), layout)
    for slot, values in enumerate(_slots(x.double().cpu(), layout)):
        slot_codes = torch.empty(values.numel(), dtype=torch.int64)
        for block in range(math.ceil(values.numel() / block_size)):
            span = slice(block * block_size, (block + 1) * block_size)
            chunk = values[span]
            absmax = float(chunk.abs().max())
            _slot_storage(scales, layout, slot)[block] = absmax
            normalized = chunk / absmax if absmax > 0 else torch.zeros_like(chunk)
            if slot_noise is not None:
                slot_codes[span] = _stochastic_codes(normalized, slot_noise[slot][span], levels, power)
                continue
            distance = (normalized[:, None].pow(1.0 / power) - levels[None, :].pow(1.0 / power)).abs()
            # argmin over the reversed levels: a tie goes to the larger level
            slot_codes[span] = levels.numel() - 1 - distance.flip(1).argmin(dim=1)
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
                                  block_size: int, source_slots: torch.Tensor | None = None,
                                  v_noise: torch.Tensor | None = None) -> dict:
    """One step in float64 from the given state: dequantize, (remap), update, ``N``, re-quantize
    (``v`` with ``v_noise``, each value's ``u``, where its map rounds stochastically: required then).

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
    if rounds_stochastically(bits, False) and v_noise is None:
        raise ValueError(f"the {bits}-bit second moment rounds stochastically: pass v_noise")
    new_v = reference_quantize(exp_avg_sq, bits, False, layout, block_size,
                               v_noise if rounds_stochastically(bits, False) else None)
    return dict(update=update, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq, m_codes=new_m[0], m_scales=new_m[1],
                v_codes=new_v[0], v_scales=new_v[1])
