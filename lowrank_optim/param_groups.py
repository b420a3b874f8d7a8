"""GaLore's parameter selection: project the attention and MLP linear weights only."""
from __future__ import annotations

import torch

from .modules import TargetModules, select_linear_modules
from .validation import InvalidHyperparameter


def lowrank_param_groups(model: torch.nn.Module, target_modules: TargetModules = ("attn", "mlp"),
                         rank: int | float = 128, **projection_kwargs) -> list[dict]:
    """Two param groups: the trainable weights of the ``nn.Linear`` modules ``target_modules``
    selects (with ``rank`` and ``projection_kwargs``, e.g. ``update_proj_gap``, ``scale``,
    ``proj_type``), and every other trainable parameter in a plain group (no ``rank`` key).

    ``target_modules`` follows :mod:`lowrank_optim.modules`: a collection of name parts (a module
    is selected when its qualified name contains one), a regular expression matched against whole
    names, or ``"all-linear"`` (every ``nn.Linear`` but the output head). Hugging Face LLaMA names
    match the defaults (``model.layers.0.self_attn.q_proj``, ``model.layers.0.mlp.up_proj``).
    Parameter names are carried (``(name, tensor)`` pairs), so error messages and ``refresh_stats``
    name them. Raises ``ValueError`` naming ``target_modules`` if it selects nothing, or only
    frozen weights.
    """
    projected_ids = set()
    projected = []
    for module_name, module in select_linear_modules(model, target_modules):
        if module.weight.requires_grad and id(module.weight) not in projected_ids:
            projected_ids.add(id(module.weight))
            projected.append((f"{module_name}.weight", module.weight))
    if not projected:
        raise InvalidHyperparameter("target_modules", target_modules, (
            f"Invalid target_modules: {target_modules!r} selects only nn.Linear modules whose weight is frozen "
            "(requires_grad=False)"))
    rest = [(name, p) for name, p in model.named_parameters()
            if p.requires_grad and id(p) not in projected_ids]
    groups = [{"params": projected, "rank": rank, **projection_kwargs}]
    if rest:
        groups.append({"params": rest})
    return groups
