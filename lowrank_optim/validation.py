"""Hyperparameter and gradient checks shared by every optimizer of the library.

Each check raises :class:`InvalidHyperparameter` (a ``ValueError``) whose message names the
hyperparameter and the offending value, before anything is modified; the error also carries them as
``.key`` and ``.value``, so that a caller (the training script) can name its own flag for the key
without reading the message.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from numbers import Real

import torch


class InvalidHyperparameter(ValueError):
    """A hyperparameter's value refused: ``key`` as the constructor or param group spells it
    (``betas`` for ``betas[1]``), ``value`` the value given; the message is ``str(error)``."""

    def __init__(self, key: str, value, message: str) -> None:
        super().__init__(message)
        self.key = key
        self.value = value

    def __reduce__(self):  # ValueError's pickling would call __init__ with the message alone
        return type(self), (self.key, self.value, str(self))


def _is_real(value) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def check_lr(lr) -> None:
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1:
            raise InvalidHyperparameter("lr", lr, (
                f"Invalid lr: a tensor lr must hold one value, got shape {tuple(lr.shape)}"))
        lr = lr.item()
    if not _is_real(lr) or not math.isfinite(lr) or lr < 0.0:
        raise InvalidHyperparameter("lr", lr, f"Invalid lr: {lr!r} (expected a finite number >= 0)")


def check_betas(betas) -> None:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise InvalidHyperparameter("betas", betas, f"Invalid betas: {betas!r} (expected a pair (beta1, beta2))")
    for i, beta in enumerate(betas):
        if not _is_real(beta) or not 0.0 <= beta < 1.0:
            raise InvalidHyperparameter("betas", betas, f"Invalid betas[{i}]: {beta!r} (expected 0 <= beta < 1)")


def check_eps(eps) -> None:
    if not _is_real(eps) or not math.isfinite(eps) or eps < 0.0:
        raise InvalidHyperparameter("eps", eps, f"Invalid eps: {eps!r} (expected a finite number >= 0)")


def check_weight_decay(weight_decay) -> None:
    if not _is_real(weight_decay) or not math.isfinite(weight_decay) or weight_decay < 0.0:
        raise InvalidHyperparameter("weight_decay", weight_decay, (
            f"Invalid weight_decay: {weight_decay!r} (expected a finite number >= 0)"))


def check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidHyperparameter(name, value, f"Invalid {name}: {value!r} (expected an integer >= 1)")


def check_positive_real(name: str, value) -> None:
    if not _is_real(value) or not math.isfinite(value) or value <= 0.0:
        raise InvalidHyperparameter(name, value, f"Invalid {name}: {value!r} (expected a finite number > 0)")


def check_choice(name: str, value, choices: Iterable) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise InvalidHyperparameter(name, value, (
            f"Invalid {name}: {value!r} (expected one of {', '.join(map(repr, choices))})"))


def check_float_dtype_or_none(name: str, dtype) -> None:
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise InvalidHyperparameter(name, dtype, f"Invalid {name}: {dtype!r} (expected None or a floating torch.dtype)")


def check_adamw_hyperparameters(group: dict) -> None:
    """The keys every AdamW-family group carries: lr, betas, eps, weight_decay."""
    check_lr(group["lr"])
    check_betas(group["betas"])
    check_eps(group["eps"])
    check_weight_decay(group["weight_decay"])


def check_dense_real_grad(grad: torch.Tensor, name: str) -> None:
    """Reject gradients the optimizers cannot handle, naming the parameter."""
    if grad.is_sparse:
        raise RuntimeError(f"{name}: sparse gradients are not supported (use torch.optim.SparseAdam)")
    if grad.is_complex():
        raise RuntimeError(f"{name}: complex gradients are not supported (optimize torch.view_as_real views)")


def check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise InvalidHyperparameter(name, value, f"Invalid {name}: {value!r} (expected True or False)")


# Keys torch.optim.lr_scheduler adds to param groups: a group carrying them (one taken from another
# optimizer's param_groups) is accepted.
SCHEDULER_GROUP_KEYS = ("initial_lr", "max_lr", "min_lr", "base_momentum", "max_momentum")


def check_group_keys(group: dict, accepted, owner: str) -> None:
    """:class:`InvalidHyperparameter` naming the first key of ``group`` that ``owner`` does not know, with the list
    of accepted keys (a misspelt ``update_proj_gapp`` must not train silently at the default)."""
    known = set(accepted) | {"params", "param_names", *SCHEDULER_GROUP_KEYS}
    unknown = sorted(key for key in group if key not in known)
    if unknown:
        raise InvalidHyperparameter(unknown[0], group[unknown[0]], (
            f"Invalid param group key {unknown[0]!r} for {owner} (accepted keys: "
            f"{', '.join(sorted(set(accepted) | {'params'}))})"))


def check_torch_keywords(*, foreach, fused, maximize, capturable, differentiable) -> None:
    """The common ``torch.optim`` keywords: ``foreach`` (None or a bool) and ``maximize`` are
    implemented; ``fused=True``, ``capturable=True`` and ``differentiable=True`` cannot be honoured
    and are refused rather than ignored."""
    if foreach is not None:
        check_bool("foreach", foreach)
    check_bool("maximize", maximize)
    if fused not in (None, False):
        raise InvalidHyperparameter("fused", fused, (
            f"Invalid fused: {fused!r} (torch's fused AdamW kernel cannot run a projected step; "
            "the projected step is fused by backend='triton', the default 'auto' on CUDA)"))
    if capturable is not False:
        raise InvalidHyperparameter("capturable", capturable, (
            f"Invalid capturable: {capturable!r} (CUDA-graph capture is not supported: a refresh "
            "step changes shapes and sorts on the host; pass capturable=False)"))
    if differentiable is not False:
        raise InvalidHyperparameter("differentiable", differentiable, (
            f"Invalid differentiable: {differentiable!r} (the step is not differentiable: it runs "
            "under no_grad; pass differentiable=False)"))


def param_label(key: str, param: torch.Tensor) -> str:
    """How errors name a parameter: ``parameter <name or position> (shape (m, n))``."""
    return f"parameter {key} (shape {tuple(param.shape)})"
