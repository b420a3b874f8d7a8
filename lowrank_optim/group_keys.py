"""The param-group keys every projected optimizer shares, and their checks.

:class:`~lowrank_optim.engine.ProjectedAdamW` runs :func:`check_shared_group_keys` on each group it
adds (the subclass checks its own keys); a bad value raises
:class:`~lowrank_optim.validation.InvalidHyperparameter` naming the key and the value, and the group
is not added. An update rule's own keys (:attr:`lowrank_optim.rules.UpdateRule.defaults`) are
checked here too (:meth:`~lowrank_optim.rules.UpdateRule.check`); a group without them gets the
rule's defaults.
"""
from __future__ import annotations

from .kernels.backend import check_backend
from .quantization import check_moment_bits, check_moment_block_size
from .residual import RESIDUALS
from .rules import RULES
from .validation import (
    InvalidHyperparameter,
    check_adamw_hyperparameters,
    check_bool,
    check_choice,
    check_float_dtype_or_none,
    check_positive_int,
    check_positive_real,
    check_torch_keywords,
)

MOMENT_POLICIES = ("keep", "reset", "transport")
BIAS_CORRECTIONS = ("step", "slot")
TORCH_KEYWORDS = ("foreach", "maximize", "capturable", "differentiable", "fused")


def rule_keys() -> set[str]:
    """The group keys of every registered update rule."""
    return {key for rule in RULES.values() for key in rule.defaults}


def check_shared_group_keys(group: dict) -> None:
    """Check the shared keys of ``group`` (module doc); fills in its rule's default options."""
    check_adamw_hyperparameters(group)
    check_torch_keywords(**{key: group[key] for key in TORCH_KEYWORDS})
    check_positive_int("update_proj_gap", group["update_proj_gap"])
    check_positive_real("scale", group["scale"])
    check_choice("moments", group["moments"], MOMENT_POLICIES)
    check_float_dtype_or_none("moments_dtype", group["moments_dtype"])
    try:
        check_backend(group["backend"])          # lowrank_optim.kernels knows nothing of the library's errors
    except ValueError as error:
        raise InvalidHyperparameter("backend", group["backend"], str(error)) from None
    check_choice("bias_correction", group["bias_correction"], BIAS_CORRECTIONS)
    check_choice("residual", group["residual"], RESIDUALS)
    check_moment_bits(group["moment_bits"])
    check_moment_block_size(group["moment_block_size"])
    check_bool("bf16_stochastic_round", group["bf16_stochastic_round"])
    check_choice("update_rule", group["update_rule"], tuple(RULES))
    rule = RULES[group["update_rule"]]
    for key, default in rule.defaults.items():
        group.setdefault(key, default)
    rule.check(group)
