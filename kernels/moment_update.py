"""Adam moment update on a (projected) gradient, PyTorch reference.

In place on ``m`` and ``v`` (any float dtype, usually fp32), for a gradient ``R`` of the same shape::

    m ← β1·m + (1 − β1)·R
    v ← β2·v + (1 − β2)·R²
    N = (m / bc1) / (√(v / bc2) + ε)          bc1 = 1 − β1^t, bc2 = 1 − β2^t

``N`` is returned in the moments' dtype. The bias corrections are runtime values (they change every
step), passed in rather than derived here so that callers can fold ε conventions into ``eps``. They
(and ``eps``) may also be tensors broadcasting against the moments: per-slot corrections.
"""
from __future__ import annotations

import math

import torch


def adam_moment_update_(
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    beta1: float,
    beta2: float,
    eps: float | torch.Tensor,
    bias_correction1: float | torch.Tensor,
    bias_correction2: float | torch.Tensor,
) -> torch.Tensor:
    """Update ``exp_avg``/``exp_avg_sq`` in place and return the normalized update ``N``."""
    grad = grad.to(exp_avg.dtype)
    exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    sqrt_bias_correction2 = (bias_correction2.sqrt() if isinstance(bias_correction2, torch.Tensor)
                             else math.sqrt(bias_correction2))
    denom = exp_avg_sq.sqrt().div_(sqrt_bias_correction2).add_(eps)
    return exp_avg.div(denom).div_(bias_correction1)
