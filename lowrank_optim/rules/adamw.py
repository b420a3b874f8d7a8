r"""Projected AdamW: the rule of ``GaLoreAdamW`` and ``DCTProjAdam`` (``update_rule="adamw"``).

For a weight ``W`` (``m×n``), its gradient ``G``, the projected gradient ``R`` and ``P``:

.. math::
    m &\leftarrow \beta_1 m + (1-\beta_1) R, \qquad v \leftarrow \beta_2 v + (1-\beta_2) R^2 \\
    N &= \frac{m / (1-\beta_1^t)}{\sqrt{v / (1-\beta_2^t)} + \epsilon_{\text{eff}}} \\
    \Delta W &= N P^\top \text{ (right) or } P N \text{ (left)}, \quad\text{plus, with the scaled residual,}\quad
      c\,\varphi \circ (G - R P^\top) \\
    W &\leftarrow a\,W - b\,\Delta W

where ``a, b`` fold learning rate ``η``, ``scale`` ``α`` and decoupled weight decay ``λ`` in either
AdamW form (:func:`lowrank_optim.kernels.weight_update.update_coefficients`; ``ε_eff`` per
:class:`~lowrank_optim.adam_form.AdamForm`), ``t`` is the step count (a per-slot tensor for slot
bias correction) and ``c·φ`` the residual's Adam scaling (:mod:`lowrank_optim.residual`, the
group's ``residual="scaled"``; its limiter keeps ``residual_norm`` in the state). The moments are
float or 8/4-bit (:class:`~lowrank_optim.moments.Moments`), stepped in one fused pass that also
gives ``N``; the weight update is :func:`apply_projected_update_`.
"""
from __future__ import annotations

from ..adam_form import bias_corrections
from .base import AdamHyperparameters, ProjectedStep, UpdateRule
from .weight_step import apply_projected_update_


class AdamWRule(UpdateRule):
    """Adam's moments of ``R``, back-projected (module doc)."""

    name = "adamw"

    def full_gradient_use(self, group: dict) -> tuple[str, str] | None:
        return ("residual='scaled'", "pass residual='none'") if group["residual"] == "scaled" else None

    def state_bytes(self, group: dict) -> int:
        return 4 if group["residual"] == "scaled" else 0

    def update(self, step: ProjectedStep, hyper: AdamHyperparameters, group: dict) -> None:
        bc1, bc2 = bias_corrections(step.step, hyper.beta1, hyper.beta2) if hyper.correct_bias else (1.0, 1.0)
        normalized = step.moments.step(step.backend, step.low_rank_grad, beta1=hyper.beta1, beta2=hyper.beta2,
                                       eps=hyper.form.effective_eps(hyper.eps, bc2), bias_correction1=bc1,
                                       bias_correction2=bc2, step=step.state["step"], source_slots=step.source_slots)
        apply_projected_update_(step, normalized, hyper, residual=group["residual"] == "scaled")
