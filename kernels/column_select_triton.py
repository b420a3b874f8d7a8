"""Kernel 2: column-index selection without materialising ``S``, and the gather-GEMM projection, Triton.

Scores (math in :mod:`.column_select`). Both sides are one computation on ``A`` (``M×k``): ``A = G``
on the right, ``A = Gᵀ`` (a strided view) on the left, since ``(Cᵀ·G)[j, :] = (Gᵀ·C)[:, j]``.
Program ``(t, b)`` computes the tile ``(A·C)[rows of t, columns of b]`` in registers, reduces
``|·|`` or ``(·)²`` over its rows and stores one partial score per column in row ``t`` of a
``tiles×k`` buffer; a deterministic sum over the row tiles gives the scores. ``S`` (``M×k``) is
never written: the traffic is ``A``, ``C`` and ``tiles×k`` partials.

Projection (:func:`gather_project_triton`): ``R = A·C[:, idx]`` reading basis columns by index
(no copy of ``C[:, idx]``), output written through strides so the left side's ``R = (Gᵀ·C[:, idx])ᵀ``
lands directly in an ``r×n`` tensor. Both GEMMs accumulate in fp32; fp32 operands use TF32 when
torch's matmul setting allows it (:func:`.triton_support.dot_precision`).

NOTE: the basis is read through its strides; a column-major ``C`` (``C.T.contiguous().T``) makes
the gathered columns contiguous in memory, and the DCT projector passes one.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .column_select import top_columns
from .triton_support import autotune_options, check_launchable, dot_precision

_GEMM_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
]
# Rows of the partial-score buffer: enough for the smallest row tile of any config.
_MIN_BLOCK_M = min(config.kwargs["BLOCK_M"] for config in _GEMM_CONFIGS)


# NOTE: configs with taller row tiles fill fewer rows of the partial buffer, so rows written while
# timing another config would linger into the sum: the autotuner zeroes the buffer before every run
# (reset_to_zero), and the launcher allocates it zeroed.
@triton.autotune(configs=_GEMM_CONFIGS, key=["M", "K", "SQUARE"], reset_to_zero=["partial_ptr"],
                 **autotune_options())
@triton.jit
def _column_scores_kernel(
    a_ptr, basis_ptr, partial_ptr, M, K,
    stride_am, stride_ak, stride_bk, stride_bn,
    SQUARE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    inner = tl.arange(0, BLOCK_K)
    a_rows = a_ptr + rows.to(tl.int64)[:, None] * stride_am
    b_cols = basis_ptr + cols.to(tl.int64)[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        k = start + inner
        a = tl.load(a_rows + k[None, :] * stride_ak, mask=(rows[:, None] < M) & (k[None, :] < K), other=0.0)
        b = tl.load(b_cols + k[:, None] * stride_bk, mask=(k[:, None] < K) & (cols[None, :] < K), other=0.0)
        acc = tl.dot(a, b.to(a.dtype), acc, input_precision=PRECISION)
    # Masked rows loaded zeros, so they add nothing to the column sums.
    score = acc * acc if SQUARE else tl.abs(acc)
    tl.store(partial_ptr + pid_m * K + cols, tl.sum(score, axis=0), mask=cols < K)


@triton.autotune(configs=_GEMM_CONFIGS, key=["M", "K", "R"], **autotune_options())
@triton.jit
def _gather_matmul_kernel(
    a_ptr, basis_ptr, index_ptr, out_ptr, M, K, R,
    stride_am, stride_ak, stride_bk, stride_bn, stride_om, stride_on,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    slots = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    inner = tl.arange(0, BLOCK_K)
    columns = tl.load(index_ptr + slots, mask=slots < R, other=0)
    a_rows = a_ptr + rows.to(tl.int64)[:, None] * stride_am
    b_cols = basis_ptr + columns.to(tl.int64)[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        k = start + inner
        a = tl.load(a_rows + k[None, :] * stride_ak, mask=(rows[:, None] < M) & (k[None, :] < K), other=0.0)
        b = tl.load(b_cols + k[:, None] * stride_bk, mask=(k[:, None] < K) & (slots[None, :] < R), other=0.0)
        acc = tl.dot(a, b.to(a.dtype), acc, input_precision=PRECISION)
    out = out_ptr + rows.to(tl.int64)[:, None] * stride_om + slots[None, :] * stride_on
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=(rows[:, None] < M) & (slots[None, :] < R))


def _side_operand(grad: torch.Tensor, side: str) -> torch.Tensor:
    """``A``: ``G`` (right) or the view ``Gᵀ`` (left)."""
    if side not in ("left", "right"):
        raise ValueError(f"Invalid side: {side!r} (expected 'left' or 'right')")
    return grad if side == "right" else grad.T


def _check_basis(a: torch.Tensor, basis: torch.Tensor) -> None:
    if basis.ndim != 2 or basis.shape[0] != a.shape[1]:
        raise ValueError(f"basis of shape {tuple(basis.shape)} does not match the compressed size {a.shape[1]}")


def column_scores_triton(grad: torch.Tensor, basis: torch.Tensor, side: str, norm: str) -> torch.Tensor:
    """fp32 scores of the ``k`` columns of the square ``basis`` (``l1`` or ``l2``, see module doc)."""
    a = _side_operand(grad, side)
    _check_basis(a, basis)
    if basis.shape[1] != basis.shape[0]:
        raise ValueError(f"scores need the square basis, got shape {tuple(basis.shape)}")
    check_launchable(grad, basis)
    big_m, k = a.shape
    partials = torch.zeros((max(triton.cdiv(big_m, _MIN_BLOCK_M), 1), k), dtype=torch.float32, device=grad.device)

    def grid(meta):
        return (triton.cdiv(big_m, meta["BLOCK_M"]), triton.cdiv(k, meta["BLOCK_N"]))

    _column_scores_kernel[grid](
        a, basis, partials, big_m, k, a.stride(0), a.stride(1), basis.stride(0), basis.stride(1),
        SQUARE=norm == "l2", PRECISION=dot_precision(grad.dtype),
    )
    return partials.sum(0)


def gather_project_triton(grad: torch.Tensor, basis: torch.Tensor, indices: torch.Tensor, side: str) -> torch.Tensor:
    """``R = G·C[:, idx]`` (right, ``m×r``) or ``C[:, idx]ᵀ·G`` (left, ``r×n``) in ``grad``'s dtype,
    gathering the basis columns by index."""
    a = _side_operand(grad, side)
    _check_basis(a, basis)
    check_launchable(grad, basis)
    big_m, k = a.shape
    rank = indices.numel()
    out = torch.empty((big_m, rank) if side == "right" else (rank, big_m), dtype=grad.dtype, device=grad.device)
    out_view = out if side == "right" else out.T

    def grid(meta):
        return (triton.cdiv(big_m, meta["BLOCK_M"]), triton.cdiv(rank, meta["BLOCK_N"]))

    _gather_matmul_kernel[grid](
        a, basis, indices, out_view, big_m, k, rank,
        a.stride(0), a.stride(1), basis.stride(0), basis.stride(1), out_view.stride(0), out_view.stride(1),
        PRECISION=dot_precision(grad.dtype),
    )
    return out


def select_columns_triton(grad: torch.Tensor, basis: torch.Tensor, rank: int, side: str, norm: str,
                          project: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(idx, R)`` as :func:`.column_select.select_columns`: fused scores, the same stable top-r,
    and, when ``project``, ``R`` by the gather-GEMM."""
    indices = top_columns(column_scores_triton(grad, basis, side, norm), rank)
    return indices, gather_project_triton(grad, basis, indices, side) if project else None
