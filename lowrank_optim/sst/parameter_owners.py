"""Which :class:`~lowrank_optim.sst.layer.SSTLinear` owns a parameter, and in which role.

:class:`~lowrank_optim.sst.optimizer.SSTAdamW` receives bare parameters (``model.parameters()``) and
must recognise the three tensors of each SST layer among them: the singular values ``s`` and the
active singular vectors ``U_active`` and ``V_active``. Each layer records its own parameters here,
keyed by tensor identity and held weakly on both sides (an entry never keeps a model alive). A layer
re-records itself whenever its parameter objects may have been replaced: on assignment, after
``Module._apply`` (``.to()``, ``.to_empty()``) and after unpickling or ``copy.deepcopy``.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils.weak import WeakIdKeyDictionary

SST_ROLES = ("s", "U_active", "V_active")

_OWNERS = WeakIdKeyDictionary()  # Parameter -> (weakref to the owning layer, role)


def record_owner(param: torch.nn.Parameter, layer: torch.nn.Module, role: str) -> None:
    """Remember that ``param`` is ``layer.<role>``."""
    if role not in SST_ROLES:
        raise ValueError(f"Invalid role: {role!r} (expected one of {', '.join(map(repr, SST_ROLES))})")
    _OWNERS[param] = (weakref.ref(layer), role)


def sst_owner(param: torch.Tensor) -> tuple[torch.nn.Module, str] | None:
    """``(layer, role)`` when ``param`` is currently an SST layer's ``s``/``U_active``/``V_active``.

    Returns ``None`` for any other tensor. Raises ``RuntimeError`` when ``param`` used to belong to an
    SST layer that has since been freed or has replaced that parameter by another object: an optimizer
    built over such a tensor would train something the model no longer uses.
    """
    entry = _OWNERS.get(param)
    if entry is None:
        return None
    layer_ref, role = entry
    layer = layer_ref()
    if layer is None:
        raise RuntimeError(
            f"a parameter of shape {tuple(param.shape)} was the {role!r} of an SSTLinear that no longer exists"
        )
    if getattr(layer, role) is not param:
        raise RuntimeError(
            f"a parameter of shape {tuple(param.shape)} was {role!r} of {layer!r}, which has replaced "
            "it by a new tensor; build the optimizer over the model's current parameters"
        )
    return layer, role
