"""APOLLO's weight update in two memory-bound passes, Triton (math in :mod:`.channel_scaling`).

1. :func:`channel_squared_norms_triton`: ``‖G_c‖²`` per channel in fp32, one read of ``G``. The
   grid is ``(channel blocks, splits)``: each program sums the squares of ``BLOCK_C`` channels over
   one stretch of ``BLOCK_L``-wide tiles along them and writes one fp32 partial per channel; the
   ``splits × C`` partials (a few KiB) are summed by torch. Splitting the length keeps enough
   programs in flight when there are few channels, without atomics (deterministic).
2. :func:`scaled_weight_update_triton_`: ``W ← a·W − b·(f∘G)`` over ``BLOCK_M×BLOCK_N`` tiles, one
   program per tile: one read of ``G`` and ``W``, one write of ``W``, ``f`` a device tensor (the
   limiter's factor folded in by the caller: nothing is read back to the host), ``a, b`` runtime
   scalars (no recompilation as the learning rate changes).

Both read ``G`` (and ``W``) through their strides, so a side is only which stride is the channel's:
Triton specialises a stride of 1, and the loads coalesce along whichever dimension is contiguous.
Weights and gradients fp32, bf16 or fp16; arithmetic fp32.

Bytes moved per element of ``W`` (``e`` bytes each, the benchmark's GB/s): norms ``e``; update
``3e`` (read ``G``, ``W``; write ``W``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .channel_scaling import factor_shape
from .triton_support import check_launchable

# NOTE: fixed tiles, no autotuning: both passes are memory-bound and element-wise along their
# contiguous dimension, so one 4-warp tile of 4096 elements streams at bandwidth on A100/H100.
BLOCK_C, BLOCK_L, NORM_WARPS = 32, 128, 4
BLOCK_M, BLOCK_N, UPDATE_WARPS = 16, 256, 4
# The norm pass splits the length until about this many programs run (a few per SM of an H100).
TARGET_PROGRAMS = 512
FACTOR_MODES = {"right": "rows", "left": "columns", None: "tensor"}


@triton.jit
def _channel_squared_norms_kernel(
    grad_ptr, partial_ptr, C, L, chunk,
    stride_c, stride_l,
    BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr,
):
    pid_c = tl.program_id(0)
    split = tl.program_id(1)
    channels = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    along = tl.arange(0, BLOCK_L)
    start = split * chunk
    end = tl.minimum(start + chunk, L)
    base = grad_ptr + channels.to(tl.int64)[:, None] * stride_c
    acc = tl.zeros((BLOCK_C, BLOCK_L), dtype=tl.float32)
    for offset in range(start, end, BLOCK_L):
        positions = offset + along
        mask = (channels[:, None] < C) & (positions[None, :] < end)
        values = tl.load(base + positions.to(tl.int64)[None, :] * stride_l, mask=mask, other=0.0).to(tl.float32)
        acc += values * values
    # NOTE: each lane sums its own column of tiles, then one tree reduction: fp32 throughout, the
    # order differs from torch's (results agree to a few ulps of the norm, not bitwise).
    tl.store(partial_ptr + split * C + channels, tl.sum(acc, axis=1), mask=channels < C)


@triton.jit
def _scaled_weight_update_kernel(
    weight_ptr, grad_ptr, factors_ptr, M, N,
    stride_wm, stride_wn, stride_gm, stride_gn,
    decay, neg_step,
    FACTORS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_bounds = (rows[:, None] < M) & (cols[None, :] < N)
    if FACTORS == "rows":
        f = tl.load(factors_ptr + rows, mask=rows < M, other=0.0).to(tl.float32)[:, None]
    elif FACTORS == "columns":
        f = tl.load(factors_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    else:
        f = tl.load(factors_ptr).to(tl.float32)
    grad = tl.load(grad_ptr + rows.to(tl.int64)[:, None] * stride_gm + cols[None, :] * stride_gn,
                   mask=in_bounds, other=0.0).to(tl.float32)
    tile = weight_ptr + rows.to(tl.int64)[:, None] * stride_wm + cols[None, :] * stride_wn
    weight = tl.load(tile, mask=in_bounds, other=0.0).to(tl.float32)
    # NOTE: torch's addcmul after mul_ exactly, fma((−b)·G, f, a·W) (its CPU and CUDA kernels fuse
    # the last multiply-add), so fp32 agrees bitwise with the reference. 16-bit weights: fp32 math
    # and one rounding, as the reference's fp32 path for them.
    weight = tl.fma(neg_step * grad, f, weight * decay)
    tl.store(tile, weight.to(weight_ptr.dtype.element_ty), mask=in_bounds)


def _channel_strides(matrix: torch.Tensor, side: str) -> tuple[int, int, int, int]:
    """``(C, L, stride_c, stride_l)``: channel count and length, and their strides in ``matrix``."""
    m, n = matrix.shape
    if side == "right":
        return m, n, matrix.stride(0), matrix.stride(1)
    return n, m, matrix.stride(1), matrix.stride(0)


def channel_squared_norms_triton(grad: torch.Tensor, side: str | None) -> torch.Tensor:
    """Same contract as :func:`.channel_scaling.channel_squared_norms` for a 2-D ``grad`` (any strides),
    always fp32; ``side`` None sums the rows' norms (0-d)."""
    if side not in FACTOR_MODES:
        raise ValueError(f"Invalid side: {side!r} (expected 'right', 'left' or None)")
    if grad.ndim != 2:
        raise ValueError(f"channel norms take a 2-D gradient, got shape {tuple(grad.shape)}")
    check_launchable(grad)
    channels, length, stride_c, stride_l = _channel_strides(grad, side or "right")
    blocks = triton.cdiv(channels, BLOCK_C)
    tiles = triton.cdiv(length, BLOCK_L)
    splits = max(1, min(tiles, triton.cdiv(TARGET_PROGRAMS, max(blocks, 1))))
    chunk = triton.cdiv(tiles, splits) * BLOCK_L
    splits = max(1, triton.cdiv(length, chunk))
    partial = torch.zeros((splits, channels), dtype=torch.float32, device=grad.device)
    if grad.numel():
        _channel_squared_norms_kernel[(blocks, splits)](
            grad, partial, channels, length, chunk, stride_c, stride_l,
            BLOCK_C=BLOCK_C, BLOCK_L=BLOCK_L, num_warps=NORM_WARPS,
        )
    norms = partial[0] if splits == 1 else partial.sum(0)
    return norms if side is not None else norms.sum()


def scaled_weight_update_triton_(weight: torch.Tensor, grad: torch.Tensor, factors: torch.Tensor, side: str, *,
                                 a: float, b: float) -> None:
    """Same contract as :func:`.channel_scaling.scaled_weight_update_`, in one pass."""
    if grad.shape != weight.shape:
        raise ValueError(f"grad {tuple(grad.shape)} does not match the weight {tuple(weight.shape)}")
    mode = FACTOR_MODES[side] if factor_shape(weight.shape, side, factors) else "tensor"
    check_launchable(weight, grad, factors)
    m, n = weight.shape
    if weight.numel() == 0:
        return
    factors = factors.to(torch.float32).reshape(-1).contiguous()
    grid = (triton.cdiv(m, BLOCK_M), triton.cdiv(n, BLOCK_N))
    _scaled_weight_update_kernel[grid](
        weight, grad, factors, m, n,
        weight.stride(0), weight.stride(1), grad.stride(0), grad.stride(1),
        float(a), -float(b),
        FACTORS=mode, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=UPDATE_WARPS,
    )
