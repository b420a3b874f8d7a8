"""Optimizers by name: ``create_optimizer("dct_adamw", model.parameters(), lr=1e-3)``.

Each optimizer class registers itself with :func:`register_optimizer`; the training script and the
benchmarks look names up here, never through an if/elif chain.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

OptimizerFactory = Callable[..., torch.optim.Optimizer]

_REGISTRY: dict[str, OptimizerFactory] = {}


def register_optimizer(name: str, factory: OptimizerFactory) -> None:
    """Make ``factory(params, **kwargs)`` available as ``create_optimizer(name, ...)``."""
    if name in _REGISTRY and _REGISTRY[name] is not factory:
        raise ValueError(f"optimizer name {name!r} is already registered to {_REGISTRY[name]!r}")
    _REGISTRY[name] = factory


def available_optimizers() -> list[str]:
    """The registered names, sorted."""
    return sorted(_REGISTRY)


def create_optimizer(name: str, params: Iterable, **kwargs) -> torch.optim.Optimizer:
    """Build the optimizer registered as ``name`` over ``params`` with ``kwargs``."""
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown optimizer {name!r}; known optimizers: {', '.join(available_optimizers())}"
        ) from None
    return factory(params, **kwargs)


register_optimizer("adamw", torch.optim.AdamW)
