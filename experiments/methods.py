"""From a run config to a (model, optimizer) pair: no per-optimizer branching.

* :data:`PARAMETERIZATIONS` maps ``--parameterization`` to a model transform: ``dense`` (none),
  ``sst`` (``lowrank_optim.sst.convert_to_sst``), ``sltrain`` (``lowrank_optim.sltrain.convert_to_sltrain``).
* What each optimizer needs beyond ``lr``/``weight_decay``/``betas``/``eps`` comes from the
  library's registry (:func:`lowrank_optim.registry.optimizer_info`): which config fields go onto
  GaLore's projected param group (``lowrank_optim.lowrank_param_groups``), which into constructor
  keywords, and which parameterization ``--parameterization auto`` picks; plus anything in
  ``--optimizer_kwargs``.

Optimizer names are the registry's, plus :data:`PEER_OPTIMIZERS`, the one place that extends it
with the peer packages used as benchmark baselines (``galore_torch_adamw`` =
``galore_torch.GaLoreAdamW``; ``torchao_adamw8bit``/``torchao_adamw4bit`` = ``torchao.optim``'s;
``apollo_torch_adamw``/``apollo_torch_mini`` = apollo-torch's APOLLO and APOLLO-Mini, benchmark only
under its non-commercial licence), the library's float64 reference of APOLLO as a slow diagnostic
(``reference_apollo`` = :class:`lowrank_optim.reference.ReferenceAPOLLOAdamW`, e.g. with
``--optimizer_kwargs '{"proj": "identity"}'``: APOLLO's rule with exact scaling factors) and the old name
``lowrank_plain_adamw`` of the library's plain AdamW path.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

import lowrank_optim
import lowrank_optim.sltrain
import lowrank_optim.sst  # noqa: F401  (registers "sst_adamw")
from experiments.config import TrainConfig, flag_fields
from experiments.errors import UsageError, expected_one_of
from lowrank_optim.reference import ReferenceAPOLLOAdamW
from lowrank_optim.registry import OptimizerInfo, optimizer_info, plain_adamw
from lowrank_optim.validation import InvalidHyperparameter

# Python's own message for a keyword a constructor does not take (a TypeError carries no key).
_UNEXPECTED_KEYWORD = re.compile(r"unexpected keyword argument '(\w+)'")


def _galore_torch_adamw(params, **kwargs) -> torch.optim.Optimizer:
    try:
        from galore_torch import GaLoreAdamW
    except ImportError:
        raise UsageError(
            "--optimizer", "galore_torch_adamw needs the galore_torch package (pip install galore-torch)"
        ) from None
    return GaLoreAdamW(params, **kwargs)


def _torchao(name: str) -> Callable[..., torch.optim.Optimizer]:
    def factory(params, **kwargs) -> torch.optim.Optimizer:
        try:
            import torchao.optim
        except ImportError:
            raise UsageError("--optimizer", f"torchao_{name.lower()} needs the torchao package") from None
        return getattr(torchao.optim, name)(params, **kwargs)

    return factory


# apollo-torch's param-group keys of its two published configurations (its README); the script's
# --scale (GaLore's 0.25) is not theirs, so it is not forwarded, as for the library's APOLLO.
APOLLO_TORCH_GROUPS = {
    "apollo_torch_adamw": {"proj": "random", "scale_type": "channel", "scale": 1.0},
    "apollo_torch_mini": {"proj": "random", "scale_type": "tensor", "scale": 128.0, "rank": 1},
}


def _apollo_torch_module():
    """apollo-torch's ``apollo_torch.apollo`` alone: its package ``__init__`` imports bitsandbytes (kernel
    loading noise, CUDA extras), so an empty package module stands in for it, as in tests/support/oracles.py."""
    if "apollo_torch" not in sys.modules:
        spec = importlib.util.find_spec("apollo_torch")
        if spec is None:
            raise UsageError("--optimizer", "apollo_torch_adamw/apollo_torch_mini need the apollo-torch package "
                             "(pip install --no-deps apollo-torch==1.0.3; non-commercial licence: benchmark only)")
        shell = types.ModuleType("apollo_torch")
        shell.__path__ = list(spec.submodule_search_locations)
        sys.modules["apollo_torch"] = shell
    return importlib.import_module("apollo_torch.apollo")


def _apollo_torch(name: str) -> Callable[..., torch.optim.Optimizer]:
    def factory(params, **kwargs) -> torch.optim.Optimizer:
        groups = [{**group, **APOLLO_TORCH_GROUPS[name]} if "rank" in group else group for group in params]
        return _apollo_torch_module().AdamW(groups, **kwargs)

    return factory


@dataclass(frozen=True)
class Peer:
    """An optimizer the library does not register (another package's, or an old name): its factory
    ``factory(params, **kwargs)`` and its :class:`~lowrank_optim.registry.OptimizerInfo`."""

    factory: Callable[..., torch.optim.Optimizer]
    info: OptimizerInfo


PEER_OPTIMIZERS: dict[str, Peer] = {
    # galore_torch keeps a projector object in its state: not loadable with weights_only=True.
    "galore_torch_adamw": Peer(_galore_torch_adamw, OptimizerInfo(
        "galore_torch GaLoreAdamW (peer)", ("rank", "update_proj_gap", "scale", "proj_type"), resumable=False)),
    **{f"torchao_adamw{bits}bit": Peer(_torchao(f"AdamW{bits}bit"), OptimizerInfo(f"torchao AdamW{bits}bit (peer)"))
       for bits in (8, 4)},
    # apollo-torch keeps a projector object and an int seed in its state: not loadable with weights_only=True.
    "apollo_torch_adamw": Peer(_apollo_torch("apollo_torch_adamw"), OptimizerInfo(
        "apollo-torch APOLLO (peer)", ("rank", "update_proj_gap", "proj_type"), resumable=False)),
    "apollo_torch_mini": Peer(_apollo_torch("apollo_torch_mini"), OptimizerInfo(
        "apollo-torch APOLLO-Mini (peer)", ("rank", "update_proj_gap", "proj_type"), resumable=False)),
    # The reference rule in the training loop (one Python step per parameter): a diagnostic, not a peer.
    "reference_apollo": Peer(ReferenceAPOLLOAdamW, OptimizerInfo(
        "APOLLO (float64 reference's rule, diagnostic)", ("rank", "update_proj_gap", "proj_type", "moments"))),
    # The old name of the library's plain path (``adamw8bit``/``adamw4bit`` with float moments by default).
    "lowrank_plain_adamw": Peer(plain_adamw, OptimizerInfo("AdamW (library plain path)", int8_weights=True)),
}


def available_methods() -> list[str]:
    """Every optimizer name ``--optimizer`` accepts."""
    return sorted(set(lowrank_optim.available_optimizers()) | set(PEER_OPTIMIZERS))


def info_for(name: str) -> OptimizerInfo:
    """:class:`~lowrank_optim.registry.OptimizerInfo` of ``name`` (peer or library)."""
    return PEER_OPTIMIZERS[name].info if name in PEER_OPTIMIZERS else optimizer_info(name)


def create_optimizer(name: str, params, **kwargs) -> torch.optim.Optimizer:
    """``name`` from the peers or the library registry (which names the known ones)."""
    if name in PEER_OPTIMIZERS:
        return PEER_OPTIMIZERS[name].factory(params, **kwargs)
    return lowrank_optim.create_optimizer(name, params, **kwargs)


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
    """``config.parameterization``, with ``auto`` replaced by what the optimizer needs."""
    if config.parameterization == "auto":
        return info_for(config.optimizer).parameterization
    if config.parameterization not in PARAMETERIZATIONS:
        raise UsageError(
            "--parameterization",
            f"unknown parameterization: {expected_one_of(config.parameterization, ['auto', *PARAMETERIZATIONS])}",
        )
    return config.parameterization


def _key_of(error: Exception) -> str | None:
    """The hyperparameter ``error`` is about: ``.key`` of the library's :class:`InvalidHyperparameter`,
    or the keyword of Python's own TypeError for a keyword a constructor does not take."""
    if isinstance(error, InvalidHyperparameter):
        return error.key
    match = _UNEXPECTED_KEYWORD.search(str(error)) if isinstance(error, TypeError) else None
    return match.group(1) if match else None


def _flag_of_library_error(error: Exception, config: TrainConfig) -> UsageError:
    """``error`` of the library (or of a constructor call) as a :class:`UsageError` of the flag at fault."""
    message = str(error)
    key = _key_of(error)
    if key in config.optimizer_kwargs:
        return UsageError("--optimizer_kwargs", message)
    flag = dict(info_for(config.optimizer).config_keywords).get(key, key)  # SST's update_interval: --sst_interval
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
    """Constructor keywords: lr and weight decay, betas/eps when set, the optimizer's config keywords,
    --optimizer_kwargs."""
    kwargs: dict = {"lr": config.lr, "weight_decay": config.weight_decay}
    if config.betas is not None:
        kwargs["betas"] = tuple(config.betas)
    if config.eps is not None:
        kwargs["eps"] = config.eps
    for keyword, field in info_for(config.optimizer).config_keywords:
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


def projection_rank(config: TrainConfig) -> int | float:
    """The projected group's rank: the optimizer's own (APOLLO-Mini's 1), else ``--rank``."""
    own = info_for(config.optimizer).projection_rank
    return config.rank if own is None else own


def has_plain_group(name: str) -> bool:
    """Whether the optimizer ``name`` gets GaLore's groups, hence a plain group that ``--plain_lr`` sets."""
    return bool(info_for(name).projection_keys)


def optimizer_params(model: nn.Module, config: TrainConfig):
    """``model.parameters()``, or GaLore's two param groups (named parameters) for a projected optimizer:
    the ``--target_modules`` linears projected, everything else plain, at ``--plain_lr`` when it is set
    (the group's own ``lr``, which the scheduler multiplies like the projected group's)."""
    if not has_plain_group(config.optimizer):
        return model.parameters()
    keys = info_for(config.optimizer).projection_keys
    projection = {key: getattr(config, key) for key in keys if key != "rank" and getattr(config, key) is not None}
    projected, *rest = lowrank_optim.lowrank_param_groups(
        model, target_modules=tuple(config.target_modules), rank=projection_rank(config), **projection
    )
    plain_lr = {} if config.plain_lr is None else {"lr": config.plain_lr}
    if config.optimizer in PEER_OPTIMIZERS:      # the peers take a group without "rank" as plain
        return [projected, *({**group, **plain_lr} for group in rest)]
    # the library's DCTProjAdam and APOLLO would project the 2-D weights of a group without its own rank
    # (their default rule), e.g. the attention linears under --target_modules mlp: rank=None keeps them plain
    return [projected, *({**group, "rank": None, **plain_lr} for group in rest)]


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
