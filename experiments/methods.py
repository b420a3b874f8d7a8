"""From a run config to a (model, optimizer) pair: two small tables, no per-optimizer branching.

* :data:`PARAMETERIZATIONS` maps ``--parameterization`` to a model transform: ``dense`` (none),
  ``sst`` (``lowrank_optim.sst.convert_to_sst``), ``sltrain`` (``lowrank_optim.sltrain.convert_to_sltrain``).
* :data:`RECIPES` says, for the optimizers that need more than ``lr``/``weight_decay``/``betas``/
  ``eps``, which config fields go where: onto GaLore's projected param group
  (``lowrank_optim.lowrank_param_groups``), into extra constructor keywords, and which
  parameterization ``--parameterization auto`` picks. A registered optimizer without a recipe gets
  the plain one, plus anything in ``--optimizer_kwargs``.

Optimizers come from ``lowrank_optim``'s registry, plus :data:`BASELINE_OPTIMIZERS` for peer
packages used as benchmark baselines (``galore_torch_adamw`` = ``galore_torch.GaLoreAdamW``).

The library validates hyperparameters when a model is converted or an optimizer built, raising a
``ValueError`` that names the key (``Invalid rank: ...``); such an error, or a keyword the optimizer
does not take, becomes a :class:`~experiments.errors.UsageError` of the flag that set the key
(``--optimizer_kwargs`` for its keys).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

import lowrank_optim
import lowrank_optim.sltrain
import lowrank_optim.sst  # noqa: F401  (registers "sst_adamw")
from experiments.config import TrainConfig, flag_fields
from experiments.errors import UsageError, expected_one_of

# How the library's messages name the key at fault (lowrank_optim/validation.py: "Invalid <key>: ..."),
# and Python's own message for a keyword a constructor does not take.
_INVALID_KEY = re.compile(r"^Invalid (\w+)")
_UNEXPECTED_KEYWORD = re.compile(r"unexpected keyword argument '(\w+)'")


def _galore_torch_adamw(params, **kwargs) -> torch.optim.Optimizer:
    try:
        from galore_torch import GaLoreAdamW
    except ImportError:
        raise UsageError(
            "--optimizer", "galore_torch_adamw needs the galore_torch package (pip install galore-torch)"
        ) from None
    return GaLoreAdamW(params, **kwargs)


BASELINE_OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "galore_torch_adamw": _galore_torch_adamw,
    # The library's plain AdamW path (torch form): DCTProjAdam over model.parameters() with rank None
    # projects nothing; ``moment_bits`` (8/4) in --optimizer_kwargs quantizes its moments.
    "lowrank_plain_adamw": lambda params, **kwargs: lowrank_optim.DCTProjAdam(params, **{"rank": None, **kwargs}),
}


def available_methods() -> list[str]:
    """Every optimizer name ``--optimizer`` accepts."""
    return sorted(set(lowrank_optim.available_optimizers()) | set(BASELINE_OPTIMIZERS))


def create_optimizer(name: str, params, **kwargs) -> torch.optim.Optimizer:
    """``name`` from the baselines table or the library registry (which names the known ones)."""
    factory = BASELINE_OPTIMIZERS.get(name)
    if factory is not None:
        return factory(params, **kwargs)
    return lowrank_optim.create_optimizer(name, params, **kwargs)


@dataclass(frozen=True)
class OptimizerRecipe:
    """How config fields reach one optimizer.

    ``projection_keys``: config fields set on the projected param group (``rank`` first); empty
    means the optimizer gets ``model.parameters()``. ``keyword_fields``: ``(keyword, config field)``
    pairs passed to the constructor. ``parameterization``: the model transform for ``auto``.
    Fields whose value is ``None`` are left out, so the optimizer's own default applies.
    ``resumable``: the optimizer's state loads with ``torch.load(weights_only=True)``.
    """

    projection_keys: tuple[str, ...] = ()
    keyword_fields: tuple[tuple[str, str], ...] = ()
    parameterization: str = "dense"
    resumable: bool = True


_GALORE_KEYS = ("rank", "update_proj_gap", "scale", "proj_type")
RECIPES: dict[str, OptimizerRecipe] = {
    "galore_adamw": OptimizerRecipe(projection_keys=(*_GALORE_KEYS, "moments")),
    "galore_adamw8bit": OptimizerRecipe(projection_keys=(*_GALORE_KEYS, "moments")),
    # galore_torch keeps a projector object in its state.
    "galore_torch_adamw": OptimizerRecipe(projection_keys=_GALORE_KEYS, resumable=False),
    "dct_adamw": OptimizerRecipe(projection_keys=("rank", "update_proj_gap", "scale", "score", "moments", "proj_side")),
    "sst_adamw": OptimizerRecipe(
        keyword_fields=(("update_interval", "sst_interval"), ("seed", "seed")), parameterization="sst"
    ),
}
PLAIN_RECIPE = OptimizerRecipe()


def recipe_for(optimizer: str) -> OptimizerRecipe:
    return RECIPES.get(optimizer, PLAIN_RECIPE)


def _sst(model: nn.Module, config: TrainConfig) -> nn.Module:
    return lowrank_optim.sst.convert_to_sst(model, rank=config.rank, target_modules=tuple(config.target_modules))


def _sltrain(model: nn.Module, config: TrainConfig) -> nn.Module:
    return lowrank_optim.sltrain.convert_to_sltrain(
        model,
        rank=config.rank,
        density=config.density,
        alpha=config.alpha,
        target_modules=tuple(config.target_modules),
        seed=config.seed,
    )


PARAMETERIZATIONS: dict[str, Callable[[nn.Module, TrainConfig], nn.Module]] = {
    "dense": lambda model, config: model,
    "sst": _sst,
    "sltrain": _sltrain,
}


def resolved_parameterization(config: TrainConfig) -> str:
    """``config.parameterization``, with ``auto`` replaced by what the optimizer's recipe needs."""
    if config.parameterization == "auto":
        return recipe_for(config.optimizer).parameterization
    if config.parameterization not in PARAMETERIZATIONS:
        raise UsageError(
            "--parameterization",
            f"unknown parameterization: {expected_one_of(config.parameterization, ['auto', *PARAMETERIZATIONS])}",
        )
    return config.parameterization


def _flag_of_library_error(error: Exception, config: TrainConfig) -> UsageError:
    """``error`` of the library (or of a constructor call) as a :class:`UsageError` of the flag at fault."""
    message = str(error)
    match = _INVALID_KEY.match(message) or _UNEXPECTED_KEYWORD.search(message)
    key = match.group(1) if match else None
    if key in config.optimizer_kwargs:
        return UsageError("--optimizer_kwargs", message)
    flag = dict(recipe_for(config.optimizer).keyword_fields).get(key, key)  # SST's update_interval: --sst_interval
    if flag in {field.name for field in flag_fields()}:
        return UsageError(f"--{flag}", message)
    if config.optimizer_kwargs:
        return UsageError("--optimizer_kwargs", message)
    return UsageError("--optimizer", f"{config.optimizer}: {message}")


def apply_parameterization(model: nn.Module, config: TrainConfig) -> nn.Module:
    """The model with its target linears re-parameterized (in place) as the config asks."""
    transform = PARAMETERIZATIONS[resolved_parameterization(config)]
    try:
        return transform(model, config)
    except UsageError:
        raise
    except ValueError as error:
        raise _flag_of_library_error(error, config) from None


def optimizer_kwargs(config: TrainConfig) -> dict:
    """Constructor keywords: lr and weight decay, betas/eps when set, recipe fields, --optimizer_kwargs."""
    kwargs: dict = {"lr": config.lr, "weight_decay": config.weight_decay}
    if config.betas is not None:
        kwargs["betas"] = tuple(config.betas)
    if config.eps is not None:
        kwargs["eps"] = config.eps
    for keyword, field in recipe_for(config.optimizer).keyword_fields:
        if getattr(config, field) is not None:
            kwargs[keyword] = getattr(config, field)
    if config.step_in_backward:
        if config.gradient_accumulation is None:
            raise RuntimeError("--step_in_backward needs the resolved config (experiments.config.resolve): its "
                               "hooks must know the gradient accumulation, which is not derived yet")
        kwargs["step_in_backward"] = True       # implies backward_projection in the library
        kwargs["accumulation_steps"] = config.gradient_accumulation
    if config.backward_projection or config.step_in_backward:
        kwargs["backward_projection"] = True
        # The scaled residual needs each step's full gradient, which the mode frees in the backward
        # pass; under --step_in_backward with one backward pass per step the hook still has it.
        if config.optimizer == "dct_adamw" and not (config.step_in_backward and config.gradient_accumulation == 1):
            kwargs["residual"] = "none"
        if torch.distributed.is_initialized():
            kwargs["process_group"] = torch.distributed.group.WORLD
    return {**kwargs, **config.optimizer_kwargs}


def optimizer_params(model: nn.Module, config: TrainConfig):
    """``model.parameters()``, or GaLore's two param groups for a projected optimizer."""
    keys = recipe_for(config.optimizer).projection_keys
    if not keys:
        return model.parameters()
    projection = {key: getattr(config, key) for key in keys if key != "rank" and getattr(config, key) is not None}
    return lowrank_optim.lowrank_param_groups(
        model, target_modules=tuple(config.target_modules), rank=config.rank, **projection
    )


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer ``config.optimizer`` over ``model`` (call after :func:`apply_parameterization`)."""
    if config.optimizer not in available_methods():
        raise UsageError("--optimizer", f"unknown optimizer: {expected_one_of(config.optimizer, available_methods())}")
    try:
        return create_optimizer(config.optimizer, optimizer_params(model, config), **optimizer_kwargs(config))
    except UsageError:
        raise
    except ValueError as error:
        raise _flag_of_library_error(error, config) from None
    except TypeError as error:
        if not _UNEXPECTED_KEYWORD.search(str(error)):
            raise  # a bug, not a keyword of the user's
        raise _flag_of_library_error(error, config) from None
