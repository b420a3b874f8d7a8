"""GaLore's parameter selection: project the attention and MLP linear weights only."""
from __future__ import annotations

from collections.abc import Iterable

import torch


def lowrank_param_groups(model: torch.nn.Module, target_modules: Iterable[str] = ("attn", "mlp"),
                         rank: int | float = 128, **projection_kwargs) -> list[dict]:
    """Two param groups: the weights of ``nn.Linear`` modules whose qualified name contains one of
    ``target_modules`` (with ``rank`` and ``projection_kwargs``, e.g. ``update_proj_gap``,
    ``scale``, ``proj_type``), and every other trainable parameter in a plain group.

    Hugging Face LLaMA names match the defaults (``model.layers.0.self_attn.q_proj``,
    ``model.layers.0.mlp.up_proj``). Parameter names are carried (``(name, tensor)`` pairs), so
    error messages and ``refresh_stats`` name them. Raises ``ValueError`` if nothing matches.
    """
    targets = tuple(target_modules)
    if isinstance(target_modules, str) or not targets:
        raise ValueError(f"Invalid target_modules: {target_modules!r} (expected a non-empty sequence "
                         "of name fragments)")
    projected_ids = set()
    projected = []
    for module_name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and any(t in module_name for t in targets):
            if module.weight.requires_grad and id(module.weight) not in projected_ids:
                projected_ids.add(id(module.weight))
                projected.append((f"{module_name}.weight", module.weight))
    if not projected:
        raise ValueError(f"Invalid target_modules: {targets!r} matches no nn.Linear module of the model")
    rest = [(name, p) for name, p in model.named_parameters()
            if p.requires_grad and id(p) not in projected_ids]
    groups = [{"params": projected, "rank": rank, **projection_kwargs}]
    if rest:
        groups.append({"params": rest})
    return groups
