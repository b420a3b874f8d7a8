r"""APOLLO (``update_rule="apollo"``): Adam's moments in a projection only *scale* the full gradient.

Zhu et al., "APOLLO: SGD-like Memory, AdamW-level Performance" (MLSys 2025, arXiv 2412.05270), in
apollo-torch 1.0.3's conventions (``experiments/results/APOLLO_DIFFERENCES.md`` lists every
difference with the paper and the peers). For a weight ``W`` (``m×n``), its gradient ``G`` and the
projected gradient ``R``:

.. math::
    m &\leftarrow \beta_1 m + (1-\beta_1) R, \qquad v \leftarrow \beta_2 v + (1-\beta_2) R^2,
    \qquad \tilde N = m / (\sqrt v + \epsilon) \\
    s_c &= \frac{\lVert \tilde N_c \rVert}{\lVert R_c \rVert + 10^{-8}} \ \text{per channel } c
        \ (\texttt{scale\_type="channel"}), \qquad
    s = \frac{\lVert \tilde N \rVert}{\lVert R \rVert + 10^{-8}} \ (\texttt{"tensor"}) \\
    U &= \ell \cdot (s \circ G), \qquad
    \ell = \min\!\big(1,\ \gamma / (\lVert s\circ G\rVert / (\lVert U_{t-1}\rVert + 10^{-8}))\big) \\
    W &\leftarrow (1-\eta\lambda)\,\big(W - \eta_t \sqrt{\alpha}\, U\big), \qquad
    \eta_t = \eta \sqrt{1-\beta_2^t} / (1-\beta_1^t)

Channels are the dimension the projection keeps (:mod:`lowrank_optim.channels`): rows of ``G`` on
the right side, columns on the left. ``ℓ`` is Fira's norm-growth limiter (``γ`` =
``norm_growth_limit``, None: off); a weight's first step only records ``‖U‖`` (``limiter_norm`` in
its state, a 0-d tensor: nothing is read back to the host). ``‖s∘G‖`` comes from the channel norms
of ``G`` (``Σ_c s_c²‖G_c‖²``), so the product is never formed before the weight update; the
engine computes them with ``R`` (:meth:`APOLLORule.grad_squares`: on the CPU one pass over ``G``
for both, :mod:`lowrank_optim.kernels.projected_norms`). Decay is
decoupled, after the update in the Hugging Face form (``APOLLOAdamW``), before it in torch's form.
Bias correction is folded into ``η_t`` (apollo-torch's); per-slot correction is refused.

The update reads the full ``G``: ``backward_projection`` refuses it, and ``step_in_backward``
keeps a weight's full gradient through an accumulation window. The moments, the channel norms of
``G`` and the update ``W ← a·W − b·(ℓs∘G)`` run on the parameter's backend
(:mod:`lowrank_optim.kernels.channel_scaling`; on Triton one pass over ``G`` for the norms and one
over ``G`` and ``W`` for the update, ``ℓs`` a device tensor); a weight rounded stochastically (an
int8 weight, or a bf16 one with ``bf16_stochastic_round``: ``backend="triton"`` refuses that group)
gets ``ΔW = ℓs∘G`` formed in fp32 and written by
:func:`lowrank_optim.weight_store.stochastic_weight_update_`.
"""
from __future__ import annotations

import math

import torch

from ..channels import along_channels, channel_squared_norms
from ..kernels.dispatch import channel_squared_norms as dispatched_squared_norms
from ..kernels.dispatch import scaled_weight_update_
from ..kernels.weight_update import update_coefficients
from ..sharding import summed
from ..validation import InvalidHyperparameter, check_choice
from ..weight_store import stochastic_weight_update_
from .base import AdamHyperparameters, ProjectedStep, UpdateRule

SCALE_TYPES = ("channel", "tensor")
NORM_GUARD = 1e-8          # apollo-torch's, added to ‖R‖ and to the limiter's last norm


class APOLLORule(UpdateRule):
    """APOLLO's scaled-gradient update (module doc)."""

    name = "apollo"
    defaults = {"scale_type": "channel", "norm_growth_limit": 1.01}

    def check(self, group: dict) -> None:
        check_choice("scale_type", group["scale_type"], SCALE_TYPES)
        limit = group["norm_growth_limit"]
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, float)) or not limit >= 1.0):
            raise InvalidHyperparameter("norm_growth_limit", limit, (
                f"Invalid norm_growth_limit: {limit!r} (expected None, or a number >= 1: the largest growth "
                "of the update's norm from one step to the next)"))
        if group["bias_correction"] != "step":
            raise InvalidHyperparameter("bias_correction", group["bias_correction"], (
                f"Invalid bias_correction: {group['bias_correction']!r} with update_rule='apollo' (its scaling "
                "factors are per channel, not per slot; pass 'step')"))
        if group["residual"] != "none":
            raise InvalidHyperparameter("residual", group["residual"], (
                f"Invalid residual: {group['residual']!r} with update_rule='apollo' (it scales the whole "
                "gradient, nothing is left outside the subspace; pass 'none')"))

    def full_gradient_use(self, group: dict) -> tuple[str, str] | None:
        return ("update_rule='apollo'", "its update scales the full gradient; use the standard loop")

    def grad_squares(self, group: dict) -> str | None:
        return None if group["norm_growth_limit"] is None else group["scale_type"]

    def state_bytes(self, group: dict) -> int:
        return 0 if group["norm_growth_limit"] is None else 4

    def update(self, step: ProjectedStep, hyper: AdamHyperparameters, group: dict) -> None:
        normalized = step.moments.step(step.backend, step.low_rank_grad, beta1=hyper.beta1, beta2=hyper.beta2,
                                       eps=hyper.eps, bias_correction1=1.0, bias_correction2=1.0,
                                       step=step.state["step"], source_slots=step.source_slots)
        factors = _scaling_factors(normalized, step.low_rank_grad, step, group["scale_type"])
        if group["norm_growth_limit"] is not None:
            factors = _limited(factors, step, group["norm_growth_limit"])
        t = step.step
        bias = math.sqrt(1.0 - hyper.beta2**t) / (1.0 - hyper.beta1**t) if hyper.correct_bias else 1.0
        a, b = update_coefficients(lr=hyper.lr, scale=math.sqrt(hyper.scale) * bias, weight_decay=hyper.weight_decay,
                                   decay_before_update=hyper.form.decay_before_update)
        if step.generator is not None:
            coefficients = along_channels(factors, step.side) if factors.ndim else factors
            delta = step.grad.float() * coefficients
            stochastic_weight_update_(step.weight, delta, a=a, b=b, generator=step.generator, backend=step.backend)
            return
        scaled_weight_update_(step.backend, step.weight, step.grad, factors, step.side, a=a, b=b)


def _scaling_factors(normalized: torch.Tensor, low_rank_grad: torch.Tensor, step: ProjectedStep,
                     scale_type: str) -> torch.Tensor:
    """``s``: one per channel (1-D), or a 0-d tensor (``"tensor"``; squares summed over FSDP2 shards)."""
    if scale_type == "channel":
        return channel_squared_norms(normalized, step.side).sqrt_().div_(
            channel_squared_norms(low_rank_grad, step.side).sqrt_().add_(NORM_GUARD))
    squares = summed(torch.stack([channel_squared_norms(normalized, None), channel_squared_norms(low_rank_grad, None)]),
                     step.sharding)
    return squares[0].sqrt() / (squares[1].sqrt() + NORM_GUARD)


def _limited(factors: torch.Tensor, step: ProjectedStep, limit: float) -> torch.Tensor:
    """``ℓ·s`` with ``ℓ`` the norm-growth limiter's factor (module doc); records ``‖U‖``."""
    grad_squares = step.grad_squares
    if grad_squares is None:
        grad_squares = dispatched_squared_norms(step.backend, step.grad, step.side if factors.ndim else None)
    norm = summed((factors.square() * grad_squares).sum(), step.sharding).sqrt()
    previous = step.state.get("limiter_norm")
    if previous is not None:
        ratio = norm / (previous + NORM_GUARD)
        shrink = torch.where(ratio > limit, limit / ratio, torch.ones_like(ratio))
        factors, norm = factors * shrink, norm * shrink
    step.state["limiter_norm"] = norm
    return factors
