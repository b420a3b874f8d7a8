r"""The one call an optimizer makes to step an int8 weight: ``W ← SR(a·Ŵ − b·ΔW)``.

``a, b`` are the coefficients of the library's weight updates (``a = 1 − ηλ``, ``b`` the step
size; :func:`lowrank_optim.kernels.weight_update.update_coefficients`) and ``ΔW`` the update
direction in the weight's shape (``N·Pᵀ`` of a projected step, ``m̂/(√v̂ + ε)`` of plain AdamW).
Each row is dequantized, updated in fp32, given a new scale from its new absmax and re-quantized
with unbiased stochastic rounding (:mod:`lowrank_optim.kernels.int8_weight_update`):
``E[Ŵ_new] = a·Ŵ − b·ΔW``, so steps far below half a quantization step still move the weight.

The noise is a function of one seed drawn from ``generator`` and of each value's position: with
the parameter's :func:`lowrank_optim.rounding.rounding_generator` (seeded by its name and the step)
every data-parallel rank writes the same bits, and a resumed run what the uninterrupted one would.
Both backends write the same bits.
"""
from __future__ import annotations

import torch

from ..kernels.backend import resolve_backend
from ..kernels.dispatch import int8_weight_update_
from .codec import noise_seed
from .tensor import int8_storage


def int8_update_(weight: torch.Tensor, delta: torch.Tensor, *, a: float, b: float, generator: torch.Generator,
                 backend: str = "auto") -> None:
    """``W ← SR(a·Ŵ − b·ΔW)`` in place on the int8 ``weight`` (its codes and scales), ``delta``
    (``ΔW``) a float tensor of the weight's shape, any float dtype.

    ``generator`` is required: the rounding noise must be reproducible (module doc). ``backend``:
    ``"auto"``, ``"torch"`` or ``"triton"`` (:mod:`lowrank_optim.kernels.backend`). Raises
    ``ValueError`` naming the argument that does not fit."""
    codes, scales = int8_storage(weight)
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"Invalid generator: {generator!r} (int8 weights are updated with stochastic rounding "
                         "from an explicit torch.Generator, e.g. lowrank_optim.rounding.rounding_generator)")
    if not isinstance(delta, torch.Tensor):
        raise ValueError(f"Invalid delta: {type(delta).__name__} (expected a tensor of shape {tuple(codes.shape)})")
    resolved = resolve_backend(backend, codes.device, (scales.dtype, delta.dtype))
    seed = noise_seed(generator, codes.device)
    int8_weight_update_(resolved, codes, scales, delta.detach(), a=float(a), b=float(b), seed=seed)
