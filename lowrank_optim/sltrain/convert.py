"""Turn a model's selected ``nn.Linear`` layers into ``SLTrainLinear`` and merge them back.

Initialisation of a converted layer (the method, as in the paper and its code): the dense weight
is discarded and the layer starts fresh, ``B = 0``, ``A`` Kaiming-uniform, ``S`` values U(±1/√n)
on a new support, so the converted model is NOT the same function as the dense one; it is a new
model to pretrain. Only the bias, which SLTrain keeps dense, is copied from the ``nn.Linear``.
Call :func:`convert_to_sltrain` right after building the model, before creating the optimizer.
"""

from __future__ import annotations

import torch
from torch import nn

from ..modules import TargetModules, replace_submodule, select_linear_modules
from .layer import SLTrainLinear, check_sltrain_hyperparameters
from .support import check_seed


def convert_to_sltrain(
    model: nn.Module,
    rank: int,
    density: float = 0.03,
    alpha: float = 32.0,
    target_modules: TargetModules = ("attn", "mlp"),
    seed: int = 0,
) -> nn.Module:
    """Replace, in place, every ``nn.Linear`` that ``target_modules`` selects.

    ``target_modules`` follows :mod:`lowrank_optim.modules`: a collection of name parts (a module is
    converted when its qualified name contains one), a regular expression matched against whole
    names, or ``"all-linear"`` (every ``nn.Linear`` but the output head). Each becomes
    ``SLTrainLinear(in, out, rank, density=density, alpha=alpha, seed=seed, name=<qualified name>)``
    on the weight's device and dtype, freshly initialised (module docstring); the defaults match
    Hugging Face LLaMA names (``model.layers.0.self_attn.q_proj``, ``model.layers.0.mlp.up_proj``),
    leaving embeddings, norms and ``lm_head`` dense.
    The support of each layer depends only on ``(seed, qualified name, shape, density)``.

    The default ``alpha = 32`` with the paper's 60M rank 128 gives ``α/r = 0.25``; the paper uses
    α 32/16/16/8 at ranks 128/256/256/512 (60M/130M/350M/1B). Returns ``model``.
    Raises ``ValueError`` for a bad argument, when nothing is selected, or when a match is a
    subclass of ``nn.Linear``; the model is left untouched then.
    """
    check_sltrain_hyperparameters(rank, density, alpha)
    check_seed(seed)
    for name, linear in select_linear_modules(model, target_modules):
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
        replace_submodule(model, name, layer)
    return model


def merge_sltrain(model: nn.Module) -> nn.Module:
    """Replace, in place, every ``SLTrainLinear`` with an ``nn.Linear`` holding ``W = (α/r)·B·A + S``
    (:meth:`SLTrainLinear.to_linear`).

    The merged model computes the same outputs (up to floating-point rounding of the matmul order).
    Returns ``model``, or a new ``nn.Linear`` when ``model`` itself is an ``SLTrainLinear``.
    A model without ``SLTrainLinear`` layers is returned unchanged.
    """
    if isinstance(model, SLTrainLinear):
        return model.to_linear()
    selected = [(name, m) for name, m in model.named_modules() if isinstance(m, SLTrainLinear)]
    for name, layer in selected:
        replace_submodule(model, name, layer.to_linear())
    return model
