"""The int8 weight update ``Ŵ ← SR(a·Ŵ − b·ΔW)`` in one fused kernel, Triton.

Same format and math as the reference :func:`.int8_weight_update.int8_weight_update_` (read its
module doc): dequantize a row, form ``w = (q·s)·a − ΔW·b`` in fp32, take the row's absmax, derive
the new scale, re-quantize with stochastic rounding, write codes and scale in place.

Program ``i`` owns row ``i``. The new scale needs the whole row's absmax before any value is
rounded, so the row is read twice in column blocks of ``BLOCK_N``: pass 1 forms ``w`` and its
absmax, pass 2 forms ``w`` again (the same fp32 operations on the same, still unwritten, codes
and ``ΔW``: the same values) and writes the new codes block by block; the new scale is stored
last. Nothing of ``w`` is kept between the passes, so any row length fits.

The noise of position ``p = i·n + j`` is word ``p mod 4`` of ``tl.randint4x(seed, ⌊p / 4⌋)``
(Philox-4x32-10), the stream :func:`.philox.philox_words` reproduces in PyTorch: with FP fusion off
(no FMA contraction) and ``div_rn`` for the two divisions, both paths write bit-identical codes and
scales on finite inputs.

Bytes moved per value (the benchmark's GB/s): read the codes and ``ΔW`` twice, write the codes
once: ``3 + 2·sizeof(ΔW)`` bytes (7 for bf16 ``ΔW``, 11 for fp32), plus the row's scale.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .int8_weight_update import check_update
from .triton_support import check_launchable

_MAX_BLOCK_N = 2048          # columns per block: 16 per thread at 4 warps (untuned: no GPU here)
_NUM_WARPS = 4
_COMPILE_OPTIONS = {"num_warps": _NUM_WARPS, "enable_fp_fusion": False}


@triton.jit
def _updated_block(codes_ptr, delta_ptr, row, cols, n_cols, stride_code_row, stride_delta_row, scale, a, b):
    """``w = (q·s)·a − ΔW·b`` (fp32) of the columns ``cols`` of ``row``; 0 past the row's end."""
    in_row = cols < n_cols
    codes = tl.load(codes_ptr + row * stride_code_row + cols, mask=in_row, other=0).to(tl.float32)
    delta = tl.load(delta_ptr + row * stride_delta_row + cols, mask=in_row, other=0.0).to(tl.float32)
    return (codes * scale) * a - delta * b


@triton.jit
def _stream_word(seed, positions):
    """``x_p``: word ``p mod 4`` of ``tl.randint4x(seed, ⌊p / 4⌋)`` (uint32), ``p`` int64."""
    # NOTE: every position evaluates its counter's Philox (four neighbours the same one): the work
    # of the tl.randint this replaces, which also computes all four words
    c0, c1, c2, c3 = tl.randint4x(seed, positions >> 2)
    word = positions & 3
    return tl.where(word == 0, c0, tl.where(word == 1, c1, tl.where(word == 2, c2, c3)))


@triton.jit
def _int8_weight_update_kernel(
    codes_ptr, scales_ptr, delta_ptr, seed_ptr,
    n_cols, stride_code_row, stride_delta_row,
    a, b,
    SCALE_BF16: tl.constexpr, BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    scale = tl.load(scales_ptr + row).to(tl.float32)
    peak = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start in range(0, n_cols, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        w = _updated_block(codes_ptr, delta_ptr, row, cols, n_cols, stride_code_row, stride_delta_row, scale, a, b)
        peak = tl.maximum(peak, tl.abs(w))
    new_scale = tl.div_rn(tl.max(peak, axis=0), 127.0)
    if SCALE_BF16:
        # NOTE: round up to bf16 (the reference's bit trick): |w| / s never exceeds 127
        new_scale = ((new_scale.to(tl.int32, bitcast=True) + 0xFFFF) & -0x10000).to(tl.float32, bitcast=True)
    safe = tl.where(new_scale > 0, new_scale, 1.0)
    seed = tl.load(seed_ptr)
    for start in range(0, n_cols, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        w = _updated_block(codes_ptr, delta_ptr, row, cols, n_cols, stride_code_row, stride_delta_row, scale, a, b)
        t = tl.minimum(tl.maximum(tl.div_rn(w, safe), -127.0), 127.0)
        low = tl.floor(t)
        # NOTE: 24 noise bits against the fraction scaled by 2^24: both exact in fp32
        noise = (_stream_word(seed, row * n_cols + cols) >> 8).to(tl.float32)
        code = low + tl.where(noise < (t - low) * 16777216.0, 1.0, 0.0)
        tl.store(codes_ptr + row * stride_code_row + cols, code.to(tl.int8), mask=cols < n_cols)
    tl.store(scales_ptr + row, new_scale.to(scales_ptr.dtype.element_ty))


def block_columns(n_cols: int) -> int:
    """``BLOCK_N`` of a row of ``n_cols`` values."""
    return min(triton.next_power_of_2(max(n_cols, 1)), _MAX_BLOCK_N)


def int8_weight_update_triton_(codes: torch.Tensor, scales: torch.Tensor, delta: torch.Tensor, *, a: float,
                               b: float, seed: torch.Tensor) -> None:
    """``Ŵ ← SR(a·Ŵ − b·ΔW)`` in place, as the reference (rows with unit column stride)."""
    check_update(codes, scales, delta, seed)
    check_launchable(codes, scales, delta)
    if codes.stride(1) != 1 or delta.stride(1) != 1 or not scales.is_contiguous():
        raise ValueError("the int8 weight update kernel needs codes and delta with unit column stride and "
                         "contiguous scales")
    n_rows, n_cols = codes.shape
    if n_rows == 0:
        return
    _int8_weight_update_kernel[(n_rows,)](
        codes, scales, delta, seed.reshape(1).to(codes.device),
        n_cols, codes.stride(0), delta.stride(0), float(a), float(b),
        SCALE_BF16=scales.dtype == torch.bfloat16, BLOCK_N=block_columns(n_cols), **_COMPILE_OPTIONS)

