"""Kernel 3: back-projection GEMM with the weight update fused in its epilogue, Triton.

Computes, tile by tile and in place on ``W`` (fp32 or bf16; math in :mod:`.weight_update`)::

    W ← a·W − b·ΔW,     ΔW = N·Pᵀ (right) or P·N (left),   P = basis[:, idx] or basis

reading the basis columns by index (no copy of ``C[:, idx]``; ``idx`` None for GaLore's dense
``P``). ``ΔW`` never exists in memory: each program accumulates its ``ΔW`` tile in fp32 registers,
then reads its ``W`` tile once and writes it once. Weight decay of either AdamW form is the pair
``(a, b)`` of :func:`.weight_update.update_coefficients`, runtime scalars. fp32 ``N`` uses TF32
when torch's matmul setting allows it.

With the scaled residual (``RESIDUAL``; gradient ``G``, its projection ``R``, coefficients ``φ``)
the same GEMM computes::

    right:  ΔW = (N − φ∘R)·Pᵀ + φ∘G        (φ scales rows: φ∘X[i, j] = φ_i·X[i, j])
    left:   ΔW = P·(N − φ∘R) + φ∘G         (φ scales columns: φ∘X[i, j] = φ_j·X[i, j])

the ``N − φ∘R`` operand formed tile by tile from the ``N`` and ``R`` tiles as they are loaded (``R``
costs the traffic of ``N`` again), and ``φ∘G`` added in the epilogue (one read of ``G``, fp32 or
bf16): still no ``m×n`` temporary, one pass over ``W``.

NOTE: with a DCT basis pass it column-major (``C.T.contiguous().T``) so the gathered columns are
contiguous; a dense ``P`` (``k×r``, row-major) is already contiguous along the reduced dimension.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_support import autotune_options, check_launchable, dot_precision
from .weight_update import residual_operands, update_coefficients

_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
]


# NOTE: W is read and written in place; the autotuner runs every config on the same W, so it
# restores W after each timing run (restore_value).
@triton.autotune(configs=_CONFIGS, key=["M", "N", "R", "HAS_INDEX", "BASIS_ON_LEFT", "RESIDUAL"],
                 restore_value=["weight_ptr"], **autotune_options())
@triton.jit
def _projected_weight_update_kernel(
    weight_ptr, update_ptr, basis_ptr, index_ptr, grad_ptr, low_rank_grad_ptr, coefficients_ptr, M, N, R,
    stride_wm, stride_wn, stride_um, stride_un, stride_bk, stride_br,
    stride_gm, stride_gn, stride_lm, stride_ln,
    decay, step,
    HAS_INDEX: tl.constexpr, BASIS_ON_LEFT: tl.constexpr, RESIDUAL: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    inner = tl.arange(0, BLOCK_K)
    if RESIDUAL:                # φ of this tile's rows (right) or columns (left), as a 2-D factor
        if BASIS_ON_LEFT:
            phi = tl.load(coefficients_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        else:
            phi = tl.load(coefficients_ptr + rows, mask=rows < M, other=0.0).to(tl.float32)[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for start in range(0, R, BLOCK_K):
        slots = start + inner
        if HAS_INDEX:
            basis_cols = tl.load(index_ptr + slots, mask=slots < R, other=0).to(tl.int64)
        else:
            basis_cols = slots.to(tl.int64)
        if BASIS_ON_LEFT:       # ΔW = P·N: A[i, s] = basis[i, idx[s]], B[s, j] = N[s, j] (− φ_j·R[s, j])
            a = tl.load(basis_ptr + rows.to(tl.int64)[:, None] * stride_bk + basis_cols[None, :] * stride_br,
                        mask=(rows[:, None] < M) & (slots[None, :] < R), other=0.0)
            low_rank_mask = (slots[:, None] < R) & (cols[None, :] < N)
            b = tl.load(update_ptr + slots[:, None] * stride_um + cols[None, :] * stride_un,
                        mask=low_rank_mask, other=0.0)
            if RESIDUAL:
                low_rank_grad = tl.load(low_rank_grad_ptr + slots[:, None] * stride_lm + cols[None, :] * stride_ln,
                                        mask=low_rank_mask, other=0.0)
                # NOTE: N − φ∘R in fp32, rounded once to N's dtype for the dot, as the reference
                # forms it in N's dtype (φ itself stays fp32 here; the reference rounds it too).
                b = (b.to(tl.float32) - phi * low_rank_grad.to(tl.float32)).to(b.dtype)
            acc = tl.dot(a.to(b.dtype), b, acc, input_precision=PRECISION)
        else:                   # ΔW = N·Pᵀ: A[i, s] = N[i, s] (− φ_i·R[i, s]), B[s, j] = basis[j, idx[s]]
            low_rank_mask = (rows[:, None] < M) & (slots[None, :] < R)
            a = tl.load(update_ptr + rows.to(tl.int64)[:, None] * stride_um + slots[None, :] * stride_un,
                        mask=low_rank_mask, other=0.0)
            if RESIDUAL:
                low_rank_grad = tl.load(low_rank_grad_ptr + rows.to(tl.int64)[:, None] * stride_lm
                                        + slots[None, :] * stride_ln, mask=low_rank_mask, other=0.0)
                a = (a.to(tl.float32) - phi * low_rank_grad.to(tl.float32)).to(a.dtype)
            b = tl.load(basis_ptr + cols.to(tl.int64)[None, :] * stride_bk + basis_cols[:, None] * stride_br,
                        mask=(slots[:, None] < R) & (cols[None, :] < N), other=0.0)
            acc = tl.dot(a, b.to(a.dtype), acc, input_precision=PRECISION)
    in_bounds = (rows[:, None] < M) & (cols[None, :] < N)
    if RESIDUAL:
        grad = tl.load(grad_ptr + rows.to(tl.int64)[:, None] * stride_gm + cols[None, :] * stride_gn,
                       mask=in_bounds, other=0.0)
        # NOTE: φ∘G is added to the fp32 accumulator: ΔW is rounded nowhere (the reference's
        # same-dtype path rounds W after the GEMM and after the residual, its mixed path ΔW once).
        acc += phi * grad.to(tl.float32)
    tile = weight_ptr + rows.to(tl.int64)[:, None] * stride_wm + cols[None, :] * stride_wn
    weight = tl.load(tile, mask=in_bounds, other=0.0).to(tl.float32)
    # NOTE: one rounding to W's dtype (the reference rounds after the decay and after the update).
    weight = decay * weight - step * acc
    tl.store(tile, weight.to(weight_ptr.dtype.element_ty), mask=in_bounds)


def projected_weight_update_triton_(param: torch.Tensor, update: torch.Tensor, basis: torch.Tensor,
                                    indices: torch.Tensor | None, side: str, *, lr: float, scale: float,
                                    weight_decay: float, decay_before_update: bool,
                                    residual_grad: torch.Tensor | None = None,
                                    residual_low_rank_grad: torch.Tensor | None = None,
                                    residual_coefficients: torch.Tensor | None = None) -> None:
    """Same contract as :func:`.weight_update.projected_weight_update_`, fused into one kernel."""
    if side not in ("left", "right"):
        raise ValueError(f"Invalid side: {side!r} (expected 'left' or 'right')")
    m, n = param.shape
    rank = basis.shape[1] if indices is None else indices.numel()
    expected = (m, rank) if side == "right" else (rank, n)
    size = n if side == "right" else m
    if tuple(update.shape) != expected or basis.shape[0] != size:
        raise ValueError(f"update {tuple(update.shape)} and basis {tuple(basis.shape)} do not fit a "
                         f"{side} projection of a {m}×{n} weight at rank {rank}")
    residual = residual_operands(param, update, side, residual_grad, residual_low_rank_grad, residual_coefficients)
    check_launchable(param, update, basis, *(residual or ()))
    decay, step = update_coefficients(lr=lr, scale=scale, weight_decay=weight_decay,
                                      decay_before_update=decay_before_update)
    if residual is None:
        grad, low_rank_grad, coefficients = param, update, param        # unread placeholders
    else:
        grad, low_rank_grad, coefficients = residual
        coefficients = coefficients.reshape(-1).contiguous()

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]))

    _projected_weight_update_kernel[grid](
        param, update, basis, indices if indices is not None else basis, grad, low_rank_grad, coefficients,
        m, n, rank,
        param.stride(0), param.stride(1), update.stride(0), update.stride(1), basis.stride(0), basis.stride(1),
        grad.stride(0), grad.stride(1), low_rank_grad.stride(0), low_rank_grad.stride(1),
        decay, step,
        HAS_INDEX=indices is not None, BASIS_ON_LEFT=side == "left", RESIDUAL=residual is not None,
        PRECISION=dot_precision(update.dtype),
    )
