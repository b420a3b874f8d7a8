"""Which of an optimizer's parameters form SST layers, and the gradient checks made before a step.

:func:`partition_group` splits a parameter group into plain parameters and SST layers (recognised by
:func:`~lowrank_optim.sst.parameter_owners.sst_owner`), refusing a layer whose ``s``, ``U_active``,
``V_active`` are not all in the group. Errors name parameters by ``param_names`` when the group has
them (``model.named_parameters()``), else by position and shape.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..finite import finite_flags
from ..validation import check_dense_real_grad
from .layer import SSTLinear
from .parameter_owners import SST_ROLES, sst_owner


@dataclass
class SSTLayerEntry:
    """An SST layer of a parameter group, with its name for messages."""

    layer: SSTLinear
    label: str  # "SST layer <qualified name or repr>", for messages
    has_grad: bool = False  # all of s, U_active, V_active have gradients (else none has)


def partition_group(
    group_index: int, group: dict, with_grad: bool = False
) -> tuple[dict, list[torch.Tensor], list[SSTLayerEntry]]:
    """Split a group into plain parameters and SST layers, validating what would break the step.

    Always: complex parameters, and SST layers with only some of ``s``/``U_active``/``V_active`` in the
    group (``ValueError``). With ``with_grad``, keep only the plain parameters that have gradients, mark
    the SST layers that have them (a layer without any is still resampled on schedule), and check the
    gradients (``RuntimeError`` for sparse or complex ones, or an SST layer with only some of them).
    """
    names = group.get("param_names")
    plain: list[torch.Tensor] = []
    found: dict[int, tuple[SSTLinear, dict[str, int]]] = {}
    for index, p in enumerate(group["params"]):
        key = names[index] if names is not None else f"param_groups[{group_index}]['params'][{index}]"
        label = f"parameter {key} (shape {tuple(p.shape)})"
        if p.is_complex():
            raise ValueError(f"{label}: complex parameters are not supported")
        owner = sst_owner(p)
        if owner is None:
            if not with_grad or p.grad is not None:
                if with_grad:
                    check_dense_real_grad(p.grad, label)
                plain.append(p)
            continue
        layer, role = owner
        found.setdefault(id(layer), (layer, {}))[1][role] = index
    layers = []
    for layer, roles in found.values():
        shown_role, shown_index = ("s", roles["s"]) if "s" in roles else next(iter(roles.items()))
        if names is not None:
            label = f"SST layer {names[shown_index].removesuffix('.' + shown_role)}"
        else:
            label = f"SST layer {layer!r} at param_groups[{group_index}]['params'][{shown_index}]"
        missing = [role for role in SST_ROLES if role not in roles]
        if missing:
            raise ValueError(
                f"Invalid params: {label} has {', '.join(sorted(roles))} in this parameter group but not "
                f"{', '.join(missing)}; give SSTAdamW all of an SST layer's s, U_active and V_active in "
                "one parameter group (e.g. model.parameters())"
            )
        layers.append(SSTLayerEntry(layer, label, has_grad=with_grad and _layer_has_grads(layer, label)))
    return group, plain, layers


def _layer_has_grads(layer: SSTLinear, label: str) -> bool:
    """All three SST gradients present (True), none (False: no update this step), else raise."""
    missing = [role for role in SST_ROLES if getattr(layer, role).grad is None]
    if len(missing) == len(SST_ROLES):
        return False
    if missing:
        raise RuntimeError(
            f"{label}: {', '.join(missing)} has no gradient while the layer's other SST parameters do; "
            "SSTAdamW updates s, U_active and V_active together"
        )
    for role in SST_ROLES:
        check_dense_real_grad(getattr(layer, role).grad, f"{label} {role}")
    return True


def sst_parameters(layer: SSTLinear) -> list[torch.Tensor]:
    """The layer's ``s``, ``U_active``, ``V_active``."""
    return [getattr(layer, role) for role in SST_ROLES]


def check_finite_before_resample(layers: list[SSTLayerEntry]) -> None:
    """Raise ``FloatingPointError`` naming the first layer with a non-finite gradient: it would reach
    the re-SVD and the sampling."""
    params = [p for entry in layers for p in sst_parameters(entry.layer)]
    bad = next((i for i, ok in enumerate(finite_flags([p.grad for p in params])) if not ok), None)
    if bad is not None:
        raise FloatingPointError(
            f"{layers[bad // len(SST_ROLES)].label}: non-finite gradient of {SST_ROLES[bad % len(SST_ROLES)]} "
            "on a step that ends in a resample; no parameter or state was changed "
            "(pass skip_nonfinite=True to skip such steps)"
        )
