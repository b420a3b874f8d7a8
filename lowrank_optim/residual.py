"""The scaled residual (Fira, arXiv 2410.01623): the gradient outside the subspace, Adam-scaled.

A projected step discards ``G − P-part of G``. With ``residual="scaled"`` it is added back, scaled
per row (right side, ``R = G·P`` is ``m×r``) or per column (left side) by how much Adam rescales
the projected gradient there, ``φ_i = ‖N_i‖ / ‖R_i‖``::

    ΔW = N·Pᵀ + c·φ ∘ (G − R·Pᵀ) = (N − c·φ∘R)·Pᵀ + c·φ∘G        (right; left: P·(…) transposed)

``c`` is Fira's norm-growth limiter: with ``S_t = φ∘(G − R·Pᵀ)``, ``c = min(1, γ·‖S_{t−1}‖/‖S_t‖)``
(``γ = 1.01``) and ``‖S_{t−1}‖`` is remembered after limiting. Since ``P`` has orthonormal columns,
``‖S_t‖² = Σ_i φ_i²·(‖G_i‖² − ‖R_i‖²)``: no ``m×n`` residual is formed. The state is one scalar per
weight (``residual_norm``). The weight update itself, ``W ← a·W − b·ΔW`` with this ``ΔW``, is
:func:`lowrank_optim.kernels.dispatch.projected_weight_update_` with the residual arguments (on
Triton fused into the back-projection's epilogue, one more read of ``G``).
"""
from __future__ import annotations

import torch

from .channels import along_channels, channel_squared_norms
from .sharding import Sharding, summed

GROWTH_LIMIT = 1.01
RESIDUALS = ("none", "scaled")


def residual_coefficients(grad: torch.Tensor, low_rank_grad: torch.Tensor, normalized: torch.Tensor,
                          side: str, previous_norm: torch.Tensor | None,
                          sharding: Sharding | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(c·φ, ‖S_t‖ after limiting)``: the coefficients shaped to broadcast against ``G``
    (``m×1`` right, ``1×n`` left) and the limiter's new norm, from the one remembered at the last
    step (``previous_norm``, None on the first). On an FSDP2 shard (rows on the right, columns on
    the left: ``φ`` is local) ``‖S_t‖²`` is summed over the shards, one scalar all-reduce."""
    inside = channel_squared_norms(low_rank_grad, side)
    phi = channel_squared_norms(normalized, side).div_(inside.clamp_min(1e-30)).sqrt_()
    outside = (channel_squared_norms(grad, side) - inside).clamp_min(0)
    squared_norm = (phi.square() * outside).sum()
    norm = summed(squared_norm, sharding).sqrt()
    if previous_norm is None:
        limit = torch.ones((), device=grad.device)
    else:
        ceiling = GROWTH_LIMIT * previous_norm
        limit = torch.where((previous_norm > 0) & (norm > ceiling), ceiling / norm.clamp_min(1e-30), 1.0)
    coefficients = phi * limit
    return along_channels(coefficients, side), norm * limit
