"""Up-front checks of a run config: user mistakes are found before anything is built or trained.

:func:`check_config` raises :class:`~experiments.errors.UsageError` (naming the flag or file) for
a value out of range or not among its choices (:func:`experiments.config.check_values`), a name no
table knows (optimizer, dataset, parameterization, model config), a model config file that is
unreadable or (native model) whose ``max_position_embeddings`` is shorter than ``--max_length``, a
device that is not there, a ``--plain_lr`` for an optimizer without a plain param group, what
``--fsdp``, ``--backward_projection``, ``--step_in_backward`` and ``--weight_bits`` cannot train
(clipping included for the third, optimizers that cannot write int8 weights for the last), and a
``--continue_from`` that is no complete checkpoint of the right kind of a resumable optimizer. What
needs the world size (batch divisibility, warmup against the derived steps) is checked by
:func:`experiments.config.resolve`; what needs the data or the model (corpus size, the library's own
hyperparameter checks, checkpoint contents) where those are built.
"""

from __future__ import annotations

import difflib
import inspect
import re
from pathlib import Path

import torch

from experiments.checkpoint import check_checkpoint, resolve_checkpoint
from experiments.config import TrainConfig, check_values
from experiments.data import DATASETS
from experiments.distributed import check_fsdp_supported
from experiments.errors import UsageError, expected_one_of
from experiments.methods import (
    PARAMETERIZATIONS,
    available_methods,
    has_plain_group,
    info_for,
    resolved_parameterization,
)
from experiments.model import LlamaConfig
from experiments.model_factory import read_model_config
from experiments.run_folder import check_run_folder

_UNEXPECTED_KEYWORD = re.compile(r"(\w+)\.__init__\(\) got an unexpected keyword argument '(\w+)'")


def check_config(config: TrainConfig) -> None:
    """Raise :class:`UsageError` for the first mistake found in ``config`` (see the module docstring)."""
    check_values(config)
    if config.optimizer not in available_methods():
        hint = ""
        if config.optimizer in PARAMETERIZATIONS:
            hint = (f"; {config.optimizer} is a parameterization, not an optimizer: pass --parameterization "
                    f"{config.optimizer} (with --optimizer adamw, for instance)")
        raise UsageError(
            "--optimizer", f"unknown optimizer: {expected_one_of(config.optimizer, available_methods())}{hint}"
        )
    if config.plain_lr is not None and not has_plain_group(config.optimizer):
        supported = [name for name in available_methods() if has_plain_group(name)]
        raise UsageError("--plain_lr", f"sets the plain param group of an optimizer with GaLore's groups "
                         f"({', '.join(supported)}); got optimizer {config.optimizer!r}, which trains every "
                         f"parameter in one group at --lr")
    if config.dataset not in DATASETS:
        raise UsageError("--dataset", f"unknown dataset: {expected_one_of(config.dataset, DATASETS)}")
    parameterization = resolved_parameterization(config)
    _check_model_config(config)
    if config.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device", "cuda was asked for but torch sees no CUDA device; expected auto or cpu here")
    if config.fsdp:
        check_fsdp_supported(config.optimizer, parameterization)
    if config.step_in_backward:
        _check_step_in_backward(config, parameterization)
    elif config.backward_projection:
        _check_backward_projection(config, parameterization)
    if config.weight_bits is not None:
        _check_weight_bits(config)
    for flag in ("save_dir", "cache_dir"):
        path = getattr(config, flag)
        if path is not None and Path(path).exists() and not Path(path).is_dir():
            raise UsageError(f"--{flag}", f"{path} is a file; expected a directory (or a path to create one at)")
    if config.continue_from:
        _check_resume(config)
    check_run_folder(config)


def _check_model_config(config: TrainConfig) -> None:
    """The model config file is readable and, for the native model (whose rotary tables end there),
    its positions cover ``max_length``."""
    values = read_model_config(config.model_config)
    positions = values.get("max_position_embeddings", LlamaConfig.max_position_embeddings)
    if config.model_impl == "native" and config.max_length > positions:
        raise UsageError(
            "--max_length",
            f"expected at most the {positions} positions (max_position_embeddings) of model config "
            f"{config.model_config!r}, got {config.max_length}",
        )


def _check_resume(config: TrainConfig) -> None:
    """``continue_from`` names a complete checkpoint of the kind the run writes, of a resumable optimizer."""
    if not info_for(config.optimizer).resumable:
        raise UsageError(
            "--continue_from",
            f"runs of {config.optimizer} cannot be resumed: its optimizer state holds Python objects, which "
            "torch.load(weights_only=True) refuses",
        )
    check_checkpoint(resolve_checkpoint(config.continue_from), sharded=config.fsdp)


def _check_backward_projection(config: TrainConfig, parameterization: str, flag: str = "--backward_projection") -> None:
    """``--backward_projection`` (or ``flag``, a mode that implies it) projects gradients of the
    library's projected optimizers, on dense weights, without FSDP2 (which reduce-scatters full
    gradients itself): those whose ``OptimizerInfo.backward_projection`` is set, and for
    ``--backward_projection`` itself not ``full_gradient`` (APOLLO)."""
    alone = flag == "--backward_projection"
    if alone and info_for(config.optimizer).full_gradient:
        raise UsageError(flag, f"{config.optimizer}'s update scales each step's full gradient, which "
                         "--backward_projection frees in the backward pass; train with the standard loop, or "
                         "with --step_in_backward --grad_clipping 0 (whose hooks still have it)")
    supported = [name for name in available_methods()
                 if info_for(name).backward_projection and not (alone and info_for(name).full_gradient)]
    if config.optimizer not in supported or parameterization != "dense":
        raise UsageError(flag, f"needs the optimizer {' or '.join(supported)} "
                         f"on the dense parameterization; got optimizer {config.optimizer!r}, parameterization "
                         f"{parameterization!r}")
    if config.fsdp and alone:
        raise UsageError(flag, "cannot be combined with --fsdp (FSDP2 reduce-scatters full "
                         "gradients); under torchrun the optimizer all-reduces the projected gradients itself")
    if config.fsdp:
        raise UsageError(flag, "cannot be combined with --fsdp in this script yet (the optimizers step under "
                         "FSDP2 in its hooks, docs/memory-modes.md, but the script does not drive FSDP2's no-sync "
                         "accumulation for it); under torchrun without --fsdp the optimizer all-reduces the projected "
                         "gradients itself")


def _check_weight_bits(config: TrainConfig) -> None:
    """``--weight_bits 8`` needs an optimizer that writes int8 weights (``OptimizerInfo.int8_weights``:
    the library's; ``torch.optim.AdamW`` and the peers fail on them) and no FSDP2 (the library
    refuses sharded int8 weights)."""
    supported = [name for name in available_methods() if info_for(name).int8_weights]
    if config.optimizer not in supported:
        raise UsageError("--weight_bits", f"8 needs an optimizer that updates int8 weights (stochastic rounding "
                         f"through lowrank_optim.weights): {', '.join(supported)}; got {config.optimizer!r} "
                         f"({info_for(config.optimizer).label}), which cannot write into them")
    if config.fsdp:
        raise UsageError("--weight_bits", "8 cannot be combined with --fsdp (FSDP2-sharded int8 weights are not "
                         "supported: the rounding noise of a shard's rows would need their global offset); "
                         "under torchrun without --fsdp the replicas use DDP")


def _check_step_in_backward(config: TrainConfig, parameterization: str) -> None:
    """``--step_in_backward`` implies backward projection (same optimizers, parameterization, no
    FSDP2) and updates every parameter inside the backward pass, before a global gradient norm
    exists: no clipping."""
    _check_backward_projection(config, parameterization, flag="--step_in_backward")
    if config.grad_clipping > 0:
        raise UsageError("--step_in_backward", f"cannot be combined with --grad_clipping {config.grad_clipping:g} "
                         "(clipping is on by default): clipping needs the global gradient norm before any update, "
                         "but this mode updates each parameter inside the backward pass; pass --grad_clipping 0 to "
                         "train without clipping, or use --backward_projection alone to clip")


def _constructor_keywords(class_name: str) -> list[str] | None:
    """The keyword arguments of the optimizer class ``class_name`` (found in lowrank_optim, its SST
    module or torch.optim), or ``None`` when it is not found there."""
    import lowrank_optim
    import lowrank_optim.sst

    for module in (lowrank_optim, lowrank_optim.sst, torch.optim):
        cls = getattr(module, class_name, None)
        if inspect.isclass(cls):
            parameters = inspect.signature(cls.__init__).parameters.values()
            kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
            return [p.name for p in parameters if p.kind in kinds and p.name not in ("self", "params")]
    return None


def explain_optimizer_keyword(error: Exception, config: TrainConfig) -> Exception:
    """``error`` of building the optimizer; a keyword of ``--optimizer_kwargs`` that the constructor does
    not take becomes one :class:`UsageError` naming the key and the keys accepted."""
    match = _UNEXPECTED_KEYWORD.search(str(error))
    if not match or match.group(2) not in config.optimizer_kwargs:
        return error
    class_name, key = match.groups()
    accepted = _constructor_keywords(class_name)
    message = f"unknown key {key!r} for --optimizer {config.optimizer} ({class_name})"
    if accepted:
        close = difflib.get_close_matches(key, accepted, n=1)
        message += f"; accepted keys: {', '.join(accepted)}" + (f" (did you mean {close[0]!r}?)" if close else "")
    return UsageError("--optimizer_kwargs", message)
