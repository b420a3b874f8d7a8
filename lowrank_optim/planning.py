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

from dataclasses import dataclass, replace

import torch

from .geometry import compressed_size, projected_shape, resolve_side
from .kernels.backend import resolve_backend
from .moments import Moments, MomentSpec
from .projectors import Projector
from .quantization import resolve_block_size
from .quantization.sharded import sharded_blocks_problem
from .rules import RULES, UpdateRule
from .sharding import Sharding, local_side, moment_storage
from .validation import param_label
from .weight_store import weight_store


@dataclass(frozen=True)
class ParameterPlan:
    """How one parameter is stepped: plain AdamW when ``rank`` is None.

    ``key``: its name, or its position in the param groups; ``backend``: ``"torch"`` or
    ``"triton"`` for its device and dtypes; ``weight_store``: ``"float"`` or ``"int8"``
    (:mod:`lowrank_optim.weight_store`); ``stochastic_round``: its updates are rounded stochastically
    (an int8 weight always, a bf16 weight when its group asks); ``refresh_phase``: added to its
    step count when deciding a refresh (staggered refreshes); ``moments_spec``: how its
    (projected or plain) moments are stored; ``note``: why a weight its group would project stays plain."""

    key: str
    backend: str
    moments_spec: MomentSpec
    rank: int | None = None
    side: str | None = None
    sharding: Sharding | None = None
    projector: Projector | None = None
    rule: UpdateRule | None = None
    weight_store: str = "float"
    stochastic_round: bool = False
    refresh_phase: int = 0
    note: str | None = None

    @property
    def projected(self) -> bool:
        return self.rank is not None

    def moment_shape(self, param: torch.Tensor) -> tuple[int, ...]:
        """The shape of the moments of ``param`` (global of a DTensor, local of its shard):
        ``m×r``/``r×n``, or the parameter's."""
        return projected_shape(param.shape, self.side, self.rank) if self.projected else tuple(param.shape)

    def moments(self, state: dict, weight: torch.Tensor) -> Moments:
        """The moments ``state`` holds for ``weight`` (this rank's shard under FSDP2, whose moments
        are DTensors sharded like the parameter)."""
        return self.moments_spec.view(state, **moment_storage(self.sharding, self.moment_shape(weight)))

    def expected_state_bytes(self, param: torch.Tensor, group: dict, moments_dtype: torch.dtype) -> int:
        """Bytes the first step allocates for ``param`` (whole parameter, before sharding)."""
        moments = self.moments_spec.expected_bytes(moments_dtype)
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
    plain = MomentSpec.of(param.shape, None, None).expected_bytes(moments_dtype)
    if projected < plain:
        return None
    return f"rank {plan.rank} would not compress it: projected state {projected:,} B >= AdamW's {plain:,} B"


def resolve_plan(group: dict, param: torch.Tensor, key: str, rank: int | None, *, side_mode: str,
                 projector: type[Projector] | None, moments_dtype: torch.dtype, position: int = 0) -> ParameterPlan:
    """The plan of ``param`` (named ``key``, the ``position``-th of the optimizer, 1-based) in
    ``group`` at ``rank`` (None: plain), projected on the side ``side_mode`` resolves to by
    ``projector``; the plain plan with a ``note`` when projecting
    would not compress it (:func:`compressing`). ``ValueError`` naming the parameter for what its
    group cannot do with it (quantized moments whose blocks would straddle FSDP2 shards, an
    FSDP2-sharded int8 weight, the Triton weight update with bf16 stochastic rounding, a backend its
    device cannot run)."""
    label = param_label(key, param)
    sharding = Sharding.of(param, label)
    store = weight_store(param)
    if sharding is not None and store == "int8":
        raise ValueError(f"{label}: an FSDP2-sharded int8 weight is not supported (the rounding noise of a "
                         "shard's rows would need their global row offset); train int8 weights with DDP, or "
                         "keep this weight in float (dequantize_model_weights) under FSDP2")
    if group["backend"] == "triton" and group["bf16_stochastic_round"] and param.dtype == torch.bfloat16 \
            and store == "float":
        raise ValueError(f"{label}: backend='triton' with bf16_stochastic_round=True (the fused weight update "
                         "rounds to nearest; stochastic rounding runs on PyTorch); pass backend='auto' (Triton "
                         "moments, PyTorch weight update) or 'torch'")
    try:
        backend = resolve_backend(group["backend"], param.device, (param.dtype, moments_dtype))
    except ValueError as error:
        raise ValueError(f"{label}: {error}") from None
    bits, block_size = group["moment_bits"], group["moment_block_size"]
    rounds_bf16 = group["bf16_stochastic_round"] and param.dtype == torch.bfloat16 and store == "float"
    plain = ParameterPlan(key, backend, MomentSpec.of(param.shape, None, bits, block_size), sharding=sharding,
                          weight_store=store, stochastic_round=store == "int8" or rounds_bf16)
    if rank is None:
        return _checked_sharded_blocks(plain, label)
    side = local_side(sharding, resolve_side(param.shape, side_mode), side_mode, label)
    plan = replace(plain, rank=rank, side=side, projector=projector(group, position=position, side=side, rank=rank),
                   rule=RULES[group["update_rule"]],
                   moments_spec=MomentSpec.of(projected_shape(param.shape, side, rank), side, bits, block_size))
    note = compressing(plan, param, group, moments_dtype)
    return _checked_sharded_blocks(plan if note is None else replace(plain, note=note), label)


def _checked_sharded_blocks(plan: ParameterPlan, label: str) -> ParameterPlan:
    """``plan``, or ``ValueError`` naming the parameter when its moments are quantized and its
    FSDP2 shards would cut their blocks (:func:`~lowrank_optim.quantization.sharded.sharded_blocks_problem`)."""
    spec, sharding = plan.moments_spec, plan.sharding
    if spec.bits is None or sharding is None or not sharding.is_split:
        return plan
    block_size = resolve_block_size(spec.bits, spec.block_size)
    problem = sharded_blocks_problem(spec.shape, spec.layout, spec.bits, block_size, sharding.dim, sharding.shards)
    if problem is None:
        return plan
    raise ValueError(f"{label}: moment_bits={spec.bits} with placements {sharding.placements} over "
                     f"{sharding.shards} ranks: {problem}. Quantization blocks are the unsharded moment's on every "
                     "mesh; or give this parameter float moments (moment_bits=None in its own param group)")
