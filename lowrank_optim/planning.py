"""A parameter's plan: everything about its step that does not change between steps, resolved once.

:class:`ProjectedAdamW <lowrank_optim.engine.ProjectedAdamW>` resolves one :class:`ParameterPlan`
per parameter at construction (again after ``add_param_group`` and ``load_state_dict``): projected
or plain, rank, side, kernel backend, FSDP2 sharding, projector, update rule, stochastic rounding,
the refresh phase. A step then reads the plan and runs one straight line.

**Compression rule** (:func:`compressing`): a weight is projected only if that compresses it: its
rank is below its smaller side and the projected state (moments in the group's format, subspace,
counters, the rule's own state) takes fewer bytes than AdamW's float moments of the weight.
Otherwise it stays plain and the plan's ``note`` says why (``projection_summary()`` shows it).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .geometry import compressed_size, projected_shape
from .moments import Moments
from .projectors import Projector
from .rules import UpdateRule
from .sharding import Sharding, local


@dataclass(frozen=True)
class ParameterPlan:
    """How one parameter is stepped: plain AdamW when ``rank`` is None.

    ``key``: its name, or its position in the param groups; ``backend``: ``"torch"`` or
    ``"triton"`` for its device and dtypes; ``stochastic_round``: a bf16 weight whose group rounds
    updates stochastically; ``refresh_phase``: added to its step count when deciding a refresh
    (staggered refreshes); ``note``: why a weight its group would project stays plain."""

    key: str
    backend: str
    rank: int | None = None
    side: str | None = None
    sharding: Sharding | None = None
    projector: Projector | None = None
    rule: UpdateRule | None = None
    stochastic_round: bool = False
    refresh_phase: int = 0
    note: str | None = None

    @property
    def projected(self) -> bool:
        return self.rank is not None

    def moment_shape(self, param: torch.Tensor) -> tuple[int, ...]:
        """The (global) shape of the moments: ``m×r``/``r×n``, or the parameter's."""
        return projected_shape(param.shape, self.side, self.rank) if self.projected else tuple(param.shape)

    def moments(self, param: torch.Tensor, state: dict, group: dict) -> Moments:
        """``param``'s moments as ``state`` stores them (projected moments of FSDP2-sharded weights
        as DTensors sharded like the weight)."""
        shape = self.moment_shape(param)
        wrap = {} if self.sharding is None else {"wrap": lambda tensor: self.sharding.distribute(tensor, shape)}
        return Moments.of(state, shape, self.side, group["moment_bits"], group["moment_block_size"], unwrap=local,
                          **wrap)

    def expected_state_bytes(self, param: torch.Tensor, group: dict, moments_dtype: torch.dtype) -> int:
        """Bytes the first step allocates for ``param`` (whole parameter, before sharding)."""
        moments = Moments.of({}, self.moment_shape(param), self.side, group["moment_bits"],
                             group["moment_block_size"]).expected_bytes(moments_dtype)
        if not self.projected:
            return moments
        subspace = self.projector.subspace_bytes(compressed_size(param.shape, self.side), self.rank, param.dtype)
        slot_steps = 8 * self.rank if group["bias_correction"] == "slot" else 0
        return moments + subspace + slot_steps + self.rule.state_bytes(group)


def compressing(plan: ParameterPlan, param: torch.Tensor, group: dict, moments_dtype: torch.dtype) -> str | None:
    """None when projecting ``param`` by ``plan`` compresses it, else why not (module doc)."""
    if plan.rank >= min(param.shape):
        return f"rank {plan.rank} spans its smaller side: nothing to compress"
    projected = plan.expected_state_bytes(param, group, moments_dtype)
    plain = ParameterPlan(plan.key, plan.backend).expected_state_bytes(param, {**group, "moment_bits": None},
                                                                       moments_dtype)
    if projected < plain:
        return None
    return f"rank {plan.rank} would not compress it: projected state {projected:,} B >= AdamW's {plain:,} B"
