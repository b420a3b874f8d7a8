"""Int8 weights in state dicts: codes and scales as two plain tensors, so checkpoints load with
``torch.load(weights_only=True)`` (torchao's tensor subclass itself would need allowlisting).

A module holding an int8 parameter ``weight`` gets two hooks (:func:`attach_state_dict_hooks`):

* ``state_dict()`` writes ``{prefix}weight.int8_codes`` (int8, ``m×n``) and
  ``{prefix}weight.int8_scales`` (``m``, the weight's dtype) in place of ``{prefix}weight``;
* ``load_state_dict()`` reads them back bit for bit (torchao's ``copy_`` between int8 weights
  copies codes and scales); a float ``{prefix}weight`` (a dense checkpoint) is quantized to nearest.

:func:`detach_state_dict_hooks` removes them again (:func:`lowrank_optim.weights.dequantize_model_weights`).
"""
from __future__ import annotations

from torch import nn

from .codec import quantize_weight
from .tensor import int8_weight, is_int8_weight

CODES_SUFFIX = ".int8_codes"
SCALES_SUFFIX = ".int8_scales"
_HOOKS_ATTRIBUTE = "_int8_weight_state_dict_hooks"


def _int8_names(module: nn.Module) -> list[str]:
    return [name for name, param in module._parameters.items() if is_int8_weight(param)]


def _split(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    for name in _int8_names(module):
        key = prefix + name
        if key in state_dict:
            weight = state_dict.pop(key)
            state_dict[key + CODES_SUFFIX] = weight.int_data
            state_dict[key + SCALES_SUFFIX] = weight.scale


def _join(module: nn.Module, state_dict: dict, prefix: str, local_metadata, strict, missing_keys, unexpected_keys,
          error_msgs) -> None:
    for name in _int8_names(module):
        key = prefix + name
        if key + CODES_SUFFIX in state_dict and key + SCALES_SUFFIX in state_dict:
            codes, scales = state_dict.pop(key + CODES_SUFFIX), state_dict.pop(key + SCALES_SUFFIX)
            state_dict[key] = int8_weight(codes, scales)
        elif key in state_dict and not is_int8_weight(state_dict[key]):
            scale_dtype = module._parameters[name].dtype
            state_dict[key] = quantize_weight(state_dict[key], scale_dtype=scale_dtype)


def attach_state_dict_hooks(module: nn.Module) -> None:
    """Give ``module`` the two hooks, once."""
    if not hasattr(module, _HOOKS_ATTRIBUTE):
        hooks = (module.register_state_dict_post_hook(_split), module.register_load_state_dict_pre_hook(_join))
        object.__setattr__(module, _HOOKS_ATTRIBUTE, hooks)


def detach_state_dict_hooks(module: nn.Module) -> None:
    """Remove the hooks from ``module`` when it has them."""
    for hook in module.__dict__.pop(_HOOKS_ATTRIBUTE, ()):
        hook.remove()
