"""Learning-rate schedules with linear warmup: ``cosine``, ``linear`` and ``constant``.

GaLore's protocol uses ``cosine`` with 10% warmup decaying to ``min_lr_ratio`` = 10% of the peak.
A schedule is a picklable callable object of plain numbers, so ``LambdaLR.state_dict()`` saves it
and a checkpoint loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


class WarmupSchedule:
    """Multiplier of the peak learning rate at ``step``: linear warmup from 0, then ``decay``."""

    def __init__(self, decay: str, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> None:
        if decay not in DECAYS:
            raise ValueError(f"unknown scheduler {decay!r}; known schedulers: {', '.join(DECAYS)}")
        if not 0 <= warmup_steps <= total_steps:
            raise ValueError(f"warmup_steps {warmup_steps} must lie in [0, num_training_steps={total_steps}]")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio {min_lr_ratio} must lie in [0, 1]")
        self.decay = decay
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.min_lr_ratio = min_lr_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        decay_steps = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * DECAYS[self.decay](progress)


def _cosine(progress: float) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _linear(progress: float) -> float:
    return 1.0 - progress


def _constant(progress: float) -> float:
    return 1.0


# Each maps training progress after warmup (0 -> 1) to a factor falling from 1 (to 0 for the decays).
DECAYS: dict[str, Callable[[float], float]] = {"cosine": _cosine, "linear": _linear, "constant": _constant}


def build_scheduler(
    optimizer: torch.optim.Optimizer, name: str, warmup_steps: int, total_steps: int, min_lr_ratio: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """``LambdaLR`` over every param group with :class:`WarmupSchedule`."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupSchedule(name, warmup_steps, total_steps, min_lr_ratio))
