r"""Projected Adam-atan2 (``update_rule="adam_atan2"``): Adam's ``ε`` replaced by ``atan2``.

Everett et al., "Scaling Exponents Across Parameterizations and Optimizers" (ICML 2024, arXiv
2407.05872) replace ``m̂ / (√v̂ + ε)`` by ``atan2(m̂, √v̂)``: no ``ε`` to tune, invariant to the
gradient's scale, bounded by ``π/2``, and ``≈ m̂/√v̂`` where ``|m̂| ≪ √v̂``. Here it acts on the
projected moments, with everything else as :mod:`.adamw`:

.. math::
    m &\leftarrow \beta_1 m + (1-\beta_1) R, \qquad v \leftarrow \beta_2 v + (1-\beta_2) R^2 \\
    N &= \operatorname{atan2}\!\big(m/(1-\beta_1^t),\ \sqrt{v/(1-\beta_2^t)}\big) \\
    W &\leftarrow a\,W - b\,N P^\top \quad\text{(plus the scaled residual with } \texttt{residual="scaled"})

The group's ``eps`` is not used. The paper's scaling constants of the two arguments are not
applied (``scale`` multiplies the update). The moments go through the moments protocol
(:meth:`~lowrank_optim.moments.Moments.load` / ``store``, the step's gradient and count passed to
``store`` so that a 4-bit ``v`` is written with the fused step's stochastic rounding), so float and
8/4-bit moments both work, on PyTorch; the weight update runs on the parameter's backend
(:func:`.weight_step.apply_projected_update_`).
"""
from __future__ import annotations

import torch

from ..adam_form import bias_corrections
from .adamw import AdamWRule
from .base import AdamHyperparameters, ProjectedStep
from .weight_step import apply_projected_update_


class AdamAtan2Rule(AdamWRule):
    """Adam-atan2 on the projected moments (module doc): :class:`~.adamw.AdamWRule` with another
    ``N``, so the same residual, state and full-gradient use."""

    name = "adam_atan2"

    def update(self, step: ProjectedStep, hyper: AdamHyperparameters, group: dict) -> None:
        if step.source_slots is not None:
            step.moments.remap_slots(step.source_slots)
        exp_avg, exp_avg_sq = step.moments.load()
        grad = step.low_rank_grad.to(exp_avg.dtype)
        # the fused step's expressions, so that stored moments are those an adamw step stores
        exp_avg.mul_(hyper.beta1).add_(grad * (1.0 - hyper.beta1))
        exp_avg_sq.mul_(hyper.beta2).add_((grad * grad) * (1.0 - hyper.beta2))
        step.moments.store(exp_avg, exp_avg_sq, grad=grad, step=step.state["step"])
        bc1, bc2 = bias_corrections(step.step, hyper.beta1, hyper.beta2) if hyper.correct_bias else (1.0, 1.0)
        normalized = torch.atan2(exp_avg / bc1, (exp_avg_sq / bc2).sqrt())
        apply_projected_update_(step, normalized, hyper, residual=group["residual"] == "scaled")
