"""One call to store a model's weights in int8 for training, and one to give an ordinary model back.

:func:`quantize_model_weights` picks ``nn.Linear`` weights with the library's ``target_modules``
rule (:mod:`lowrank_optim.modules`; default ``"all-linear"``: every ``nn.Linear`` but the output
head), adds the head's weight with ``include_head`` and every ``nn.Embedding``'s with
``include_embeddings``, and replaces each by an int8 parameter (codes rounded to nearest) in place.
A weight shared by several modules (tied embeddings) is converted once, for all of them. The
modules stay what they were: ``F.linear`` (torchao) and ``F.embedding`` (:mod:`.embedding`)
dequantize their weight when they run, one layer at a time.

:func:`dequantize_model_weights` replaces every int8 parameter by an ordinary one holding ``Ŵ``
(``dtype``, default bf16), so ``save_pretrained``, any optimizer and any exporter see a plain
model. Converting that model again re-quantizes ``Ŵ`` to nearest: a row whose largest code is
below 127 (stochastic rounding may leave 126) gets a scale ``max|q|/127`` times its old one, and
each value moves by at most half of that new step (plus the export's rounding: ``2⁻⁹`` relative
in bf16, none in fp32, which holds every ``s·q``).
"""
from __future__ import annotations

import torch
from torch import nn

from ..modules import ALL_LINEAR, TargetModules, output_head, select_linear_modules
from .checkpoint import attach_state_dict_hooks, detach_state_dict_hooks
from .codec import dequantize_weight, quantize_weight
from .tensor import is_int8_weight


def _check_flag(name: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"Invalid {name}: {value!r} (expected True or False)")


def _selected_modules(model: nn.Module, target_modules: TargetModules | None, include_embeddings: bool,
                      include_head: bool) -> list[nn.Module]:
    modules = [] if target_modules is None else [m for _, m in select_linear_modules(model, target_modules)]
    if include_head:
        head = output_head(model)
        if not isinstance(head, nn.Linear):
            raise ValueError(f"Invalid include_head: True (the model has no nn.Linear output head; found {head!r})")
        modules.append(head)
    if include_embeddings:
        embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)]
        if not embeddings:
            raise ValueError("Invalid include_embeddings: True (the model has no nn.Embedding)")
        modules.extend(embeddings)
    if not modules:
        raise ValueError("Invalid target_modules: None selects nothing without include_embeddings or include_head")
    return modules


def _owners(model: nn.Module, tensor: torch.Tensor) -> list[tuple[str, nn.Module, str]]:
    """``(module name, module, parameter name)`` of every module holding ``tensor`` directly."""
    return [(module_name, module, name) for module_name, module in model.named_modules()
            for name, param in module._parameters.items() if param is tensor]


def _replace(model: nn.Module, old: torch.Tensor, new: nn.Parameter) -> list[str]:
    names = []
    for module_name, module, name in _owners(model, old):
        setattr(module, name, new)
        names.append(f"{module_name}.{name}" if module_name else name)
    return names


def quantize_model_weights(model: nn.Module, target_modules: TargetModules | None = ALL_LINEAR, *,
                           include_embeddings: bool = False, include_head: bool = False) -> list[str]:
    """Store the selected weights of ``model`` as int8 codes and per-row scales, in place (module
    doc); returns the qualified names of the converted parameters (every owner of a shared
    one; weights already int8 are left as they are and not listed).

    ``target_modules``: as :func:`~lowrank_optim.lowrank_param_groups` takes it, or ``None`` for
    no ``nn.Linear`` but the head and embeddings the flags add. Each weight keeps its dtype (fp32
    or bf16) as its scales' dtype and its ``requires_grad``. Raises ``ValueError`` naming the
    argument when the selection is empty or malformed, or a selected weight is not fp32/bf16."""
    _check_flag("include_embeddings", include_embeddings)
    _check_flag("include_head", include_head)
    weights = {}
    for module in _selected_modules(model, target_modules, include_embeddings, include_head):
        if not is_int8_weight(module.weight):
            weights.setdefault(id(module.weight), module.weight)
    converted = []
    for weight in weights.values():
        owners = _owners(model, weight)
        try:
            new = nn.Parameter(quantize_weight(weight), requires_grad=weight.requires_grad)
        except ValueError as error:
            names = ", ".join(f"{module_name}.{name}" for module_name, _, name in owners)
            raise ValueError(f"Cannot store {names} in int8: {error}") from None
        converted.extend(_replace(model, weight, new))
        for _, module, _ in owners:
            attach_state_dict_hooks(module)
    return converted


def dequantize_model_weights(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> list[str]:
    """Replace every int8 parameter of ``model`` by an ordinary ``dtype`` parameter holding its
    ``Ŵ`` (same ``requires_grad``; shared weights stay shared), in place, and remove the
    state-dict hooks; returns the qualified names replaced."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"Invalid dtype: {dtype!r} (expected a floating-point torch.dtype)")
    weights = {id(p): p for p in model.parameters() if is_int8_weight(p)}
    replaced = []
    for weight in weights.values():
        owners = _owners(model, weight)
        plain = nn.Parameter(dequantize_weight(weight, dtype), requires_grad=weight.requires_grad)
        replaced.extend(_replace(model, weight, plain))
        for _, module, _ in owners:
            if not any(is_int8_weight(p) for p in module._parameters.values()):
                detach_state_dict_hooks(module)
    return replaced
