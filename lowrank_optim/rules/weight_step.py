r"""``W ← a·W − b·ΔW`` from a projected step's ``N``: the weight update rules share.

``ΔW = N·Pᵀ`` (right) or ``P·N`` (left), never materialised on the fused paths; with the scaled
residual (Fira, :mod:`lowrank_optim.residual`) ``ΔW = (N − c·φ∘R)·Pᵀ + c·φ∘G``. ``a, b`` fold the
learning rate, ``scale`` and decoupled weight decay in the group's AdamW form
(:func:`lowrank_optim.kernels.weight_update.update_coefficients`). It runs on the step's backend
(:func:`lowrank_optim.kernels.dispatch.projected_weight_update_`: the PyTorch reference, or the
Triton back-projection GEMM with the update in its epilogue) or, for a weight whose update is
rounded stochastically (an int8 weight, a bf16 one with ``bf16_stochastic_round``), by forming
``ΔW`` once, full-size in fp32 (one layer's temporary), and writing it with
:func:`lowrank_optim.weight_store.stochastic_weight_update_`.
"""
from __future__ import annotations

import torch

from ..kernels.dispatch import projected_weight_update_
from ..kernels.weight_update import back_project, update_coefficients
from ..residual import residual_coefficients
from ..weight_store import stochastic_weight_update_
from .base import AdamHyperparameters, ProjectedStep


def apply_projected_update_(step: ProjectedStep, normalized: torch.Tensor, hyper: AdamHyperparameters, *,
                            residual: bool) -> None:
    """Update ``step.weight`` with ``ΔW`` from ``N`` (``normalized``), the scaled residual
    included when ``residual`` (its limiter's norm kept in ``step.state["residual_norm"]``)."""
    basis, indices = step.basis_columns()
    if normalized.dtype != basis.dtype:          # quantized moments give an fp32 N
        normalized = normalized.to(basis.dtype)
    phi = None
    if residual:
        phi, step.state["residual_norm"] = residual_coefficients(
            step.grad, step.low_rank_grad, normalized, step.side, step.state.get("residual_norm"), step.sharding)
    coefficients = dict(lr=hyper.lr, scale=hyper.scale, weight_decay=hyper.weight_decay,
                        decay_before_update=hyper.form.decay_before_update)
    if step.generator is not None:
        _stochastic_weight_update_(step, normalized, basis, indices, phi, update_coefficients(**coefficients))
        return
    projected_weight_update_(step.backend, step.weight, normalized, basis, indices, step.side,
                             **coefficients, residual_grad=None if phi is None else step.grad,
                             residual_low_rank_grad=None if phi is None else step.low_rank_grad,
                             residual_coefficients=phi)


def _stochastic_weight_update_(step: ProjectedStep, normalized: torch.Tensor, basis: torch.Tensor,
                               indices: torch.Tensor | None, phi: torch.Tensor | None,
                               coefficients: tuple[float, float]) -> None:
    """``W ← SR(a·W − b·ΔW)`` with ``ΔW`` (residual included when ``phi``) formed in fp32."""
    a, b = coefficients
    core = normalized.float() if phi is None else normalized.float() - phi.float() * step.low_rank_grad.float()
    delta = back_project(core, basis.float(), indices, step.side)
    if phi is not None:
        delta.addcmul_(phi.float(), step.grad.float())
    stochastic_weight_update_(step.weight, delta, a=a, b=b, generator=step.generator, backend=step.backend)
