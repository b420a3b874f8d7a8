"""Turning a model's linear layers into SST layers (:func:`convert_to_sst`) and back (:func:`merge_sst`)."""

from __future__ import annotations

from torch import nn

from ..modules import TargetModules, replace_submodule, select_linear_modules
from ..validation import InvalidHyperparameter
from .layer import SSTLinear


def convert_to_sst(model: nn.Module, rank: int, target_modules: TargetModules = ("attn", "mlp")) -> nn.Module:
    """Replace, in place, every ``nn.Linear`` that ``target_modules`` selects by
    :meth:`SSTLinear.from_linear` ``(linear, rank)``; returns ``model``.

    ``target_modules`` follows :mod:`lowrank_optim.modules`: a collection of name parts (a module is
    converted when its qualified name contains one), a regular expression matched against whole
    names, or ``"all-linear"`` (every ``nn.Linear`` but the output head). The converted model
    computes the same function (up to the SVD's rounding). With the default targets a Hugging Face
    LLaMA converts ``model.layers.{i}.self_attn.{q,k,v,o}_proj`` and
    ``model.layers.{i}.mlp.{gate,up,down}_proj``; embeddings, norms and ``lm_head`` stay as they are.

    Raises ``ValueError`` when nothing is selected, when ``rank`` exceeds a selected layer's
    ``min(in_features, out_features)``, or when a match is a subclass of ``nn.Linear`` (such as
    ``nn.MultiheadAttention``'s ``out_proj``, whose owner reads ``.weight`` directly); the model is
    left untouched then.
    """
    matches = select_linear_modules(model, target_modules)
    for name, module in matches:
        spectral_size = min(module.in_features, module.out_features)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= spectral_size:
            raise InvalidHyperparameter(
                "rank", rank,
                f"Invalid rank: {rank!r} (expected an integer with 1 <= rank <= {spectral_size} = "
                f"min(in_features, out_features) of {name!r})"
            )
    for name, module in matches:
        replace_submodule(model, name, SSTLinear.from_linear(module, rank))
    return model


def merge_sst(model: nn.Module) -> nn.Module:
    """Replace, in place, every :class:`SSTLinear` by the ``nn.Linear`` it computes
    (:meth:`SSTLinear.to_linear`); returns ``model``.

    The weight is ``U·diag(s)·Vᵀ`` with the active pairs included, in the layer's dtype and device.
    """
    for name, module in sst_layers(model):
        replace_submodule(model, name, module.to_linear())
    return model


def sst_layers(model: nn.Module) -> list[tuple[str, SSTLinear]]:
    """The model's SST layers with their qualified names."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, SSTLinear)]

