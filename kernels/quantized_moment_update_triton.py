"""The quantized Adam moment update in one fused pass, Triton.

Same math and storage as the reference :func:`.quantized_moment_update.quantized_adam_moment_update_`
(read its module doc): per block of ``B`` values of a slot, dequantize ``m`` and ``v``
(``levels[code]·scale``), update them in fp32, write ``N`` (fp32), take each block's new absmax
and write the new codes (nearest level by a ``bits``-step binary search over the midpoints; for a
stochastic ``v`` codebook the level below by the same search over the levels, then the one above
with the reference's probability, the noise ``tl.philox`` at the value's and gradient's bits and
the step) and scales. Self-contained: the maps come in as
:class:`~.quantized_moment_update.Codebook` tables.

Program ``(b, s)`` owns block ``b`` of ``BLOCK_SLOTS`` consecutive slots: a ``B × BLOCK_SLOTS``
tile whose codes, scales and values only it reads and writes, so the update is in place. With
``source_slots`` (a DCT transport) slot ``j`` reads old slot ``source_slots[j]`` (nothing for −1)
and everything is written to new tensors (in place, a program would overwrite a slot another
still has to read). At 4 bits the tile is processed as two lanes, the even and the odd values of
each byte pair.

NOTE (agreement with the reference): the arithmetic is the reference's sequence of separately
rounded fp32 operations, with FP fusion disabled at compile time (no FMA contraction) and
round-to-nearest sqrt and division (``tl.sqrt``, ``/`` are approximate on GPUs); the absmax, the
comparisons with the midpoints and the table lookups are exact. Both paths then agree bit for
bit on finite inputs: equal codes and scales, equal ``N``. Only a non-IEEE build of either side
(an FMA-contracted CPU ``mul``/``add``) could move a value by an ulp, and a code only where that
value sits within an ulp of a midpoint (an exact tie).

Bytes moved per value (fp32 ``R``; the benchmark's GB/s): read ``R`` (4) and the codes of ``m``
and ``v``, write those codes and ``N`` (4), plus ``16/B`` for reading and writing two fp32 scales
per block: 12 B + 16/B at 8 bits, 10 B + 16/B at 4 bits, against 24 B for the float kernel with
fp32 ``R`` and moments (:mod:`.moment_update_triton`).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .quantized_moment_update import (
    HASHED_BITS,
    NOISE_BITS,
    NOISE_KEY,
    Codebook,
    check_slot_remap,
    check_state,
    slot_geometry,
)
from .triton_support import check_launchable

_TILE_VALUES = 2048          # values per program, B × BLOCK_SLOTS: 16 per thread at 4 warps (untuned: no GPU here)
_NUM_WARPS = 4
# the stochastic rounding's fixed constants (:mod:`.quantized_moment_update`), as the kernel reads them
_NOISE_KEY, _HASHED_BITS = tl.constexpr(NOISE_KEY), tl.constexpr(HASHED_BITS)
_NOISE_SHIFT, _NOISE_SCALE = tl.constexpr(32 - NOISE_BITS), tl.constexpr(float(1 << NOISE_BITS))
_COMPILE_OPTIONS = {"num_warps": _NUM_WARPS, "enable_fp_fusion": False}


@triton.jit
def _lane_step(grad_ptr, update_ptr, positions, slots, length, n_slots, source_ok, m_code, v_code, m_scale, v_scale,
               m_levels_ptr, v_levels_ptr, stride_value_len, stride_value_slot,
               beta1, one_minus_beta1, beta2, one_minus_beta2, eps, bias_correction1, sqrt_bias_correction2):
    """Dequantize, update and write ``N`` for the values at ``positions`` × ``slots``; the fp32 moments
    and gradient."""
    in_slot = positions[:, None] < length
    valid = in_slot & (slots < n_slots)[None, :]
    # NOTE: values past the end of a slot dequantize to 0 explicitly (code 0 of the zero-free v
    # map is not 0): they must not reach the block's absmax.
    readable = in_slot & source_ok[None, :]
    exp_avg = tl.where(readable, tl.load(m_levels_ptr + m_code) * m_scale, 0.0)
    exp_avg_sq = tl.where(readable, tl.load(v_levels_ptr + v_code) * v_scale, 0.0)
    offsets = positions[:, None] * stride_value_len + slots[None, :] * stride_value_slot
    grad = tl.load(grad_ptr + offsets, mask=valid, other=0.0).to(tl.float32)
    exp_avg = exp_avg * beta1 + grad * one_minus_beta1
    exp_avg_sq = exp_avg_sq * beta2 + (grad * grad) * one_minus_beta2
    denom = tl.div_rn(tl.sqrt_rn(exp_avg_sq), sqrt_bias_correction2) + eps
    update = tl.div_rn(tl.div_rn(exp_avg, denom), bias_correction1)
    tl.store(update_ptr + offsets, update, mask=valid)
    return exp_avg, exp_avg_sq, grad


@triton.jit
def _quantize(values, absmax, midpoints_ptr, BITS: tl.constexpr):
    """Codes (int32) of ``values`` in blocks of absmax ``absmax``: #midpoints ≤ value / absmax."""
    normalized = tl.div_rn(values, tl.where(absmax > 0, absmax, 1.0))
    code = tl.zeros(values.shape, dtype=tl.int32)
    # NOTE: branchless binary search over 2**BITS − 1 midpoints (+inf padded): BITS gathers from a
    # table of at most 255 floats, which stays in L1.
    for i in tl.static_range(BITS):
        step = 1 << (BITS - 1 - i)
        code = tl.where(normalized >= tl.load(midpoints_ptr + code + (step - 1)), code + step, code)
    return code


@triton.jit
def _rounding_noise(values, grad, step):
    """``u`` (uint32 below ``2**NOISE_BITS``): word 0 of Philox at counter
    ``(bits(values) ∧ H, bits(grad) ∧ H, step, 0)``."""
    value_bits = values.to(tl.uint32, bitcast=True) & _HASHED_BITS
    zeros = value_bits * 0
    word, _, _, _ = tl.philox(_NOISE_KEY, value_bits, grad.to(tl.uint32, bitcast=True) & _HASHED_BITS,
                              zeros + step.to(tl.uint32), zeros)
    return word >> _NOISE_SHIFT


@triton.jit
def _root(x, POWER: tl.constexpr):
    if POWER == 2:
        return tl.sqrt_rn(x)
    return x


@triton.jit
def _stochastic_quantize(values, absmax, grad, step, levels_ptr, BITS: tl.constexpr, POWER: tl.constexpr):
    """Codes (int32) of ``values`` rounded stochastically between their neighbouring levels,
    unbiased in ``t^(1/POWER)``."""
    normalized = tl.div_rn(values, tl.where(absmax > 0, absmax, 1.0))
    lower = tl.zeros(values.shape, dtype=tl.int32)
    # the level below: #{j ≥ 1 : q_j ≤ t}, a branchless binary search over levels[1:]
    for i in tl.static_range(BITS):
        stride = 1 << (BITS - 1 - i)
        lower = tl.where(normalized >= tl.load(levels_ptr + 1 + lower + (stride - 1)), lower + stride, lower)
    lower = tl.minimum(lower, (1 << BITS) - 2)
    low = _root(tl.load(levels_ptr + lower), POWER)
    chance = tl.div_rn(_root(normalized, POWER) - low, _root(tl.load(levels_ptr + lower + 1), POWER) - low)
    noise = _rounding_noise(values, grad, step).to(tl.float32)
    return tl.where(noise < chance * _NOISE_SCALE, lower + 1, lower)


@triton.jit
def _v_codes(values, absmax, grad, step, levels_ptr, midpoints_ptr, BITS: tl.constexpr, STOCHASTIC: tl.constexpr,
             POWER: tl.constexpr):
    """The second moment's codes: stochastic or nearest, as its codebook says."""
    if STOCHASTIC:
        return _stochastic_quantize(values, absmax, grad, step, levels_ptr, BITS, POWER)
    return _quantize(values, absmax, midpoints_ptr, BITS)


@triton.jit(do_not_specialize=["step"])
def _quantized_adam_kernel(
    grad_ptr, update_ptr,
    m_codes_ptr, m_scales_ptr, v_codes_ptr, v_scales_ptr,
    m_codes_out_ptr, m_scales_out_ptr, v_codes_out_ptr, v_scales_out_ptr,
    m_levels_ptr, m_midpoints_ptr, v_levels_ptr, v_midpoints_ptr,
    source_slots_ptr, bias_correction1_ptr, sqrt_bias_correction2_ptr, eps_ptr,
    length, n_slots,
    stride_value_len, stride_value_slot, stride_code_len, stride_code_slot, stride_scale_len, stride_scale_slot,
    beta1, one_minus_beta1, beta2, one_minus_beta2, eps, bias_correction1, sqrt_bias_correction2, step,
    BITS: tl.constexpr, BLOCK: tl.constexpr, BLOCK_SLOTS: tl.constexpr,
    HAS_REMAP: tl.constexpr, PER_SLOT: tl.constexpr,
    V_STOCHASTIC: tl.constexpr, V_POWER: tl.constexpr,
):
    block = tl.program_id(0)
    slots = tl.program_id(1) * BLOCK_SLOTS + tl.arange(0, BLOCK_SLOTS)
    slot_ok = slots < n_slots
    if HAS_REMAP:
        source = tl.load(source_slots_ptr + slots, mask=slot_ok, other=-1).to(tl.int32)
    else:
        source = slots
    source_ok = slot_ok & (source >= 0)
    if PER_SLOT:
        bc1 = tl.load(bias_correction1_ptr + slots, mask=slot_ok, other=1.0)[None, :]
        sqrt_bc2 = tl.load(sqrt_bias_correction2_ptr + slots, mask=slot_ok, other=1.0)[None, :]
        eps_value = tl.load(eps_ptr + slots, mask=slot_ok, other=1.0)[None, :]
    else:
        bc1 = bias_correction1
        sqrt_bc2 = sqrt_bias_correction2
        eps_value = eps

    scales_in = block * stride_scale_len + source * stride_scale_slot
    m_scale = tl.load(m_scales_ptr + scales_in, mask=source_ok, other=0.0)[None, :]
    v_scale = tl.load(v_scales_ptr + scales_in, mask=source_ok, other=0.0)[None, :]
    PER_BYTE: tl.constexpr = 8 // BITS
    BYTES: tl.constexpr = BLOCK // PER_BYTE
    byte_index = block * BYTES + tl.arange(0, BYTES)
    byte_ok = (byte_index < (length + PER_BYTE - 1) // PER_BYTE)[:, None]
    codes_in = byte_index[:, None] * stride_code_len + source[None, :] * stride_code_slot
    m_bytes = tl.load(m_codes_ptr + codes_in, mask=byte_ok & source_ok[None, :], other=0).to(tl.int32)
    v_bytes = tl.load(v_codes_ptr + codes_in, mask=byte_ok & source_ok[None, :], other=0).to(tl.int32)

    if BITS == 8:
        exp_avg, exp_avg_sq, grad = _lane_step(grad_ptr, update_ptr, byte_index, slots, length, n_slots, source_ok,
                                               m_bytes, v_bytes, m_scale, v_scale, m_levels_ptr, v_levels_ptr,
                                               stride_value_len, stride_value_slot,
                                               beta1, one_minus_beta1, beta2, one_minus_beta2, eps_value, bc1, sqrt_bc2)
        m_absmax = tl.max(tl.abs(exp_avg), axis=0)
        v_absmax = tl.max(tl.abs(exp_avg_sq), axis=0)
        m_out = _quantize(exp_avg, m_absmax[None, :], m_midpoints_ptr, BITS)
        v_out = _v_codes(exp_avg_sq, v_absmax[None, :], grad, step, v_levels_ptr, v_midpoints_ptr, BITS, V_STOCHASTIC,
                         V_POWER)
    else:
        even = 2 * byte_index
        m_even, v_even, grad_even = _lane_step(grad_ptr, update_ptr, even, slots, length, n_slots, source_ok,
                                               m_bytes & 15, v_bytes & 15, m_scale, v_scale, m_levels_ptr,
                                               v_levels_ptr, stride_value_len, stride_value_slot,
                                               beta1, one_minus_beta1, beta2, one_minus_beta2, eps_value, bc1,
                                               sqrt_bc2)
        m_odd, v_odd, grad_odd = _lane_step(grad_ptr, update_ptr, even + 1, slots, length, n_slots, source_ok,
                                            m_bytes >> 4, v_bytes >> 4, m_scale, v_scale, m_levels_ptr, v_levels_ptr,
                                            stride_value_len, stride_value_slot,
                                            beta1, one_minus_beta1, beta2, one_minus_beta2, eps_value, bc1, sqrt_bc2)
        m_absmax = tl.maximum(tl.max(tl.abs(m_even), axis=0), tl.max(tl.abs(m_odd), axis=0))
        v_absmax = tl.maximum(tl.max(tl.abs(v_even), axis=0), tl.max(tl.abs(v_odd), axis=0))
        odd_ok = (even + 1)[:, None] < length         # an odd slot's last high nibble stays 0
        m_out = _quantize(m_even, m_absmax[None, :], m_midpoints_ptr, BITS) | (
            tl.where(odd_ok, _quantize(m_odd, m_absmax[None, :], m_midpoints_ptr, BITS), 0) << 4)
        v_out = _v_codes(v_even, v_absmax[None, :], grad_even, step, v_levels_ptr, v_midpoints_ptr, BITS, V_STOCHASTIC,
                         V_POWER) | (
            tl.where(odd_ok, _v_codes(v_odd, v_absmax[None, :], grad_odd, step, v_levels_ptr, v_midpoints_ptr, BITS,
                                      V_STOCHASTIC, V_POWER), 0) << 4)

    store_ok = byte_ok & slot_ok[None, :]
    codes_out = byte_index[:, None] * stride_code_len + slots[None, :] * stride_code_slot
    tl.store(m_codes_out_ptr + codes_out, m_out.to(tl.uint8), mask=store_ok)
    tl.store(v_codes_out_ptr + codes_out, v_out.to(tl.uint8), mask=store_ok)
    scales_out = block * stride_scale_len + slots * stride_scale_slot
    tl.store(m_scales_out_ptr + scales_out, m_absmax, mask=slot_ok)
    tl.store(v_scales_out_ptr + scales_out, v_absmax, mask=slot_ok)


def _block_slots(layout: str, n_slots: int, block_size: int) -> int:
    if layout == "flat":
        return 1
    return min(triton.next_power_of_2(n_slots), max(1, _TILE_VALUES // block_size))


def _slot_strides(tensor: torch.Tensor, layout: str) -> tuple[int, int]:
    """``(stride along a slot, stride between slots)`` of a contiguous moment or storage tensor."""
    if layout == "flat":
        return 1, 0
    strides = tensor.stride()
    return (strides[0], strides[1]) if layout == "columns" else (strides[1], strides[0])


def _per_slot(value, n_slots: int, device: torch.device, name: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        if value.numel() != n_slots:
            raise ValueError(f"{name}: a per-slot tensor needs one value per slot ({n_slots}), got shape "
                             f"{tuple(value.shape)}")
        return value.to(device=device, dtype=torch.float32).reshape(-1).contiguous()
    return torch.full((n_slots,), value, dtype=torch.float32, device=device)


def quantized_adam_moment_update_triton(
    grad: torch.Tensor,
    m_codes: torch.Tensor,
    m_scales: torch.Tensor,
    v_codes: torch.Tensor,
    v_scales: torch.Tensor,
    *,
    m_codebook: Codebook,
    v_codebook: Codebook,
    beta1: float,
    beta2: float,
    eps: float | torch.Tensor,
    bias_correction1: float | torch.Tensor,
    bias_correction2: float | torch.Tensor,
    bits: int,
    layout: str,
    block_size: int,
    step: int,
    source_slots: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(N, m_codes, m_scales, v_codes, v_scales)``, as the reference: in place without
    ``source_slots``, new state tensors with them. Per-slot ``eps``/corrections: tensors with one
    value per slot (any shape, e.g. ``(1, r)``), not for the ``flat`` layout."""
    shape = grad.shape
    check_state("exp_avg", m_codes, m_scales, shape, bits, layout, block_size)
    check_state("exp_avg_sq", v_codes, v_scales, shape, bits, layout, block_size)
    state = (m_codes, m_scales, v_codes, v_scales)
    if not all(tensor.is_contiguous() for tensor in state):
        raise ValueError("the quantized state (codes, scales) must be contiguous: it is updated in place")
    check_launchable(grad, *state, m_codebook.levels, v_codebook.levels)
    if grad.numel() >= 2**31:
        raise ValueError(f"a moment of {grad.numel()} values exceeds the kernel's int32 offsets")
    n_slots, length = slot_geometry(shape, layout)
    grad = grad.contiguous()
    device = grad.device
    update = torch.empty(shape, dtype=torch.float32, device=device)

    has_remap = source_slots is not None
    if has_remap:
        check_slot_remap(source_slots, layout, grad)
        outputs = tuple(torch.empty_like(tensor) for tensor in state)
    else:
        outputs = state
    if grad.numel() == 0:
        return (update, *outputs)

    per_slot = any(isinstance(value, torch.Tensor) for value in (eps, bias_correction1, bias_correction2))
    if per_slot:
        if layout == "flat":
            raise ValueError("per-slot eps/bias corrections need the 'columns' or 'rows' layout, got 'flat'")
        slot_values = (_per_slot(bias_correction1, n_slots, device, "bias_correction1"),
                       _per_slot(bias_correction2, n_slots, device, "bias_correction2").sqrt(),
                       _per_slot(eps, n_slots, device, "eps"))
        scalars = (1.0, 1.0, 1.0)                          # unused
    else:
        slot_values = (update, update, update)             # unused pointers
        scalars = (eps, bias_correction1, math.sqrt(bias_correction2))

    block_slots = _block_slots(layout, n_slots, block_size)
    grid = (-(-length // block_size), triton.cdiv(n_slots, block_slots))
    _quantized_adam_kernel[grid](
        grad, update, *state, *outputs,
        m_codebook.levels, m_codebook.midpoints, v_codebook.levels, v_codebook.midpoints,
        source_slots if has_remap else update, *slot_values,
        length, n_slots,
        *_slot_strides(grad, layout), *_slot_strides(m_codes, layout), *_slot_strides(m_scales, layout),
        beta1, 1.0 - beta1, beta2, 1.0 - beta2, *scalars, int(step) & 0xFFFFFFFF,
        BITS=bits, BLOCK=block_size, BLOCK_SLOTS=block_slots, HAS_REMAP=has_remap, PER_SLOT=per_slot,
        V_STOCHASTIC=v_codebook.stochastic, V_POWER=v_codebook.power,
        **_COMPILE_OPTIONS,
    )
    return (update, *outputs)


def compile_for_target(target, *, bits: int, block_size: int, layout: str = "columns", has_remap: bool = False,
                       per_slot: bool = False, v_stochastic: bool = False, v_power: int = 1, grad_dtype: str = "fp32",
                       block_slots: int | None = None):
    """Ahead-of-time compile of the kernel for a ``triton.backends.compiler.GPUTarget`` (no GPU
    needed): proves the kernel lowers to PTX and cubin for that architecture. Returns the
    ``triton.compile`` result (``.asm["ptx"]``, ``.asm["cubin"]``)."""
    block_slots = _block_slots(layout, 1 << 20, block_size) if block_slots is None else block_slots
    pointers = dict(grad_ptr=f"*{grad_dtype}", update_ptr="*fp32",
                    m_codes_ptr="*u8", m_scales_ptr="*fp32", v_codes_ptr="*u8", v_scales_ptr="*fp32",
                    m_codes_out_ptr="*u8", m_scales_out_ptr="*fp32", v_codes_out_ptr="*u8",
                    v_scales_out_ptr="*fp32", m_levels_ptr="*fp32", m_midpoints_ptr="*fp32",
                    v_levels_ptr="*fp32", v_midpoints_ptr="*fp32", source_slots_ptr="*i64",
                    bias_correction1_ptr="*fp32", sqrt_bias_correction2_ptr="*fp32", eps_ptr="*fp32")
    integers = dict.fromkeys(("length", "n_slots", "stride_value_len", "stride_value_slot", "stride_code_len",
                              "stride_code_slot", "stride_scale_len", "stride_scale_slot"), "i32")
    floats = dict.fromkeys(("beta1", "one_minus_beta1", "beta2", "one_minus_beta2", "eps", "bias_correction1",
                            "sqrt_bias_correction2"), "fp32")
    integers["step"] = "i64"
    constexprs = dict(BITS=bits, BLOCK=block_size, BLOCK_SLOTS=block_slots, HAS_REMAP=has_remap,
                      PER_SLOT=per_slot, V_STOCHASTIC=v_stochastic, V_POWER=v_power)
    signature = {**pointers, **integers, **floats, **dict.fromkeys(constexprs, "constexpr")}
    source = triton.compiler.ASTSource(fn=_quantized_adam_kernel, signature=signature, constexprs=constexprs)
    return triton.compile(source, target=target, options=dict(_COMPILE_OPTIONS))
