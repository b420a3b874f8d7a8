"""Column-index selection against a fixed orthonormal basis ``C`` (``k×k``), PyTorch reference.

The score of candidate column ``j`` measures how much of the gradient ``G`` (``m×n``) it captures::

    right (k = n):  S = G·C       score_j = Σ_i |S[i, j]|^p
    left  (k = m):  S = Cᵀ·G      score_j = Σ_i |S[j, i]|^p        (p = 1: "l1", p = 2: "l2")

(``l2`` ranks by the squared norm: same order as the norm.) The ``r`` best indices are kept sorted by
decreasing score, ties to the lower index (stable sort), so slot ``i`` holds the ``i``-th best
column. The projected gradient of the selection is ``R = S[:, idx]`` (right) or ``S[idx, :]``
(left). This reference materialises ``S``; the Triton kernels (:mod:`.column_select_triton`) never do.
"""
from __future__ import annotations

import torch

SCORE_NORMS = ("l1", "l2")


def scores_from_coefficients(coefficients: torch.Tensor, side: str, norm: str) -> torch.Tensor:
    """fp32 scores of every candidate from ``S`` (``G·C`` or ``Cᵀ·G``)."""
    reduce_dim = 0 if side == "right" else 1
    if norm == "l1":
        return coefficients.abs().sum(dim=reduce_dim, dtype=torch.float32)
    return coefficients.float().square().sum(dim=reduce_dim)


def top_columns(scores: torch.Tensor, rank: int) -> torch.Tensor:
    """The ``rank`` indices of the largest scores, by decreasing score, ties to the lower index."""
    return torch.sort(scores, descending=True, stable=True).indices[:rank].clone()


def select_columns(grad: torch.Tensor, basis: torch.Tensor, rank: int, side: str, norm: str,
                   project: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(idx, R)``: the selected indices and, when ``project``, ``R`` in ``grad``'s dtype."""
    coefficients = grad @ basis if side == "right" else basis.T @ grad
    indices = top_columns(scores_from_coefficients(coefficients, side, norm), rank)
    if not project:
        return indices, None
    return indices, coefficients.index_select(1 if side == "right" else 0, indices)


def gather_project(grad: torch.Tensor, basis: torch.Tensor, indices: torch.Tensor | None,
                   side: str) -> torch.Tensor:
    """``R = G·P`` (right) or ``Pᵀ·G`` (left) with ``P = basis[:, indices]`` (``basis`` itself when
    ``indices`` is None), in ``grad``'s dtype."""
    p = basis if indices is None else basis.index_select(1, indices)
    return grad @ p if side == "right" else p.T @ grad
