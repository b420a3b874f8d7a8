r"""Where a parameter's values live, and the one write of a stochastically rounded weight update.

A parameter is stored as ``"float"`` (an ordinary tensor of its dtype) or as ``"int8"`` (codes and
per-row scales, :mod:`lowrank_optim.weights`); each parameter's plan records which
(:attr:`lowrank_optim.planning.ParameterPlan.weight_store`), resolved once.

Every update of the library ends in ``W ← a·W − b·ΔW`` (``a = 1 − ηλ``, ``b`` the step size, ``ΔW``
the update direction: ``N·Pᵀ`` of a projected step, ``ℓs∘G`` of APOLLO, ``m̂/(√v̂ + ε)`` of plain
AdamW). A float weight rounded to nearest takes it through its rule's own (fused) path. A weight
rounded *stochastically* takes it through :func:`stochastic_weight_update_`, whatever the rule:

* an int8 weight always (:func:`lowrank_optim.weights.int8_update_`: the codes and scales are
  rewritten from ``a·Ŵ − b·ΔW`` in fp32; there is no round-to-nearest update of int8 weights,
  which would stall at small learning rates);
* a bf16 weight of a group with ``bf16_stochastic_round=True`` (the sum in fp32, then
  :func:`lowrank_optim.quantization.add_stochastic_round_`).

The noise comes from the parameter's :func:`lowrank_optim.rounding.rounding_generator` (its name
and step), so data-parallel replicas write the same bits and a resumed run continues exactly.
"""
from __future__ import annotations

import torch

from .quantization import add_stochastic_round_
from .sharding import local
from .weights import int8_update_, is_int8_weight

WEIGHT_STORES = ("float", "int8")


def weight_store(param: torch.Tensor) -> str:
    """``"int8"`` for an int8 weight (this rank's shard of one under FSDP2), else ``"float"``."""
    return "int8" if is_int8_weight(local(param)) else "float"


def stochastic_weight_update_(weight: torch.Tensor, delta: torch.Tensor, *, a: float, b: float,
                              generator: torch.Generator, backend: str = "torch") -> None:
    """``W ← SR(a·W − b·ΔW)`` in place, unbiased, with the noise of ``generator``.

    ``weight``: an int8 weight (``W`` is its dequantized ``Ŵ``) or a bf16 tensor; ``delta``: ``ΔW``
    of the weight's shape, a temporary of the caller (the bf16 path overwrites it). ``backend``: the
    int8 update's (:func:`lowrank_optim.weights.int8_update_`). For an int8 weight ``a = 1, b = 0``
    is the identity and writes nothing: re-deriving a row's scale in fp32 could otherwise move a
    code by one step (so a zero-gradient step at lr 0, which creates the optimizer state, keeps
    every weight bit for bit)."""
    if is_int8_weight(weight):
        if a == 1.0 and b == 0.0:
            return
        int8_update_(weight, delta, a=a, b=b, generator=generator, backend=backend)
        return
    update = delta.float().mul_(-b)
    if a != 1.0:
        update.add_(weight.float(), alpha=a - 1.0)
    add_stochastic_round_(weight, update, generator=generator)
