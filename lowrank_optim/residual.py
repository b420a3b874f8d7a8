"""The scaled residual (Fira, arXiv 2410.01623): the gradient outside the subspace, Adam-scaled.

A projected step discards ``G − P-part of G``. With ``residual="scaled"`` it is added back, scaled
per row (right side, ``R = G·P`` is ``m×r``) or per column (left side) by how much Adam rescales
the projected gradient there, ``φ_i = ‖N_i‖ / ‖R_i‖``::

    ΔW = N·Pᵀ + c·φ ∘ (G − R·Pᵀ) = (N − c·φ∘R)·Pᵀ + c·φ∘G        (right; left: P·(…) transposed)

``c`` is Fira's norm-growth limiter: with ``S_t = φ∘(G − R·Pᵀ)``, ``c = min(1, γ·‖S_{t−1}‖/‖S_t‖)``
(``γ = 1.01``) and ``‖S_{t−1}‖`` is remembered after limiting. Since ``P`` has orthonormal columns,
``‖S_t‖² = Σ_i φ_i²·(‖G_i‖² − ‖R_i‖²)``: no ``m×n`` residual is formed. The state is one scalar per
weight (``residual_norm``); the update costs one extra element-wise pass over ``W``.
"""
from __future__ import annotations

import torch

from .sharding import Sharding, summed

GROWTH_LIMIT = 1.01
RESIDUALS = ("none", "scaled")


def residual_coefficients(grad: torch.Tensor, low_rank_grad: torch.Tensor, normalized: torch.Tensor,
                          side: str, state: dict, sharding: Sharding | None = None) -> torch.Tensor:
    """``c·φ`` shaped to broadcast against ``G`` (``m×1`` right, ``1×n`` left); updates the
    limiter's ``state["residual_norm"]``. On an FSDP2 shard (rows on the right, columns on the
    left: ``φ`` is local) ``‖S_t‖²`` is summed over the shards, one scalar all-reduce."""
    slot_dim = 1 if side == "right" else 0
    inside = _squared_norms(low_rank_grad, slot_dim)
    phi = _squared_norms(normalized, slot_dim).div_(inside.clamp_min(1e-30)).sqrt_()
    outside = (_squared_norms(grad, slot_dim) - inside).clamp_min(0)
    squared_norm = (phi.square() * outside).sum()
    norm = summed(squared_norm, sharding).sqrt()
    previous = state.get("residual_norm")
    if previous is None:
        limit = torch.ones((), device=grad.device)
    else:
        ceiling = GROWTH_LIMIT * previous
        limit = torch.where((previous > 0) & (norm > ceiling), ceiling / norm.clamp_min(1e-30), 1.0)
    state["residual_norm"] = norm * limit
    coefficients = phi * limit
    return coefficients.view(-1, 1) if side == "right" else coefficients.view(1, -1)


def _squared_norms(matrix: torch.Tensor, dim: int) -> torch.Tensor:
    """``Σ_dim matrix²`` in at least fp32: a fused norm along contiguous rows, a sum of squares
    across rows (where the strided norm reduction is several times slower on CPU)."""
    dtype = torch.promote_types(matrix.dtype, torch.float32)
    if dim == matrix.ndim - 1 and matrix.is_contiguous():
        return torch.linalg.vector_norm(matrix, dim=dim, dtype=dtype).square()
    return matrix.to(dtype).square().sum(dim=dim)


def residual_weight_update_(param: torch.Tensor, grad: torch.Tensor, low_rank_grad: torch.Tensor,
                            normalized: torch.Tensor, basis: torch.Tensor, coefficients: torch.Tensor,
                            side: str, *, a: float, b: float) -> None:
    """``W ← a·W − b·ΔW`` with the residual ``ΔW`` of the module doc; ``basis`` is ``P`` (k×r).

    When ``W``, ``G`` and ``N`` share a dtype: one ``addmm_`` and one ``addcmul_`` on ``W``, no
    ``m×n`` temporary; otherwise ``ΔW`` is formed in ``N``'s dtype and rounded once."""
    work = normalized.dtype
    core = torch.addcmul(normalized, coefficients.to(work), low_rank_grad.to(work), value=-1.0)
    first, second = (core, basis.to(work).T) if side == "right" else (basis.to(work), core)
    if param.dtype == grad.dtype == work:
        param.addmm_(first, second, beta=a, alpha=-b)
        param.addcmul_(coefficients.to(work), grad, value=-b)
        return
    delta = first @ second
    delta.addcmul_(coefficients.to(work), grad.to(work))
    if a != 1.0:
        param.mul_(a)
    param.add_(delta.to(param.dtype), alpha=-b)
