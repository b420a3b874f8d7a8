"""The projected-AdamW engine shared by :class:`GaLoreAdamW` and :class:`DCTProjAdam`.

For a projected 2-D parameter ``W`` (``m×n``) with gradient ``G`` and projector ``P`` (see
:mod:`lowrank_optim.projectors`), one step is::

    refresh P from G          when the parameter's step count t (before this step) is 0 mod T
    R = project(G)            G·P (right) or Pᵀ·G (left), moments live in R's shape
    m ← β1·m + (1−β1)·R,  v ← β2·v + (1−β2)·R²
    N = m̂ / (√v̂ + ε_eff)
    W ← W − η·α·(N·Pᵀ or P·N)        (α = ``scale``; decoupled decay per :class:`AdamForm`)

Bias correction counts the parameter's steps (``bias_correction="step"``, Adam's) or, with
``"slot"``, each slot's steps since its moments last started from zero: a column that enters the
subspace under ``reset``/``transport`` then gets the corrections of a fresh Adam instead of those of
step ``t`` (which inflate ``m̂/√v̂`` up to ~6× for the first tens of steps after a refresh).

``residual="scaled"`` adds the gradient outside the subspace back, Adam-scaled (Fira;
:mod:`lowrank_optim.residual`).

When ``P`` changes, the moments follow the group's ``moments`` policy: ``keep`` (left as they are,
slot by slot), ``reset`` (zeroed) or ``transport`` (re-expressed in the new basis by the
projector; a slot gather, as for the DCT, is done while the moments are updated). Everything not
projected gets plain AdamW (multi-tensor) in the same step.

The group key ``backend`` (:mod:`lowrank_optim.kernels.backend`) picks who computes the projected
step, per parameter device: ``"torch"`` (the PyTorch reference), ``"triton"`` (fused kernels:
selection scores without ``S``, gather-GEMM projection, one-pass moment update, back-projection
GEMM with the weight update in its epilogue) or ``"auto"`` (Triton for CUDA parameters of fp32,
bf16 or fp16 when it imports, else PyTorch).

Steps are atomic with respect to refresh failures: all refreshes of a step are computed before any
parameter or state changes, and a failure (non-finite gradient, SVD non-convergence) raises an
error naming the parameter with everything left as it was. ``skip_nonfinite=True`` instead checks
every gradient once per step and skips the whole step (counted in ``skipped_steps``, warned).
A refresh that yields ``R`` for free (the DCT's PyTorch path, which forms all coefficients ``S``
to score them) keeps it until its parameter is updated: at a refresh step that holds up to one
``R`` per refreshing weight (the size of one moment) at a time.

Parameters sharded by FSDP2 (DTensors) are stepped shard by shard, with their moments as DTensors
sharded like them; the projector's selection, the residual's norm and the finiteness checks
reduce over the shards (:mod:`lowrank_optim.sharding`, which also fixes which side is projected).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import ClassVar

import torch

from .adam_form import AdamForm, bias_corrections
from .kernels.backend import check_backend, resolve_backend
from .kernels.dispatch import adam_moment_update, projected_weight_update_
from .kernels.slot_remap import slot_dim
from .kernels.weight_update import update_coefficients
from .plain_adamw import foreach_adamw_
from .projectors import PROJECTORS, Projector, Subspace, resolve_side
from .projectors.base import compressed_size, projected_shape
from .residual import RESIDUALS, residual_coefficients, residual_weight_update_
from .sharding import Sharding, local, local_side, summed
from .validation import (
    check_adamw_hyperparameters,
    check_choice,
    check_dense_real_grad,
    check_float_dtype_or_none,
    check_positive_int,
    check_positive_real,
)

MOMENT_POLICIES = ("keep", "reset", "transport")
AUTOMATIC_SIDE_MODES = ("auto", "std")
BIAS_CORRECTIONS = ("step", "slot")
_SUBSPACE_PREFIX = "proj_"


@dataclass
class _Projected:
    """A projected parameter of this step: where it is, how it is projected.

    ``weight`` and ``grad`` are the parameter and its gradient, or this rank's shards of them
    when FSDP2 shards the parameter (``sharding``, :mod:`lowrank_optim.sharding`)."""

    group: dict
    param: torch.Tensor
    weight: torch.Tensor
    grad: torch.Tensor
    sharding: Sharding | None
    name: str           # the parameter's name, or its position in the param groups
    rank: int
    side: str
    projector: Projector
    backend: str        # resolved for the parameter's device: "torch" or "triton"
    new_subspace: Subspace | None = None
    low_rank_grad: torch.Tensor | None = None     # R, when the refresh produced it
    source_slots: torch.Tensor | None = None     # a transport deferred to the moment update


class ProjectedAdamW(torch.optim.Optimizer):
    """Base class: subclasses choose the AdamW form, the projector and which parameters project.

    Subclasses implement :meth:`_validate_group` and :meth:`_projection_rank` and set
    ``adam_form`` and ``side_key`` (the group key holding the side mode).
    """

    adam_form: ClassVar[AdamForm]
    side_key: ClassVar[str]

    def __init__(self, params, defaults: dict, skip_nonfinite: bool = False):
        if not isinstance(skip_nonfinite, bool):
            raise ValueError(f"Invalid skip_nonfinite: {skip_nonfinite!r} (expected a bool)")
        self.skip_nonfinite = skip_nonfinite
        self.skipped_steps = 0
        self.refresh_stats: dict[str, dict[str, torch.Tensor]] = {}
        super().__init__(params, defaults)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("backend", "auto")     # state saved before these keys existed
            group.setdefault("bias_correction", "step")
            group.setdefault("residual", "none")

    # ----------------------------------------------------------------------------- param groups
    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            check_adamw_hyperparameters(group)
            check_positive_int("update_proj_gap", group["update_proj_gap"])
            check_positive_real("scale", group["scale"])
            check_choice("moments", group["moments"], MOMENT_POLICIES)
            check_float_dtype_or_none("moments_dtype", group["moments_dtype"])
            check_backend(group["backend"])
            check_choice("bias_correction", group["bias_correction"], BIAS_CORRECTIONS)
            check_choice("residual", group["residual"], RESIDUALS)
            self._validate_group(group)
        except ValueError:
            self.param_groups.pop()
            raise
        for index, param in enumerate(group["params"]):
            if param.is_complex():
                self.param_groups.pop()
                key = self._key(len(self.param_groups), group, index)
                raise ValueError(f"{_label(key, param)}: complex parameters are not supported")

    def _validate_group(self, group: dict) -> None:
        """Checks of the subclass's own keys (the shared ones are checked in add_param_group)."""
        raise NotImplementedError

    def _projection_rank(self, group: dict, param: torch.Tensor, name: str | None) -> int | None:
        """The rank ``param`` is projected to, or None for plain AdamW."""
        raise NotImplementedError

    @staticmethod
    def _param_name(group: dict, index: int) -> str | None:
        names = group.get("param_names")
        return None if names is None else names[index]

    @classmethod
    def _key(cls, group_index: int, group: dict, index: int) -> str:
        """How ``refresh_stats`` and errors name a parameter: its name, else its position."""
        name = cls._param_name(group, index)
        return name if name is not None else f"param_groups[{group_index}]['params'][{index}]"

    # ----------------------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        plain, projected = self._partition()
        self.refresh_stats = {}
        if self.skip_nonfinite and not _all_finite([p.grad for _, p in plain] +
                                                    [item.param.grad for item in projected]):
            self.skipped_steps += 1
            warnings.warn(f"{type(self).__name__}: non-finite gradient, step skipped "
                          f"({self.skipped_steps} skipped so far)", RuntimeWarning, stacklevel=2)
            return loss

        refreshing = [item for item in projected if self._needs_refresh(item)]
        self._compute_refreshes(refreshing)      # may raise: nothing has changed yet
        self._plain_step(plain)
        for item in projected:
            self._projected_step(item)
        return loss

    def _partition(self) -> tuple[list[tuple[dict, torch.Tensor]], list[_Projected]]:
        """Split the parameters with gradients into plain and projected ones (validating grads)."""
        plain, projected = [], []
        for group_index, group in enumerate(self.param_groups):
            projector = PROJECTORS[group["projection"]](group)
            for index, param in enumerate(group["params"]):
                if param.grad is None:
                    continue
                key = self._key(group_index, group, index)
                label = _label(key, param)
                check_dense_real_grad(param.grad, label)
                sharding = Sharding.of(param, label)
                rank = self._projection_rank(group, param, self._param_name(group, index))
                if rank is None:
                    plain.append((group, param))
                    continue
                mode = group[self.side_key]
                side = local_side(sharding, resolve_side(param.shape, mode), mode, AUTOMATIC_SIDE_MODES, label)
                backend = resolve_backend(group["backend"], param.device,
                                          (param.dtype, self._moments_dtype(group, param)))
                projected.append(_Projected(group, param, local(param), local(param.grad), sharding, key, rank,
                                            side, projector, backend))
        return plain, projected

    def _needs_refresh(self, item: _Projected) -> bool:
        state = self.state.get(item.param, {})
        has_subspace = any(key.startswith(_SUBSPACE_PREFIX) for key in state)
        return not has_subspace or state["step"] % item.group["update_proj_gap"] == 0

    def _compute_refreshes(self, refreshing: list[_Projected]) -> None:
        if not refreshing:
            return
        finite = _finite_flags([item.param.grad for item in refreshing])
        for item, is_finite in zip(refreshing, finite):
            if not is_finite:
                raise FloatingPointError(
                    f"{_label(item.name, item.param)}: non-finite gradient at a subspace refresh; no "
                    "parameter or state was changed (pass skip_nonfinite=True to skip such steps)")
        for item in refreshing:
            try:
                item.new_subspace, item.low_rank_grad = item.projector.select_and_project(
                    item.grad, item.rank, item.side, item.backend, item.sharding)
            except (RuntimeError, ValueError) as error:     # torch.linalg.LinAlgError included
                for done in refreshing:
                    done.new_subspace = done.low_rank_grad = None
                raise RuntimeError(f"{_label(item.name, item.param)}: subspace refresh failed ({error}); "
                                   "no parameter or state was changed") from error

    # ------------------------------------------------------------------------------- updates
    def _moments_dtype(self, group: dict, param: torch.Tensor) -> torch.dtype:
        return group.get("moments_dtype") or param.dtype

    def _corrections(self, group: dict, step: int) -> tuple[float, float]:
        beta1, beta2 = group["betas"]
        if not group.get("correct_bias", True):
            return 1.0, 1.0
        return bias_corrections(step, beta1, beta2)

    def _plain_step(self, plain: list[tuple[dict, torch.Tensor]]) -> None:
        by_group: dict[int, list[torch.Tensor]] = {}
        for group, param in plain:
            by_group.setdefault(id(group), []).append(param)
        for group in self.param_groups:
            params = by_group.get(id(group))
            if not params:
                continue
            exp_avgs, exp_avg_sqs, steps = [], [], []
            for param in params:
                state = self.state[param]
                if "exp_avg" not in state:
                    dtype = self._moments_dtype(group, param)
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(param, dtype=dtype)
                    state["exp_avg_sq"] = torch.zeros_like(param, dtype=dtype)
                state["step"] += 1
                exp_avgs.append(local(state["exp_avg"]))
                exp_avg_sqs.append(local(state["exp_avg_sq"]))
                steps.append(state["step"])
            beta1, beta2 = group["betas"]
            foreach_adamw_([local(p) for p in params], [local(p.grad) for p in params], exp_avgs, exp_avg_sqs, steps,
                           lr=_as_float(group["lr"]), beta1=beta1, beta2=beta2, eps=group["eps"],
                           weight_decay=group["weight_decay"], form=self.adam_form,
                           correct_bias=group.get("correct_bias", True))

    def _projected_step(self, item: _Projected) -> None:
        state, group, weight, grad = self.state[item.param], item.group, item.weight, item.grad
        if "exp_avg" not in state:
            shape = projected_shape(weight.shape, item.side, item.rank)
            dtype = self._moments_dtype(group, item.param)
            state["step"] = 0
            state["exp_avg"] = self._moment(item, torch.zeros(shape, dtype=dtype, device=weight.device))
            state["exp_avg_sq"] = self._moment(item, torch.zeros(shape, dtype=dtype, device=weight.device))
        if group["bias_correction"] == "slot" and "slot_steps" not in state:
            state["slot_steps"] = torch.full((item.rank,), state["step"], dtype=torch.int64, device=weight.device)
        if item.new_subspace is not None:
            self._install_subspace(item, state)
        subspace = _stored_subspace(state)
        state["step"] += 1

        low_rank_grad = item.low_rank_grad
        if low_rank_grad is None:
            low_rank_grad = item.projector.project(grad, subspace, item.side, item.backend)
        if item.new_subspace is not None:
            self.refresh_stats[item.name]["captured"] = _captured_fraction(low_rank_grad, grad, item.sharding)
        bc1, bc2 = self._corrections(group, self._slot_step_counts(item, state))
        beta1, beta2 = group["betas"]
        exp_avg, exp_avg_sq = local(state["exp_avg"]), local(state["exp_avg_sq"])
        normalized, new_exp_avg, new_exp_avg_sq = adam_moment_update(
            item.backend, low_rank_grad, exp_avg, exp_avg_sq, beta1=beta1, beta2=beta2,
            eps=self.adam_form.effective_eps(group["eps"], bc2), bias_correction1=bc1, bias_correction2=bc2,
            source_slots=item.source_slots, slot_dim=slot_dim(item.side))
        if new_exp_avg is not exp_avg:       # a slot remap made new tensors
            state["exp_avg"], state["exp_avg_sq"] = self._moment(item, new_exp_avg), self._moment(item, new_exp_avg_sq)
        basis, indices = item.projector.basis_columns(
            subspace, compressed_size(weight.shape, item.side), normalized.dtype, item.backend)
        coefficients = dict(lr=_as_float(group["lr"]), scale=group["scale"], weight_decay=group["weight_decay"],
                            decay_before_update=self.adam_form.decay_before_update)
        if group["residual"] == "scaled":
            a, b = update_coefficients(**coefficients)
            phi = residual_coefficients(grad, low_rank_grad, normalized, item.side, state, item.sharding)
            columns = basis if indices is None else basis.index_select(1, indices)
            residual_weight_update_(weight, grad, low_rank_grad, normalized, columns, phi, item.side, a=a, b=b)
        else:
            projected_weight_update_(item.backend, weight, normalized, basis, indices, item.side, **coefficients)

    @staticmethod
    def _moment(item: _Projected, tensor: torch.Tensor) -> torch.Tensor:
        """A moment as stored: this rank's shard of a DTensor sharded like the parameter, or itself."""
        if item.sharding is None:
            return tensor
        return item.sharding.distribute(tensor, projected_shape(item.param.shape, item.side, item.rank))

    @staticmethod
    def _slot_step_counts(item: _Projected, state: dict):
        """The step count ``t`` of the bias corrections: the parameter's (``bias_correction="step"``)
        or, with ``"slot"``, each slot's own count, shaped to broadcast against the moments."""
        if item.group["bias_correction"] != "slot":
            return state["step"]
        state["slot_steps"] += 1
        return state["slot_steps"].view((1, -1) if item.side == "right" else (-1, 1))

    def _install_subspace(self, item: _Projected, state: dict) -> None:
        old = _stored_subspace(state)
        new = item.new_subspace
        size = compressed_size(item.param.shape, item.side)
        policy = item.group["moments"]
        if old:
            if policy == "reset":
                local(state["exp_avg"]).zero_()
                local(state["exp_avg_sq"]).zero_()
                if "slot_steps" in state:
                    state["slot_steps"].zero_()
            elif policy == "transport":
                item.source_slots = item.projector.transport_slots(old, new)
                if item.source_slots is None:
                    for key, second in (("exp_avg", False), ("exp_avg_sq", True)):
                        moment = local(state[key])
                        moment.copy_(item.projector.transport(moment, old, new, item.side, second))
                elif "slot_steps" in state:
                    kept = item.source_slots >= 0
                    state["slot_steps"] = state["slot_steps"][item.source_slots.clamp(min=0)] * kept
        self.refresh_stats[item.name] = {
            "overlap": item.projector.overlap(old, new, size) if old else torch.tensor(0.0)}
        for key in [k for k in state if k.startswith(_SUBSPACE_PREFIX)]:
            del state[key]
        for key, tensor in new.items():
            state[_SUBSPACE_PREFIX + key] = tensor

    # ------------------------------------------------------------------------------ state io
    def state_dict(self):
        state = super().state_dict()
        state["skipped_steps"] = self.skipped_steps
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Load, keeping every saved state tensor's dtype (torch would cast integer subspace indices
        and fp32 moments to the parameter's dtype)."""
        saved = state_dict["state"]
        super().load_state_dict(state_dict)
        self.skipped_steps = state_dict.get("skipped_steps", 0)
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for saved_id, param in zip(saved_ids, params):
            for key, value in saved.get(saved_id, {}).items():
                if isinstance(value, torch.Tensor):
                    self.state[param][key] = value.to(device=param.device)


def _label(key: str, param: torch.Tensor) -> str:
    return f"parameter {key} (shape {tuple(param.shape)})"


def _stored_subspace(state: dict) -> Subspace:
    return {key[len(_SUBSPACE_PREFIX):]: value for key, value in state.items()
            if key.startswith(_SUBSPACE_PREFIX)}


def _captured_fraction(low_rank_grad: torch.Tensor, grad: torch.Tensor, sharding: Sharding | None) -> torch.Tensor:
    """``‖R‖²/‖G‖²``: the share of the gradient inside the new subspace (over all shards)."""
    squares = summed(torch.stack([low_rank_grad.float().square().sum(), grad.float().square().sum()]), sharding)
    return squares[0] / squares[1].clamp_min(1e-30)


def _finite_flags(tensors: list[torch.Tensor]) -> list[bool]:
    """One host sync: is each tensor free of inf/nan. Norms of 16-bit tensors are taken in fp32
    (a large finite fp16 gradient must not overflow to inf). A DTensor is finite when all its
    shards are: one all-reduce per process group of the sharded ones."""
    flags = _local_finite_flags([local(t) for t in tensors])
    by_group: dict[int, tuple[Sharding, list[int]]] = {}
    for index, tensor in enumerate(tensors):
        sharding = Sharding.of(tensor, f"gradient {index}")
        if sharding is not None and sharding.is_split:
            by_group.setdefault(id(sharding.group), (sharding, []))[1].append(index)
    for sharding, indices in by_group.values():
        bad = sharding.max_(torch.logical_not(flags[indices]).to(torch.int32))
        flags[indices] = bad == 0
    return flags.tolist()


def _local_finite_flags(tensors: list[torch.Tensor]) -> torch.Tensor:
    norms: list[torch.Tensor | None] = [None] * len(tensors)
    by_dtype: dict[torch.dtype, list[int]] = {}
    for index, tensor in enumerate(tensors):
        by_dtype.setdefault(tensor.dtype, []).append(index)
    for dtype, indices in by_dtype.items():
        norm_dtype = torch.float32 if dtype.itemsize < 4 else None
        for index, norm in zip(indices, torch._foreach_norm([tensors[i] for i in indices], dtype=norm_dtype)):
            norms[index] = norm.float()
    return torch.stack([n.to(norms[0].device) for n in norms]).isfinite()


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    return not tensors or all(_finite_flags(tensors))


def _as_float(value) -> float:
    return value.item() if isinstance(value, torch.Tensor) else float(value)
