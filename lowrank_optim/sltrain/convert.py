"""Turn a model's selected ``nn.Linear`` layers into ``SLTrainLinear`` and merge them back.

Initialisation of a converted layer (the method, as in the paper and its code): the dense weight
is discarded and the layer starts fresh, ``B = 0``, ``A`` Kaiming-uniform, ``S`` values U(±1/√n)
on a new support, so the converted model is NOT the same function as the dense one; it is a new
model to pretrain. Only the bias, which SLTrain keeps dense, is copied from the ``nn.Linear``.
Call :func:`convert_to_sltrain` right after building the model, before creating the optimizer.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from .layer import SLTrainLinear, check_sltrain_hyperparameters
from .support import check_seed


def _check_target_modules(target_modules) -> tuple[str, ...]:
    if isinstance(target_modules, str):
        raise ValueError(
            f"Invalid target_modules: {target_modules!r} (expected a collection of name parts, "
            f"e.g. ({target_modules!r},))"
        )
    targets = tuple(target_modules) if isinstance(target_modules, Iterable) else None
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(f"Invalid target_modules: {target_modules!r} (expected non-empty strings)")
    return targets


def _replace_submodule(model: nn.Module, qualified_name: str, module: nn.Module) -> None:
    parent_name, _, child_name = qualified_name.rpartition(".")
    setattr(model.get_submodule(parent_name), child_name, module)


def convert_to_sltrain(
    model: nn.Module,
    rank: int,
    density: float = 0.03,
    alpha: float = 32.0,
    target_modules: Iterable[str] = ("attn", "mlp"),
    seed: int = 0,
) -> nn.Module:
    """Replace, in place, every ``nn.Linear`` whose qualified name contains one of ``target_modules``.

    Each becomes ``SLTrainLinear(in, out, rank, density=density, alpha=alpha, seed=seed,
    name=<qualified name>)`` on the weight's device and dtype, freshly initialised (module
    docstring); the defaults match Hugging Face LLaMA names (``model.layers.0.self_attn.q_proj``,
    ``model.layers.0.mlp.up_proj``), leaving embeddings, norms and ``lm_head`` dense.
    The support of each layer depends only on ``(seed, qualified name, shape, density)``.

    The default ``alpha = 32`` with the paper's 60M rank 128 gives ``α/r = 0.25``; the paper uses
    α 32/16/16/8 at ranks 128/256/256/512 (60M/130M/350M/1B). Returns ``model``.
    Raises ``ValueError`` for a bad argument or when no ``nn.Linear`` name matches.
    """
    check_sltrain_hyperparameters(rank, density, alpha)
    check_seed(seed)
    targets = _check_target_modules(target_modules)
    selected = [
        (name, module)
        for name, module in model.named_modules()
        if name and isinstance(module, nn.Linear) and any(t in name for t in targets)
    ]
    if not selected:
        linear_names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
        raise ValueError(
            f"Invalid target_modules: {targets!r} match no nn.Linear of the model "
            f"(its nn.Linear layers: {linear_names[:8]}{' …' if len(linear_names) > 8 else ''})"
        )
    for name, linear in selected:
        layer = SLTrainLinear(
            linear.in_features,
            linear.out_features,
            rank,
            density=density,
            alpha=alpha,
            bias=linear.bias is not None,
            seed=seed,
            name=name,
            device=linear.weight.device,
            dtype=linear.weight.dtype,
        )
        if linear.bias is not None:
            with torch.no_grad():
                layer.bias.copy_(linear.bias)
        _replace_submodule(model, name, layer)
    return model


def _merged_linear(layer: SLTrainLinear) -> nn.Linear:
    linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
    linear.weight = nn.Parameter(layer.merged_weight())
    if layer.bias is not None:
        linear.bias = nn.Parameter(layer.bias.detach().clone())
    return linear


def merge_sltrain(model: nn.Module) -> nn.Module:
    """Replace, in place, every ``SLTrainLinear`` with an ``nn.Linear`` holding ``W = (α/r)·B·A + S``.

    The merged model computes the same outputs (up to floating-point rounding of the matmul order).
    Returns ``model``, or a new ``nn.Linear`` when ``model`` itself is an ``SLTrainLinear``.
    A model without ``SLTrainLinear`` layers is returned unchanged.
    """
    if isinstance(model, SLTrainLinear):
        return _merged_linear(model)
    selected = [(name, m) for name, m in model.named_modules() if isinstance(m, SLTrainLinear)]
    for name, layer in selected:
        _replace_submodule(model, name, _merged_linear(layer))
    return model
