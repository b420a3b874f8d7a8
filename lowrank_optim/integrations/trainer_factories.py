"""Optimizer factories for the Hugging Face ``Trainer``'s ``optimizer_cls_and_kwargs``.

transformers 5 treats anything that is not a ``torch.optim.Optimizer`` subclass as a factory and
builds the optimizer as ``Factory()(model, **kwargs)`` (``Trainer.create_optimizer``, as for Muon
and Dion). Every factory here gives the optimizer the model's *trainable, named* parameters, so
the name-based rules apply (embeddings and ``lm_head`` are recognised by name, errors and
``refresh_stats`` name parameters)::

    trainer = Trainer(model=model, args=args, optimizer_cls_and_kwargs=trainer_optimizer("dct_adamw", lr=1e-3))

What the ``Trainer`` does not pass: with a factory, ``TrainingArguments.learning_rate``,
``adam_beta1/2``, ``adam_epsilon`` and ``weight_decay`` are not used (the ``kwargs`` are the whole
configuration; unset keys take the optimizer's defaults, except ``lr``, which is required so that
it cannot be lost silently), and its weight-decay split (no decay on biases and norms) is not
applied: ``weight_decay`` applies to every parameter of a group, as in
``torch.optim.AdamW(model.parameters(), weight_decay=...)``. The schedule scales the ``lr`` given here.

A new optimizer of the library (e.g. a low-bit variant registered with
:func:`~lowrank_optim.register_optimizer`) gets a factory by subclassing the one whose parameter
layout it shares, with its registry ``name``, and one line in :data:`TRAINER_FACTORIES`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from ..modules import TargetModules
from ..param_groups import lowrank_param_groups
from ..registry import create_optimizer
from ..selection import embedding_table_names
from ..sst import sst_layers


def trainable_named_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` for every parameter of ``model`` with ``requires_grad`` (tied ones once)."""
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


class TrainerOptimizerFactory:
    """``Factory()(model, **kwargs)``: the optimizer registered as :attr:`name`, built over
    :meth:`param_groups` with the remaining ``kwargs``, which must include ``lr``."""

    name: ClassVar[str]

    def __call__(self, model: nn.Module, **kwargs: Any) -> torch.optim.Optimizer:
        if "lr" not in kwargs:
            raise ValueError(
                f"Invalid kwargs: {kwargs!r} has no 'lr' (the Trainer does not pass TrainingArguments.learning_rate "
                "to an optimizer factory; give it here)"
            )
        params = self.param_groups(model, kwargs)
        return create_optimizer(self.name, params, **kwargs)

    def param_groups(self, model: nn.Module, kwargs: dict[str, Any]) -> list:
        """What the optimizer is given; may take (pop) the factory's own keys from ``kwargs``."""
        return trainable_named_parameters(model)


class AdamWFactory(TrainerOptimizerFactory):
    """``torch.optim.AdamW`` over the trainable named parameters (every ``kwargs`` key is AdamW's)."""

    name = "adamw"


class DCTProjAdamFactory(TrainerOptimizerFactory):
    """:class:`~lowrank_optim.DCTProjAdam` over the trainable named parameters: its default rule
    projects every 2-D parameter but the embedding and the output head; the parameters of the
    model's ``nn.Embedding`` modules (and a head tied to one) get a group with ``rank=None``.

    The factory's own key ``target_modules`` (default ``None``: the rule above, over every
    parameter) restricts projection to the weights of the ``nn.Linear`` modules it selects
    (:mod:`lowrank_optim.modules`: name parts, a regular expression or ``"all-linear"``); they keep
    the default rule and ``rank``, every other parameter gets a group with ``rank=None`` (plain
    AdamW). All other keys are ``DCTProjAdam``'s.
    """

    name = "dct_adamw"

    def param_groups(self, model: nn.Module, kwargs: dict[str, Any]) -> list:
        target_modules: TargetModules | None = kwargs.pop("target_modules", None)
        if target_modules is None:
            tables = embedding_table_names(model)
            named = trainable_named_parameters(model)
            groups = [{"params": [(n, p) for n, p in named if n not in tables]},
                      {"params": [(n, p) for n, p in named if n in tables], "rank": None}]
            return [group for group in groups if group["params"]]
        selected, *rest = lowrank_param_groups(model, target_modules)
        return [{"params": selected["params"]}] + [{"params": group["params"], "rank": None} for group in rest]


class GaLoreAdamWFactory(TrainerOptimizerFactory):
    """:class:`~lowrank_optim.GaLoreAdamW` projecting the linears ``target_modules`` selects
    (:func:`~lowrank_optim.lowrank_param_groups`); every other trainable parameter gets AdamW.

    The factory's own keys and their defaults, those of ``TrainingArguments(optim="galore_adamw")``
    except the targets (which it requires): ``target_modules=("attn", "mlp")`` (Hugging Face
    LLaMA's attention and MLP projections), ``rank=128``, ``update_proj_gap=200``, ``scale=0.25``,
    ``proj_type="std"``. All other keys are ``GaLoreAdamW``'s (``lr``, ``betas``, ``eps=1e-6``,
    ``weight_decay``, ``moments``, ``residual``, ...).
    """

    name = "galore_adamw"
    defaults: ClassVar[dict[str, Any]] = {"update_proj_gap": 200, "scale": 0.25, "proj_type": "std"}

    def param_groups(self, model: nn.Module, kwargs: dict[str, Any]) -> list:
        target_modules: TargetModules = kwargs.pop("target_modules", ("attn", "mlp"))
        rank = kwargs.pop("rank", 128)
        for key, value in self.defaults.items():
            kwargs.setdefault(key, value)
        return lowrank_param_groups(model, target_modules, rank=rank)


class GaLoreAdamW8bitFactory(GaLoreAdamWFactory):
    """:class:`~lowrank_optim.GaLoreAdamW8bit` (8-bit moments for projected and plain parameters),
    with :class:`GaLoreAdamWFactory`'s targets and defaults; the other keys are ``GaLoreAdamW8bit``'s
    (``weight_decay=1e-2`` and ``eps=1e-8`` by default, as ``galore_torch``'s)."""

    name = "galore_adamw8bit"


class APOLLOAdamWFactory(DCTProjAdamFactory):
    """:class:`~lowrank_optim.APOLLOAdamW` with :class:`DCTProjAdamFactory`'s parameter layout: the
    default rule (every 2-D parameter but the embedding and the output head) over the trainable named
    parameters, the embedding tables in a group with ``rank=None``; ``target_modules`` (optional)
    restricts projection to the ``nn.Linear`` weights it selects. All other keys are ``APOLLOAdamW``'s
    (``rank=0.25``, ``proj``, ``scale_type``, ``scale=1``, ``update_proj_gap=200``, ...)."""

    name = "apollo_adamw"


class APOLLOMiniFactory(APOLLOAdamWFactory):
    """:class:`~lowrank_optim.APOLLOMini` (rank 1, one scale per tensor, ``scale=128``) with
    :class:`APOLLOAdamWFactory`'s parameter layout; the other keys are ``APOLLOMini``'s."""

    name = "apollo_mini"


class SSTAdamWFactory(TrainerOptimizerFactory):
    """:class:`~lowrank_optim.SSTAdamW` over the trainable named parameters of a model already
    converted with :func:`~lowrank_optim.convert_to_sst` (convert before building the ``Trainer``).
    Every ``kwargs`` key is ``SSTAdamW``'s."""

    name = "sst_adamw"

    def param_groups(self, model: nn.Module, kwargs: dict[str, Any]) -> list:
        if not sst_layers(model):
            raise ValueError(
                f"Invalid model: a {type(model).__name__} without SSTLinear layers (SSTAdamWFactory trains "
                "a model converted with convert_to_sst(model, rank=...) before the Trainer is built)"
            )
        return trainable_named_parameters(model)


TRAINER_FACTORIES: dict[str, type[TrainerOptimizerFactory]] = {
    "adamw": AdamWFactory,
    "apollo_adamw": APOLLOAdamWFactory,
    "apollo_mini": APOLLOMiniFactory,
    "dct_adamw": DCTProjAdamFactory,
    "galore_adamw": GaLoreAdamWFactory,
    "galore_adamw8bit": GaLoreAdamW8bitFactory,
    "sst_adamw": SSTAdamWFactory,
}


def trainer_optimizer(name: str, **kwargs: Any) -> tuple[type[TrainerOptimizerFactory], dict[str, Any]]:
    """``(factory, kwargs)`` for ``Trainer(optimizer_cls_and_kwargs=...)``: the factory registered as
    ``name`` in :data:`TRAINER_FACTORIES` and the keyword arguments it will be called with."""
    try:
        factory = TRAINER_FACTORIES[name]
    except KeyError:
        raise ValueError(f"Invalid name: {name!r} (known: {', '.join(sorted(TRAINER_FACTORIES))})") from None
    return factory, kwargs
