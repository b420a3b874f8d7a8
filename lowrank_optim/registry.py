"""Optimizers by name: ``create_optimizer("dct_adamw", model.parameters(), lr=1e-3)``.

Each optimizer class registers itself with :func:`register_optimizer`; the training script and the
benchmarks look names up here, never through an if/elif chain. :func:`optimizer_info` says what a
caller needs to know to build one from a training config (:class:`OptimizerInfo`): the library's
names are described in :data:`_INFO` below, the one table of them; another registration passes its
own ``info``.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

OptimizerFactory = Callable[..., torch.optim.Optimizer]


@dataclass(frozen=True)
class OptimizerInfo:
    """How to build a registered optimizer, beyond ``lr``/``weight_decay``/``betas``/``eps``.

    ``label``: its name in tables. ``projection_keys``: the keys of the projected param group of
    :func:`lowrank_optim.lowrank_param_groups` it takes (``rank`` first); empty: it takes
    ``model.parameters()``. ``projection_rank``: the projected group's rank whatever the config's
    says (APOLLO-Mini: 1); None: the config's. ``config_keywords``: ``(constructor keyword, training-config field)``
    pairs. ``parameterization``: the model transform it trains (``dense``: none; ``sst``:
    :func:`lowrank_optim.convert_to_sst`). ``fsdp``: it steps FSDP2's DTensor shards
    (:mod:`lowrank_optim.sharding`). ``backward_projection``: it takes ``step_in_backward=True`` and,
    unless ``full_gradient``, ``backward_projection=True``. ``full_gradient``: its projected update reads
    each step's full gradient (APOLLO scales it), which ``backward_projection=True`` alone frees in the
    backward pass. ``resumable``: its state loads with ``torch.load(weights_only=True)``.
    ``int8_weights``: it steps int8 weights (:mod:`lowrank_optim.weights`, stochastic rounding
    through each parameter's plan); ``torch.optim.AdamW`` and the peers do not (``aten.mul_`` fails).
    """

    label: str
    projection_keys: tuple[str, ...] = ()
    projection_rank: int | None = None
    config_keywords: tuple[tuple[str, str], ...] = ()
    parameterization: str = "dense"
    fsdp: bool = False
    backward_projection: bool = False
    full_gradient: bool = False
    resumable: bool = True
    int8_weights: bool = False


GALORE_KEYS = ("rank", "update_proj_gap", "scale", "proj_type", "moments")
DCT_KEYS = ("rank", "update_proj_gap", "scale", "score", "moments", "proj_side")
# APOLLO's own scale default (1; Mini 128) is the paper's: the script's --scale (GaLore's 0.25) is not forwarded
APOLLO_KEYS = ("rank", "update_proj_gap", "proj_type", "moments")

_INFO: dict[str, OptimizerInfo] = {
    "adamw": OptimizerInfo("AdamW (torch.optim)", fsdp=True),
    "adamw8bit": OptimizerInfo("AdamW, 8-bit moments (library plain path)", int8_weights=True),
    "adamw4bit": OptimizerInfo("AdamW, 4-bit moments (library plain path)", int8_weights=True),
    "galore_adamw": OptimizerInfo("GaLoreAdamW", GALORE_KEYS, fsdp=True, backward_projection=True, int8_weights=True),
    "galore_adamw8bit": OptimizerInfo("GaLoreAdamW8bit", GALORE_KEYS, int8_weights=True),
    "dct_adamw": OptimizerInfo("DCTProjAdam", DCT_KEYS, fsdp=True, backward_projection=True, int8_weights=True),
    "apollo_adamw": OptimizerInfo("APOLLO", APOLLO_KEYS, fsdp=True, backward_projection=True, full_gradient=True,
                                  int8_weights=True),
    # GaLore's groups (named, the config's target modules, gap, side and moments policy) at rank 1, as
    # apollo-torch's published APOLLO-Mini; its scale 128 and tensor scaling are the class's defaults
    "apollo_mini": OptimizerInfo("APOLLO-Mini", APOLLO_KEYS, projection_rank=1, fsdp=True, backward_projection=True,
                                 full_gradient=True, int8_weights=True),
    "sst_adamw": OptimizerInfo("SST", config_keywords=(("update_interval", "sst_interval"), ("seed", "seed")),
                               parameterization="sst", int8_weights=True),
}
_REGISTRY: dict[str, OptimizerFactory] = {}


def register_optimizer(name: str, factory: OptimizerFactory, info: OptimizerInfo | None = None) -> None:
    """Make ``factory(params, **kwargs)`` available as ``create_optimizer(name, ...)``; ``info``
    describes it (default: a plain optimizer labelled ``name``; the library's own are in ``_INFO``)."""
    if name in _REGISTRY and _REGISTRY[name] is not factory:
        raise ValueError(f"optimizer name {name!r} is already registered to {_REGISTRY[name]!r}")
    _REGISTRY[name] = factory
    if info is not None:
        _INFO[name] = info


def available_optimizers() -> list[str]:
    """The registered names, sorted."""
    return sorted(_REGISTRY)


def optimizer_info(name: str) -> OptimizerInfo:
    """How ``name`` is built (:class:`OptimizerInfo`)."""
    return _INFO.get(name) or OptimizerInfo(label=name)


def create_optimizer(name: str, params: Iterable, **kwargs) -> torch.optim.Optimizer:
    """Build the optimizer registered as ``name`` over ``params`` with ``kwargs``."""
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown optimizer {name!r}; known optimizers: {', '.join(available_optimizers())}"
        ) from None
    return factory(params, **kwargs)


def plain_adamw(params: Iterable, **kwargs) -> torch.optim.Optimizer:
    """The library's plain AdamW: ``DCTProjAdam`` projecting nothing (``rank=None``), whose
    ``moment_bits`` (None, 8 or 4) quantizes every moment; same update as ``torch.optim.AdamW``."""
    with warnings.catch_warnings():  # "no parameter is projected ... this is plain AdamW": intended
        warnings.filterwarnings("ignore", message=".*no parameter is projected")
        return create_optimizer("dct_adamw", params, **{"rank": None, **kwargs})


register_optimizer("adamw", torch.optim.AdamW)
register_optimizer("adamw8bit", lambda params, **kwargs: plain_adamw(params, **{"moment_bits": 8, **kwargs}))
register_optimizer("adamw4bit", lambda params, **kwargs: plain_adamw(params, **{"moment_bits": 4, **kwargs}))
