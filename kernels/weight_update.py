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

Scaled residual (Fira, arXiv 2410.01623; the coefficients ``φ`` and their norm-growth limiter are
computed by the caller). With the gradient ``G`` (``m×n``), its projection ``R`` (shaped like
``N``) and the already-limited coefficients ``φ`` (one per row of ``G`` on the right, per column
on the left), the gradient outside the subspace, ``G − R·Pᵀ`` (right), is added back, scaled::

    right:  ΔW = N·Pᵀ + φ∘(G − R·Pᵀ) = (N − φ∘R)·Pᵀ + φ∘G      φ∘X[i, j] = φ_i·X[i, j]
    left:   ΔW = P·N + φ∘(G − P·R)  = P·(N − φ∘R) + φ∘G       φ∘X[i, j] = φ_j·X[i, j]

applied as ``W ← a·W − b·ΔW`` again. When ``W``, ``G`` and ``N`` share a dtype that is one
``addmm_`` and one ``addcmul_`` on ``W`` (no ``m×n`` temporary); otherwise ``ΔW`` is formed in
``N``'s dtype and rounded once. ``N − φ∘R`` is computed in ``N``'s dtype.
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


def residual_operands(param: torch.Tensor, update: torch.Tensor, side: str, grad: torch.Tensor | None,
                      low_rank_grad: torch.Tensor | None,
                      coefficients: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """``None`` without a residual, else ``(G, R, φ)`` checked against ``W`` (``param``, ``m×n``)
    and ``N`` (``update``), with ``φ`` shaped to broadcast against ``G``: ``m×1`` (right) or
    ``1×n`` (left). ``φ`` may come so shaped or 1-D (``m`` or ``n`` values)."""
    given = {"residual_grad": grad, "residual_low_rank_grad": low_rank_grad, "residual_coefficients": coefficients}
    if all(value is None for value in given.values()):
        return None
    missing = [name for name, value in given.items() if value is None]
    if missing:
        raise ValueError(f"the scaled residual needs residual_grad, residual_low_rank_grad and "
                         f"residual_coefficients; missing {', '.join(missing)}")
    if grad.shape != param.shape or low_rank_grad.shape != update.shape:
        raise ValueError(f"residual_grad {tuple(grad.shape)} and residual_low_rank_grad {tuple(low_rank_grad.shape)} "
                         f"must have the shapes of the weight {tuple(param.shape)} and of the update "
                         f"{tuple(update.shape)}")
    m, n = param.shape
    shape = (m, 1) if side == "right" else (1, n)
    if tuple(coefficients.shape) not in (shape, (shape[0] * shape[1],)):
        raise ValueError(f"residual_coefficients of shape {tuple(coefficients.shape)} do not scale the "
                         f"{'rows' if side == 'right' else 'columns'} of a {m}×{n} gradient (expected {shape})")
    return grad, low_rank_grad, coefficients.reshape(shape)


def projected_weight_update_(param: torch.Tensor, update: torch.Tensor, basis: torch.Tensor,
                             indices: torch.Tensor | None, side: str, *, lr: float, scale: float,
                             weight_decay: float, decay_before_update: bool,
                             residual_grad: torch.Tensor | None = None,
                             residual_low_rank_grad: torch.Tensor | None = None,
                             residual_coefficients: torch.Tensor | None = None) -> None:
    """Apply one projected AdamW update to ``param`` in place (module doc), with the scaled
    residual when ``residual_grad`` (``G``), ``residual_low_rank_grad`` (``R``) and
    ``residual_coefficients`` (``φ``, see :func:`residual_operands`) are given."""
    p = basis if indices is None else basis.index_select(1, indices)
    residual = residual_operands(param, update, side, residual_grad, residual_low_rank_grad, residual_coefficients)
    if residual is not None:
        a, b = update_coefficients(lr=lr, scale=scale, weight_decay=weight_decay,
                                   decay_before_update=decay_before_update)
        _residual_weight_update_(param, update, p, side, *residual, a=a, b=b)
        return
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


def _residual_weight_update_(param: torch.Tensor, update: torch.Tensor, p: torch.Tensor, side: str,
                             grad: torch.Tensor, low_rank_grad: torch.Tensor, coefficients: torch.Tensor, *,
                             a: float, b: float) -> None:
    """``W ← a·W − b·ΔW`` with the residual ``ΔW`` of the module doc; ``p`` is ``P`` (``k×r``),
    ``coefficients`` ``φ`` shaped ``m×1`` (right) or ``1×n`` (left)."""
    work = update.dtype
    phi = coefficients.to(work)
    core = torch.addcmul(update, phi, low_rank_grad.to(work), value=-1.0)
    first, second = (core, p.to(work).T) if side == "right" else (p.to(work), core)
    if param.dtype == grad.dtype == work:
        param.addmm_(first, second, beta=a, alpha=-b)
        param.addcmul_(phi, grad, value=-b)
        return
    delta = first @ second
    delta.addcmul_(phi, grad.to(work))
    if a != 1.0:
        param.mul_(a)
    param.add_(delta.to(param.dtype), alpha=-b)
