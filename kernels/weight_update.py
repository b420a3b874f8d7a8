"""Back-projection and weight update of a projected AdamW step, PyTorch reference.

With ``P = basis[:, idx]`` (a column subset of a fixed basis, the DCT projection) or ``P = basis``
(``idx`` None: a dense projection, GaLore), the normalized low-rank update ``N`` goes back to the
weight's shape and is applied with decoupled weight decay ``λ``, learning rate ``η`` and scale
``α``::

    ΔW = N·Pᵀ (right)   or   P·N (left)
    decay before the update (torch.optim.AdamW):   W ← (1 − ηλ)·W − ηα·ΔW
    decay after the update (Hugging Face AdamW):   W ← W − ηα·ΔW;  W ← W − ηλ·W

Both are ``W ← a·W − b·ΔW`` (:func:`update_coefficients`). When ``W``, ``N`` and ``P`` share a
dtype that is one GEMM with ``beta = a`` (``addmm_``: no ``m×n`` temporary, one pass over ``W``);
otherwise (bf16 weights with fp32 moments) ``ΔW`` is computed in ``N``'s dtype and rounded once.
"""
from __future__ import annotations

import torch


def back_project(update: torch.Tensor, basis: torch.Tensor, indices: torch.Tensor | None,
                 side: str) -> torch.Tensor:
    """``ΔW = N·Pᵀ`` (right) or ``P·N`` (left), in ``update``'s dtype."""
    p = basis if indices is None else basis.index_select(1, indices)
    return update @ p.T if side == "right" else p @ update


def update_coefficients(*, lr: float, scale: float, weight_decay: float,
                        decay_before_update: bool) -> tuple[float, float]:
    """``(a, b)`` of ``W ← a·W − b·ΔW``: ``a = 1 − ηλ`` and ``b = ηα``, times ``a`` when the decay
    comes after the update (``(1 − ηλ)·(W − ηα·ΔW)``)."""
    decay = 1.0 - lr * weight_decay
    step = lr * scale
    return decay, step if decay_before_update else decay * step


def projected_weight_update_(param: torch.Tensor, update: torch.Tensor, basis: torch.Tensor,
                             indices: torch.Tensor | None, side: str, *, lr: float, scale: float,
                             weight_decay: float, decay_before_update: bool) -> None:
    """Apply one projected AdamW update to ``param`` in place (module doc)."""
    p = basis if indices is None else basis.index_select(1, indices)
    if param.dtype == update.dtype == p.dtype:
        a, b = update_coefficients(lr=lr, scale=scale, weight_decay=weight_decay,
                                   decay_before_update=decay_before_update)
        first, second = (update, p.T) if side == "right" else (p, update)
        param.addmm_(first, second, beta=a, alpha=-b)
        return
    if weight_decay and decay_before_update:
        param.mul_(1.0 - lr * weight_decay)
    delta = back_project(update, p, None, side)
    param.add_(delta.to(param.dtype), alpha=-lr * scale)
    if weight_decay and not decay_before_update:
        param.add_(param, alpha=-lr * weight_decay)
