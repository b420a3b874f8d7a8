"""The update-rule interface: what a projected parameter does with its gradient once projected.

The engine (:mod:`lowrank_optim.engine`) resolves a parameter's plan, keeps its subspace and
moments, and hands one :class:`ProjectedStep` to the rule its plan names: everything the step of
one weight ``W`` (``m×n``) reads, with ``R`` (``G·P`` or ``Pᵀ·G``) already formed. The rule updates
``W`` and the moments in place. A new rule is one file with an :class:`UpdateRule` subclass plus
one line in :data:`lowrank_optim.rules.RULES`; a param group chooses it with ``update_rule``.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..adam_form import AdamForm
from ..moments import Moments
from ..sharding import Sharding


@dataclass(frozen=True)
class AdamHyperparameters:
    """A group's scalars as a step reads them (``lr`` a Python float, also when the group holds a tensor)."""

    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    scale: float
    correct_bias: bool
    form: AdamForm

    @classmethod
    def of(cls, group: dict, form: AdamForm) -> AdamHyperparameters:
        beta1, beta2 = group["betas"]
        lr = group["lr"]
        return cls(lr=lr.item() if isinstance(lr, torch.Tensor) else float(lr), beta1=beta1, beta2=beta2,
                   eps=group["eps"], weight_decay=group["weight_decay"], scale=group["scale"],
                   correct_bias=group.get("correct_bias", True), form=form)


@dataclass
class ProjectedStep:
    """The operands of one projected weight's step.

    ``weight``: the parameter (this rank's shard under FSDP2); ``grad``: its gradient ``G`` (negated
    under ``maximize``), None when it was projected in the backward pass; ``low_rank_grad``: ``R``;
    ``basis_columns()``: ``(basis, indices)`` with ``P = basis[:, indices]`` (``indices`` None:
    ``P = basis``), in the moments' float dtype, formed on call (a rule that never back-projects,
    as APOLLO, never draws or gathers ``P``); ``step``:
    the incremented step count, or per-slot counts shaped to broadcast against the moments;
    ``source_slots``: a slot remap of the moments still to apply (a transporting DCT refresh);
    ``state``: the parameter's state dict, for entries the rule owns; ``generator``: stochastic
    rounding of ``weight`` (an int8 weight, or a bf16 one with ``bf16_stochastic_round``; None: round
    to nearest): the rule then writes ``W ← SR(a·W − b·ΔW)`` with
    :func:`lowrank_optim.weight_store.stochastic_weight_update_`, the only write an int8 weight takes;
    ``grad_squares``: the squared norms of ``grad`` that :meth:`UpdateRule.grad_squares` asked for,
    computed with ``R`` (None when ``R`` came from elsewhere: the rule then computes them)."""

    weight: torch.Tensor
    grad: torch.Tensor | None
    low_rank_grad: torch.Tensor
    moments: Moments
    basis_columns: Callable[[], tuple[torch.Tensor, torch.Tensor | None]]
    side: str
    step: int | torch.Tensor
    source_slots: torch.Tensor | None
    state: dict
    sharding: Sharding | None
    backend: str
    generator: torch.Generator | None
    grad_squares: torch.Tensor | None = None


class UpdateRule(ABC):
    """How a projected weight is updated from its projected gradient and moments.

    ``defaults`` maps the rule's own param-group keys to the values a group without them gets;
    :meth:`check` validates them and the shared keys the rule cannot honour.
    :meth:`full_gradient_use` says whether the update reads ``G`` itself (then
    ``backward_projection``, which frees ``G``, refuses the group, and ``step_in_backward`` keeps
    its full gradient through an accumulation window)."""

    name: ClassVar[str]
    defaults: ClassVar[dict[str, object]] = {}

    def check(self, group: dict) -> None:
        """Raise :class:`~lowrank_optim.validation.InvalidHyperparameter` for a key of ``group``
        this rule cannot run with (the default: every group is fine)."""
        return None

    def full_gradient_use(self, group: dict) -> tuple[str, str] | None:
        """``(what reads G, how to avoid it)`` when ``group``'s update reads the full gradient, else None."""
        return None

    def grad_squares(self, group: dict) -> str | None:
        """Which squared norms of ``G`` the update reads: ``"channel"`` (one per channel, the
        dimension the projection keeps), ``"tensor"`` (``‖G‖²``) or None (the default: none).
        The engine computes them with ``R`` (:attr:`ProjectedStep.grad_squares`)."""
        return None

    def state_bytes(self, group: dict) -> int:
        """Bytes of the rule's own state per weight (beyond moments and subspace)."""
        return 0

    @abstractmethod
    def update(self, step: ProjectedStep, hyper: AdamHyperparameters, group: dict) -> None:
        """Update ``step.weight`` and ``step.moments`` in place."""
