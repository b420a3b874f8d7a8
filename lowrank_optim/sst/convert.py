"""Turning a model's linear layers into SST layers (:func:`convert_to_sst`) and back (:func:`merge_sst`)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from .layer import SSTLinear


def convert_to_sst(model: nn.Module, rank: int, target_modules: Iterable[str] = ("attn", "mlp")) -> nn.Module:
    """Replace, in place, every ``nn.Linear`` whose qualified name contains one of ``target_modules``
    by :meth:`SSTLinear.from_linear` ``(linear, rank)``; returns ``model``.

    The converted model computes the same function (up to the SVD's rounding). With the default
    targets a Hugging Face LLaMA converts ``model.layers.{i}.self_attn.{q,k,v,o}_proj`` and
    ``model.layers.{i}.mlp.{gate,up,down}_proj``; embeddings, norms and ``lm_head`` stay as they are.

    Raises ``ValueError`` when nothing matches, when ``rank`` exceeds a matched layer's
    ``min(in_features, out_features)``, or when a match is a subclass of ``nn.Linear`` (such as
    ``nn.MultiheadAttention``'s ``out_proj``, whose owner reads ``.weight`` directly).
    """
    if isinstance(target_modules, str):
        raise ValueError(
            f"Invalid target_modules: {target_modules!r} (expected a collection of name parts, "
            f"e.g. ({target_modules!r},))"
        )
    targets = tuple(target_modules)
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(f"Invalid target_modules: {target_modules!r} (expected non-empty strings)")
    matches = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and any(t in name for t in targets)
    ]
    if not matches:
        raise ValueError(
            f"Invalid target_modules: {targets!r} matches no nn.Linear of the model "
            "(a module is converted when its qualified name contains one of them)"
        )
    for name, module in matches:
        if type(module) is not nn.Linear:
            raise ValueError(
                f"Invalid target_modules: {targets!r} matches {name!r}, a {type(module).__name__} "
                "(a subclass of nn.Linear); only plain nn.Linear layers are converted: narrow target_modules"
            )
        spectral_size = min(module.in_features, module.out_features)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= spectral_size:
            raise ValueError(
                f"Invalid rank: {rank!r} (expected an integer with 1 <= rank <= {spectral_size} = "
                f"min(in_features, out_features) of {name!r})"
            )
    for name, module in matches:
        _replace(model, name, SSTLinear.from_linear(module, rank))
    return model


@torch.no_grad()
def merge_sst(model: nn.Module) -> nn.Module:
    """Replace, in place, every :class:`SSTLinear` by the ``nn.Linear`` it computes; returns ``model``.

    The weight is ``U·diag(s)·Vᵀ`` with the active pairs included, in the layer's dtype and device.
    """
    for name, module in sst_layers(model):
        weight = module.merged_weight()
        linear = nn.Linear(
            module.in_features,
            module.out_features,
            bias=module.bias is not None,
            device="meta",
            dtype=weight.dtype,
        )
        linear.weight = nn.Parameter(weight)
        if module.bias is not None:
            linear.bias = nn.Parameter(module.bias.detach().clone())
        _replace(model, name, linear)
    return model


def sst_layers(model: nn.Module) -> list[tuple[str, SSTLinear]]:
    """The model's SST layers with their qualified names."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, SSTLinear)]


def _replace(model: nn.Module, qualified_name: str, new: nn.Module) -> None:
    parent_name, _, child_name = qualified_name.rpartition(".")
    if not child_name:
        raise ValueError("Invalid model: it is itself the layer to replace; wrap it in a container module")
    setattr(model.get_submodule(parent_name), child_name, new)
