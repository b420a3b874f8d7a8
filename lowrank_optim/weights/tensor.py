"""The parameter that holds an int8 weight: torchao's ``Int8QuantizedTrainingLinearWeight``.

torchao is imported on first use (:func:`int8_weight_class`), so the rest of the library never
needs it; :func:`is_int8_weight` answers without importing it (no instance can exist before its
class is imported). The codes and scales are the tensor's ``int_data`` (``m×n`` int8) and
``scale`` (``m`` values, whose dtype is the weight's apparent ``dtype``).
"""
from __future__ import annotations

import functools
import sys

import torch

from ..kernels.int8_weight_update import check_storage
from .embedding import register_embedding

_TORCHAO_MODULE = "torchao.prototype.quantized_training.int8"
_INSTALL_HINT = "pip install 'lowrank-optim[int8]' (torchao>=0.18)"


@functools.cache
def int8_weight_class() -> type:
    """``Int8QuantizedTrainingLinearWeight``, with ``F.embedding`` taught to it (:mod:`.embedding`).
    ImportError naming the package to install when torchao is missing."""
    try:
        from torchao.prototype.quantized_training.int8 import Int8QuantizedTrainingLinearWeight
    except ImportError as error:
        raise ImportError(f"int8 weights need torchao's quantized-training tensor: {_INSTALL_HINT}") from error
    register_embedding(Int8QuantizedTrainingLinearWeight)
    return Int8QuantizedTrainingLinearWeight


def is_int8_weight(tensor) -> bool:
    """Whether ``tensor`` (a parameter, or a value of a state dict) is stored as int8 codes and scales."""
    module = sys.modules.get(_TORCHAO_MODULE)
    return module is not None and isinstance(tensor, module.Int8QuantizedTrainingLinearWeight)


def int8_weight(codes: torch.Tensor, scales: torch.Tensor, *, requires_grad: bool = False) -> torch.Tensor:
    """The int8 weight tensor (a ``requires_grad`` leaf) over ``codes`` and ``scales``, not copied."""
    check_storage(codes, scales)
    weight = int8_weight_class()(codes, scales)
    return weight.requires_grad_(requires_grad)


def int8_storage(weight: torch.Tensor, name: str = "weight") -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, scales)`` of an int8 weight, the tensors it holds; ValueError naming ``name`` otherwise."""
    if not is_int8_weight(weight):
        raise ValueError(f"{name} is not an int8 weight (a {type(weight).__name__} of {weight.dtype}); "
                         "convert the model with quantize_model_weights first")
    return weight.int_data, weight.scale
