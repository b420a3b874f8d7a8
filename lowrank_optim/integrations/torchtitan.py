"""torchtitan: the library's optimizers by name in torchtitan's ``OptimizersContainer``.

torchtitan (0.3.0) builds its optimizers from ``param_groups`` entries, ``ParamGroupConfig(pattern,
optimizer_name, optimizer_kwargs)``, looked up in a fixed table (``Adam``, ``AdamW``, ``DistMuon``).
:class:`LowRankOptimizersContainer` is that container with every name of the library's registry
(:func:`~lowrank_optim.available_optimizers`: ``dct_adamw``, ``galore_adamw``, ``apollo_mini``, ...)
and the class names of :data:`CLASS_NAMES` (``DCTProjAdam``, ``GaLoreAdamW``, ``APOLLOAdamW``,
``APOLLOMini``, ...) added; torchtitan's own names keep their meaning. The trainer gets it with one
override, without editing torchtitan::

    --override.imports lowrank_optim.integrations.torchtitan.lowrank_optimizers

which swaps the trainer's ``optimizer`` config for a :class:`LowRankOptimizersContainer.Config`
with the same fields (the override may also set them: :func:`lowrank_optimizers`).

* **Hyper-parameters are group keys**: each entry's ``optimizer_kwargs`` (``lr``, ``rank``,
  ``update_proj_gap``, ``moment_bits``, ...) become its param group's keys, checked by the optimizer
  (an unknown key or a bad value is an error naming it). Entries with the same ``optimizer_name``
  share one optimizer instance.
* **Optimizer-level options** (``skip_nonfinite``, ``foreach``, a default for every group) go through
  ``optimizer_factory_kwargs_by_name[name]``, the optimizer's constructor keywords. The in-backward
  modes (``backward_projection``, ``step_in_backward``) are refused: torchtitan's trainer clips
  ``param.grad`` after the backward pass and steps the container, which both would bypass.
* **implementation**: the container gives every group ``fused``/``foreach`` from
  ``implementation``, ``"fused"`` by default. The library has no fused torch kernel, so a group of
  one of its optimizers with ``fused=True`` is refused by pattern: use ``implementation="foreach"``
  (or ``"for-loop"``), or ``"fused": False`` in that entry's ``optimizer_kwargs``. ``SSTAdamW``, which
  takes none of torch's keywords, gets neither key when it is False, and refuses it when True.

**Checkpoints.** torchtitan's checkpointer saves the container's flat, per-parameter state dict with
``torch.distributed.checkpoint``. To have state tensors to load into, the container first creates
the state with a zero-gradient step at lr 0 (``init_optim_state``): it moves no parameter and creates
every state key of the library's optimizers (tested for all of them), but it is a step: it counts, and
a projected optimizer would keep the subspace chosen from a zero gradient until its next refresh.
:class:`LowRankOptimizersContainer` therefore treats that state as a placeholder: a
``load_state_dict`` replaces it, and if a real ``step()`` comes first it is dropped before that step,
so the run is the one that never called ``state_dict()`` (torchtitan never loads optimizer state from
a step-0 checkpoint: that load is model-only). Under FSDP2 the moments are DTensors sharded like
their parameters (float moments, or the codes and scales of 8/4-bit ones); the other
per-parameter entries (step counts, DCT indices, GaLore's ``P``, APOLLO's seeds, the limiters'
norms) are plain tensors or ints with the same value on every rank, which is what makes DCP's
single saved copy right for all ranks. Not carried by the flat layout: the
optimizer-level ``skipped_steps`` counter (``skip_nonfinite=True``) restarts at 0 after a resume.

Importing this module imports torchtitan (:mod:`.torchtitan_api` checks that it fits first);
``lowrank_optim`` itself never does.
"""

from __future__ import annotations

from .torchtitan_api import check_torchtitan_api

check_torchtitan_api()

# torchtitan's names below are imported only once check_torchtitan_api() has found them
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torchtitan.components.optimizer import OptimizersContainer, ParamGroupConfig  # noqa: E402
from torchtitan.components.optimizer.utils import init_optim_state  # noqa: E402
from torchtitan.config import derive, override  # noqa: E402

from ..registry import available_optimizers, create_optimizer  # noqa: E402

# optimizer_name -> registry name, beside the registry's own names
CLASS_NAMES: dict[str, str] = {
    "DCTProjAdam": "dct_adamw",
    "GaLoreAdamW": "galore_adamw",
    "GaLoreAdamW8bit": "galore_adamw8bit",
    "APOLLOAdamW": "apollo_adamw",
    "APOLLOMini": "apollo_mini",
    "SSTAdamW": "sst_adamw",
}
IN_BACKWARD_KEYWORDS = ("backward_projection", "step_in_backward")
# registry names whose optimizer takes none of torch's keywords (it refuses them by name): the
# container's fused=False and foreach=False ("not requested") are taken out of their groups
WITHOUT_TORCH_KEYWORDS = frozenset({"sst_adamw"})
IMPLEMENTATION_KEYS = ("fused", "foreach")


def optimizer_names() -> dict[str, str]:
    """Every ``optimizer_name`` the container adds, with the registry name it builds: the
    registry's names (as registered now) and :data:`CLASS_NAMES`."""
    return {**{name: name for name in available_optimizers()}, **CLASS_NAMES}


def library_factory(name: str) -> Callable[..., torch.optim.Optimizer]:
    """``factory(param_groups, **options)`` for the container: the optimizer ``name`` stands for
    (:func:`optimizer_names`) over the groups, ``options`` (``optimizer_factory_kwargs_by_name[name]``)
    its constructor keywords, the in-backward modes refused (module doc); for
    :data:`WITHOUT_TORCH_KEYWORDS`, the groups' ``fused``/``foreach`` keys that are False are left out."""
    registry_name = optimizer_names()[name]

    def build(param_groups: list[dict[str, Any]], **options: Any) -> torch.optim.Optimizer:
        for keyword in IN_BACKWARD_KEYWORDS:
            if options.get(keyword):
                raise ValueError(
                    f"Invalid {keyword}: {options[keyword]!r} in optimizer_factory_kwargs_by_name[{name!r}] "
                    "(torchtitan's trainer clips param.grad after the backward pass and steps the container; "
                    "an in-backward mode would bypass both)"
                )
        if registry_name in WITHOUT_TORCH_KEYWORDS:
            param_groups = [{key: value for key, value in group.items()
                             if not (key in IMPLEMENTATION_KEYS and value is False)} for group in param_groups]
        return create_optimizer(registry_name, param_groups, **options)

    return build


class LowRankOptimizersContainer(OptimizersContainer):
    """torchtitan's ``OptimizersContainer`` that also builds the library's optimizers by name, and
    whose zero-gradient state is a placeholder no real step sees (module doc)."""

    @dataclass(kw_only=True, slots=True)
    class Config(OptimizersContainer.Config):
        """``OptimizersContainer.Config`` whose ``param_groups`` may name the library's optimizers
        (:func:`optimizer_names`); the fields are torchtitan's."""

    def __init__(self, config: Config, *, model_parts: list[nn.Module]) -> None:
        super().__init__(config, model_parts=model_parts)
        # optimizers whose state is the zero-gradient step's (state_dict before any step), not yet
        # replaced by a load: dropped before the first real step
        self._placeholders: list[torch.optim.Optimizer] = []
        self.register_step_pre_hook(lambda optimizer, args, kwargs: self._drop_placeholders())

    @staticmethod
    def _resolve_optimizer_factory(name: str) -> Callable[..., torch.optim.Optimizer]:
        if name in optimizer_names():
            return library_factory(name)
        try:
            return OptimizersContainer._resolve_optimizer_factory(name)
        except NotImplementedError as error:
            raise NotImplementedError(
                f"{error} (lowrank_optim adds: {', '.join(sorted(optimizer_names()))})"
            ) from None

    @staticmethod
    def _build_param_groups(
        model: nn.Module, param_group_configs: list[ParamGroupConfig], impl_kwargs: dict[str, Any]
    ) -> tuple[dict[str, list[dict[str, Any]]], dict[str, list[str]]]:
        groups, patterns = OptimizersContainer._build_param_groups(model, param_group_configs, impl_kwargs)
        library = optimizer_names()
        for name, name_groups in groups.items():
            for group, pattern in zip(name_groups, patterns[name]):
                if name in library and group.get("fused"):
                    raise ValueError(
                        f"Invalid fused: True for param_groups pattern {pattern!r} ({name} has no fused torch "
                        "kernel; it comes from optimizer.implementation, 'fused' by default: set "
                        "implementation='foreach' or 'for-loop', or \"fused\": False in this entry's optimizer_kwargs)"
                    )
        return groups, patterns

    def state_dict(self) -> dict[str, Any]:
        self._create_state()
        return super().state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._create_state()
        super().load_state_dict(state_dict)
        self._placeholders.clear()

    def _create_state(self) -> None:
        """torchtitan's ``init_optim_state`` on each optimizer; the state it creates is a placeholder."""
        for optimizer in self.optimizers:
            if not optimizer.state:
                init_optim_state(optimizer)
                if optimizer.state:
                    self._placeholders.append(optimizer)

    def _drop_placeholders(self) -> None:
        """Back to optimizers that never stepped (``load_state_dict`` of an empty state: caches and
        counters are reset with it)."""
        for optimizer in self._placeholders:
            optimizer.load_state_dict({**optimizer.state_dict(), "state": {}})
        self._placeholders.clear()


@override(
    target=OptimizersContainer.Config,
    exact=True,
    description="lowrank_optim's optimizers by name in optimizer.param_groups",
)
def lowrank_optimizers(config: OptimizersContainer.Config, **fields: Any) -> LowRankOptimizersContainer.Config:
    """The override: ``config`` as a :class:`LowRankOptimizersContainer.Config`, its fields kept
    but for ``fields`` (from ``--override.imports 'lowrank_optim.integrations.torchtitan.lowrank_optimizers={...}'``,
    JSON): e.g. ``param_groups`` as a list of ``{"pattern", "optimizer_name", "optimizer_kwargs"}``
    objects, ``implementation``."""
    if "param_groups" in fields:
        fields["param_groups"] = [
            entry if isinstance(entry, ParamGroupConfig) else ParamGroupConfig(**entry)
            for entry in fields["param_groups"]
        ]
    return derive(config, LowRankOptimizersContainer.Config, **fields)
