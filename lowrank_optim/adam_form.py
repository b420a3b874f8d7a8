"""The two AdamW conventions the library reproduces.

Both compute ``N = m̂ / (√v̂ + ε_eff)`` with ``m̂ = m/(1-β1^t)``, ``v̂ = v/(1-β2^t)`` and then
``W ← W − η·(update)``; they differ only in where ε sits and where weight decay is applied:

* ``TORCH`` (``torch.optim.AdamW``): ``ε_eff = ε``; decoupled decay ``W ← (1 − ηλ)·W`` *before*
  the update.
* ``HF`` (Hugging Face / ``galore_torch``): ``denom = √v + ε`` on the raw second moment with step size
  ``η·√(1−β2^t)/(1−β1^t)``, which is the same as ``ε_eff = ε/√(1−β2^t)``; decay
  ``W ← W − ηλ·W`` *after* the update.
"""
from __future__ import annotations

import enum
import math

import torch


class AdamForm(enum.Enum):
    TORCH = "torch"
    HF = "hf"

    def effective_eps(self, eps: float, bias_correction2):
        """ε as it enters ``m̂ / (√v̂ + ε_eff)`` (a tensor for per-slot bias corrections)."""
        if self is AdamForm.HF:
            return eps / sqrt(bias_correction2)
        return eps

    @property
    def decay_before_update(self) -> bool:
        return self is AdamForm.TORCH


def bias_corrections(step, beta1: float, beta2: float):
    """``(1 − β1^t, 1 − β2^t)`` for the step count ``t`` (1 on the first step); ``t`` may be an int
    or an integer tensor of per-slot counts (then the corrections are fp32 tensors)."""
    if isinstance(step, torch.Tensor):
        step = step.float()
        return 1.0 - torch.pow(beta1, step), 1.0 - torch.pow(beta2, step)
    return 1.0 - beta1**step, 1.0 - beta2**step


def sqrt(value):
    """``√value`` of a float (``math.sqrt``) or a tensor."""
    return value.sqrt() if isinstance(value, torch.Tensor) else math.sqrt(value)
