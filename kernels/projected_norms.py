"""The projection ``R`` and the channel norms of ``G`` in one pass over ``G``, PyTorch reference.

APOLLO's norm-growth limiter reads ``‖G_c‖²`` (per channel, or ``‖G‖²``) at every step, and every
ordinary step projects ``G`` too: two reads of an ``m×n`` gradient that is usually far larger than
the CPU's caches. On the CPU both are taken block by block over the rows of ``G`` (contiguous), so
each block is read from memory once and again from cache::

    right (R = G·P, m×r):   R[i0:i1] = G[i0:i1]·P
    left  (R = Pᵀ·G, r×n):  R = Σ_blocks P[i0:i1]ᵀ·G[i0:i1]      (accumulated in at least fp32)

and the squared norms of each block (per row, per column summed over the blocks, or the block's
``‖·‖²`` summed). The right side's ``R`` and row norms are the sums they are without blocks; the left
side's ``R``, its column norms and ``‖G‖²`` add the blocks' partial sums (a different association
of the same sums). Off the CPU (many small launches would cost more than the second read) it is
the two calls. Self-contained apart from the two functions it blocks.
"""
from __future__ import annotations

import torch

from .channel_scaling import channel_squared_norms
from .column_select import gather_project

# NOTE: 1 MiB of G per block: in a core's L2 (512 KiB–2 MiB on current x86) between its norm and its
# product. Measured on a 2-core EPYC (one thread, caches cold), 4096×1024 fp32, rank 1: about 1.1 ms for
# both against 1.4–1.6 ms unblocked.
BLOCK_BYTES = 1 << 20


def project_with_squared_norms(grad: torch.Tensor, basis: torch.Tensor, indices: torch.Tensor | None, side: str,
                               norm_side: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(R, squares)``: ``R = G·P`` (right) or ``Pᵀ·G`` (left) with ``P = basis[:, indices]``
    (``basis`` when ``indices`` is None), in ``grad``'s dtype, and
    ``channel_squared_norms(grad, norm_side)`` (``norm_side`` the projection's ``side``, or None)."""
    if norm_side not in (side, None):
        raise ValueError(f"Invalid norm_side: {norm_side!r} (expected the projection's side {side!r} or None)")
    m, n = grad.shape
    block = max(1, BLOCK_BYTES // max(1, n * grad.element_size()))
    if grad.device.type != "cpu" or block >= m or not grad.is_contiguous():
        return gather_project(grad, basis, indices, side), channel_squared_norms(grad, norm_side)
    p = basis if indices is None else basis.index_select(1, indices)
    if side == "right":
        low_rank = grad.new_empty((m, p.shape[1]))
    else:
        low_rank = torch.zeros((p.shape[1], n), dtype=torch.promote_types(grad.dtype, torch.float32),
                               device=grad.device)
    squares = []
    for start in range(0, m, block):
        part = grad[start:start + block]
        squares.append(channel_squared_norms(part, norm_side))     # first: it streams the block in
        if side == "right":
            torch.mm(part, p, out=low_rank[start:start + block])
        else:
            low_rank.addmm_(p[start:start + block].T.to(low_rank.dtype), part.to(low_rank.dtype))
    if norm_side == "right":
        total = torch.cat(squares)
    else:
        total = torch.stack(squares).sum(dim=0)
    return low_rank.to(grad.dtype), total
