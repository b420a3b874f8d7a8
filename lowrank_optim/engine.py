"""The optimizer shell shared by :class:`GaLoreAdamW` and :class:`DCTProjAdam`.

The math of a projected step is an update rule (:mod:`lowrank_optim.rules`, by default
:class:`~lowrank_optim.rules.adamw.AdamWRule`); plain parameters get
:func:`lowrank_optim.plain_adamw.plain_adamw_step_`. This class is the ``torch.optim``
bookkeeping around them, in the shape of ``torch/optim/adam.py``:

* construction validates every hyperparameter (``ValueError`` naming the key and the value) and
  refuses unknown param-group keys; each parameter's :class:`~lowrank_optim.planning.ParameterPlan`
  (projected or plain, rank, side, backend, sharding, projector, rule, rounding) is resolved once;
* :meth:`step` is a straight line: :meth:`_init_group` validates the gradients and gathers one
  :class:`_Target` per parameter with a gradient, the subspace refreshes of the step are all
  computed before anything changes, then every parameter takes its update (plain ones in one
  multi-tensor call per group, projected ones by their plan's rule);
* the state is tensors and ints only (``torch.load(weights_only=True)`` loads it) and keeps its
  dtypes on :meth:`load_state_dict`; ``copy.deepcopy``, ``pickle`` and ``torch.save`` of the
  optimizer keep its instance attributes.

**Per-parameter API.** :meth:`plan_of`, :meth:`refresh_due`, :meth:`gradient_projection` and
:meth:`step_parameter` step one parameter at a time from outside the class: the in-backward modes
(:mod:`lowrank_optim.backward_projection`) are built on them, as torch's
``_apply_optimizer_in_backward`` wraps an unchanged optimizer.

**Refreshes.** A parameter's subspace is (re)computed from its gradient when its step count
(before the step, plus its plan's ``refresh_phase``) is ``0 mod update_proj_gap``. When ``P``
changes, the moments follow the group's ``moments`` policy: ``keep`` (slot by slot), ``reset``
(zeroed) or ``transport`` (re-expressed in the new basis; a slot gather for the DCT, fused into the
moment update). A refresh that yields ``R`` for free (the DCT's PyTorch path forms all
coefficients ``S`` to score them) keeps it until its parameter is updated.

Steps are atomic with respect to refresh failures: a non-finite gradient or an SVD that does not
converge at a refresh raises an error naming the parameter, with every parameter and state as it
was. ``skip_nonfinite=True`` instead checks every gradient once per step and skips the whole step
(counted in ``skipped_steps``, warned).

**torch.compile.** ``torch.compile(opt.step)`` gives the eager trajectory because :meth:`step`
disables Dynamo for itself and everything it calls (``torch._disable_dynamo``, the lazy form of
``torch.compiler.disable``, so that importing the library imports neither Dynamo nor Triton): it runs eagerly
inside a compiled training step. Tracing it was measured to diverge silently — Dynamo's handling
of the step counters kept in the state dicts froze them (eager counts 1 2 3 4 …, compiled 1 2 2
2 …) — and compiling the element-wise math alone would recompile every step (its learning rate
and bias corrections are Python floats). Compile the model; the projected step's heavy work is
GEMMs and, on CUDA, the fused Triton kernels.

**FSDP2.** Parameters sharded by ``fully_shard`` (DTensors) are stepped shard by shard, with their
moments as DTensors sharded like them; the projector's selection, the residual's norm and the
finiteness checks reduce over the shards (:mod:`lowrank_optim.sharding`, which also fixes the side).
"""
from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import ClassVar

import torch

from .adam_form import AdamForm
from .backward_projection import InBackward, gradient_in_use, stagger_offset
from .finite import all_finite, finite_flags
from .geometry import compressed_size
from .gradient_stand_ins import ProjectedGradient
from .group_keys import check_shared_group_keys, rule_keys
from .plain_adamw import plain_adamw_step_
from .planning import ParameterPlan, resolve_plan
from .projectors import PROJECTORS, SUBSPACE_PREFIX, Subspace, stored_subspace
from .rounding import rounding_generator
from .rules import AdamHyperparameters, ProjectedStep
from .selection import embedding_table_names, vocabulary_matrices
from .sharding import Sharding, local, summed
from .state_bytes import tensor_bytes
from .state_io import STATE_FORMAT, check_state_format, restore_saved_dtypes
from .subspace_change import install_subspace
from .summary import ProjectionRow, ProjectionSummary
from .validation import (
    check_bool,
    check_dense_real_grad,
    check_group_keys,
    check_torch_keywords,
    param_label,
)


@dataclass
class _Target:
    """A parameter with a gradient at this step: ``weight`` and ``grad`` are the parameter and its
    gradient (negated under ``maximize``), or this rank's shards of them under FSDP2; ``grad`` is
    None and ``low_rank_grad`` set when the backward pass projected it."""

    group: dict
    param: torch.Tensor
    plan: ParameterPlan
    weight: torch.Tensor
    grad: torch.Tensor | None
    refresh: bool = False
    new_subspace: Subspace | None = None
    low_rank_grad: torch.Tensor | None = None     # R: projected in the backward pass, or by the refresh


class ProjectedAdamW(torch.optim.Optimizer):
    """Base class (module doc). Subclasses set ``adam_form`` (where ε and weight decay sit),
    ``side_key`` (the group key of the side mode) and ``group_only_keys`` (keys a group may carry
    that are not constructor defaults), and implement :meth:`_validate_group`,
    :meth:`_projection_rank`, :meth:`_projector_name` and :meth:`_nothing_projected_warning`."""

    adam_form: ClassVar[AdamForm]
    side_key: ClassVar[str]
    group_only_keys: ClassVar[tuple[str, ...]] = ()

    def __init__(self, params, defaults: dict, *, skip_nonfinite: bool = False, foreach: bool | None = None,
                 maximize: bool = False, capturable: bool = False, differentiable: bool = False,
                 fused: bool | None = None, backward_projection: bool = False, step_in_backward: bool = False,
                 accumulation_steps: int = 1, process_group=None):
        check_torch_keywords(foreach=foreach, fused=fused, maximize=maximize, capturable=capturable,
                             differentiable=differentiable)
        check_bool("skip_nonfinite", skip_nonfinite)
        in_backward = InBackward.settings(backward_projection=backward_projection, step_in_backward=step_in_backward,
                                          accumulation_steps=accumulation_steps, process_group=process_group,
                                          skip_nonfinite=skip_nonfinite)
        defaults = dict(defaults, foreach=foreach, maximize=maximize, capturable=capturable,
                        differentiable=differentiable, fused=fused)
        self.skip_nonfinite = skip_nonfinite
        self.skipped_steps = 0
        self.refresh_stats: dict[str, dict[str, torch.Tensor]] = {}
        self.in_backward: InBackward | None = None
        self._staggered = False
        self._rank_given: list[bool] = []
        self._plans: dict[torch.Tensor, ParameterPlan] = {}
        self._groups: dict[torch.Tensor, dict] = {}
        self._table_names = frozenset()
        if isinstance(params, torch.nn.Module):      # the model itself: its embedding tables are known
            self._table_names = embedding_table_names(params)
            params = list(params.named_parameters())
        super().__init__(params, defaults)
        self._plan_all(warn=True)
        if in_backward is not None:
            self.in_backward = InBackward(self, **in_backward)

    # ----------------------------------------------------------------------------- param groups
    def add_param_group(self, param_group: dict) -> None:
        """Validate and add a group; a rejected group leaves the optimizer as it was."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        allowed = set(self.defaults) | set(self.group_only_keys) | rule_keys()
        check_group_keys(param_group, allowed, type(self).__name__)
        if self.__dict__.get("in_backward") is not None:
            self.in_backward.check_new_group()
        rank_given = "rank" in param_group
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            check_shared_group_keys(group)
            self._validate_group(group)
            for index, param in enumerate(group["params"]):
                if param.is_complex():
                    key = self._key(len(self.param_groups) - 1, group, index)
                    raise ValueError(f"{param_label(key, param)}: complex parameters are not supported")
        except ValueError:
            self.param_groups.pop()
            raise
        self._rank_given.append(rank_given)
        self._plans = {}

    def _validate_group(self, group: dict) -> None:
        """Checks of the subclass's own keys."""
        raise NotImplementedError

    def _projection_rank(self, group: dict, param: torch.Tensor, rank_given: bool, vocabulary: bool) -> int | None:
        """The rank ``param`` is projected to, or None for plain AdamW. ``rank_given``: the group
        carried its own ``rank``; ``vocabulary``: the default rule takes it for an embedding or
        output head (:mod:`lowrank_optim.selection`)."""
        raise NotImplementedError

    def _projector_name(self, group: dict) -> str:
        """The :data:`~lowrank_optim.projectors.PROJECTORS` entry that projects ``group``."""
        raise NotImplementedError

    def _nothing_projected_warning(self) -> str:
        """What to tell the user when no parameter is projected."""
        raise NotImplementedError

    @staticmethod
    def _param_name(group: dict, index: int) -> str | None:
        names = group.get("param_names")
        return None if names is None else names[index]

    @classmethod
    def _key(cls, group_index: int, group: dict, index: int) -> str:
        """How ``refresh_stats``, summaries and errors name a parameter: its name, else its position."""
        name = cls._param_name(group, index)
        return name if name is not None else f"param_groups[{group_index}]['params'][{index}]"

    # ------------------------------------------------------------------------------------ plans
    def plan_of(self, param: torch.Tensor) -> ParameterPlan:
        """How ``param`` is stepped (:class:`~lowrank_optim.planning.ParameterPlan`)."""
        if param not in self._plans:
            self._plan_all(warn=False)
        return self._plans[param]

    def stagger_refreshes(self, staggered: bool) -> None:
        """Give projected weight ``j`` of ``W`` the refresh phase ``o_j = ⌊j·T/W⌋`` (``T`` =
        ``update_proj_gap``), so a step refreshes at most ``⌈W/T⌉`` of them (the in-backward modes,
        which keep a refreshing weight's full gradient), or every weight at the same steps."""
        self._staggered = staggered
        self._plan_all(warn=False)

    def _plan_all(self, warn: bool) -> None:
        """Resolve every parameter's plan; with ``warn``, say what the default rule could not tell."""
        entries, positions = [], []          # the 2-D parameters of groups without their own rank
        for group_index, group in enumerate(self.param_groups):
            for index, param in enumerate(group["params"]):
                if param.ndim == 2 and not self._rank_given[group_index]:
                    entries.append((self._param_name(group, index), tuple(param.shape)))
                    positions.append((group_index, index))
        vocabulary, undecided = vocabulary_matrices(entries)
        vocabulary = {positions[i] for i in vocabulary} | {
            position for position, (name, _) in zip(positions, entries) if name in self._table_names}
        plans = {}
        for group_index, group in enumerate(self.param_groups):
            for index, param in enumerate(group["params"]):
                rank = self._projection_rank(group, param, self._rank_given[group_index],
                                             (group_index, index) in vocabulary)
                plans[param] = self._resolve_plan(group, param, self._key(group_index, group, index), rank,
                                                  warn=warn and self._rank_given[group_index], position=len(plans) + 1)
        if self._staggered:
            projected = [(group, param) for group in self.param_groups for param in group["params"]
                         if plans[param].projected]
            for j, (group, param) in enumerate(projected):
                offset = stagger_offset(j, len(projected), group["update_proj_gap"])
                plans[param] = replace(plans[param], refresh_phase=offset)
        self._plans = plans
        self._groups = {param: group for group in self.param_groups for param in group["params"]}
        if warn:
            self._warn_about_defaults(undecided, positions)

    def _warn_about_defaults(self, undecided: list[int], positions: list[tuple[int, int]]) -> None:
        for i in undecided:
            group_index, index = positions[i]
            param = self.param_groups[group_index]["params"][index]
            if self._plans[param].projected:
                warnings.warn(f"{type(self).__name__}: cannot tell from its shape whether the 2-D "
                              f"{param_label(self._plans[param].key, param)} is an embedding or output head; it is "
                              "projected. Pass model.named_parameters(), or put it in a param group with "
                              "rank=None to keep it in full AdamW", UserWarning, stacklevel=4)
        if self._plans and all(not plan.projected and plan.note is None for plan in self._plans.values()):
            warnings.warn(f"{type(self).__name__}: {self._nothing_projected_warning()}", UserWarning, stacklevel=4)

    def _resolve_plan(self, group: dict, param: torch.Tensor, key: str, rank: int | None,
                      warn: bool, position: int) -> ParameterPlan:
        """:func:`~lowrank_optim.planning.resolve_plan`; ``warn``: the group asked for that rank
        itself, so a weight it would not compress is warned about, once."""
        plan = resolve_plan(group, param, key, rank, side_mode=group[self.side_key],
                            projector=None if rank is None else PROJECTORS[self._projector_name(group)],
                            moments_dtype=self._moments_dtype(group, param), position=position)
        if warn and plan.note is not None:
            warnings.warn(f"{type(self).__name__}: {param_label(key, param)} stays plain AdamW: {plan.note}; pass a "
                          "smaller rank to project it", UserWarning, stacklevel=5)
        return plan

    @staticmethod
    def _moments_dtype(group: dict, param: torch.Tensor) -> torch.dtype:
        return group["moments_dtype"] or param.dtype

    # ----------------------------------------------------------------------------------- step
    @torch._disable_dynamo        # lazy: importing torch._dynamo here would import Triton (module doc)
    def step(self, closure=None):
        """One optimization step on every parameter with a gradient (module doc)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with torch.no_grad():
            if self.in_backward is not None:
                self.in_backward.before_step()       # averages the gradients, or closes the window
            work = [self._init_group(group) for group in self.param_groups]
            if any(plain or projected for plain, projected in work) and not self._skipped(work):
                self.refresh_stats = {}
                self._compute_refreshes([t for _, projected in work for t in projected if t.refresh],
                                        advice=" (pass skip_nonfinite=True to skip such steps)")
                for group, (plain, projected) in zip(self.param_groups, work):
                    self._plain_step(group, plain, foreach=group["foreach"] is not False)
                    for target in projected:
                        self._projected_step(target)
            for param in self._groups:          # the step consumed the accumulators of the backward pass
                if isinstance(param.grad, ProjectedGradient):
                    param.grad = None
        return loss

    def _init_group(self, group: dict) -> tuple[list[_Target], list[_Target]]:
        """``(plain, projected)`` targets of the group's parameters with gradients."""
        plain, projected = [], []
        for param in group["params"]:
            if param.grad is not None:
                target = self._target(group, param)
                (projected if target.plan.projected else plain).append(target)
        return plain, projected

    def _target(self, group: dict, param: torch.Tensor) -> _Target:
        """``param``'s target: its gradient validated, negated under ``maximize``."""
        plan = self.plan_of(param)
        sign = -1.0 if group["maximize"] else 1.0
        if isinstance(param.grad, ProjectedGradient):     # projected in the backward pass
            accumulated = param.grad.low_rank
            return _Target(group, param, plan, param, None,
                           low_rank_grad=accumulated.mul_(sign) if sign < 0 else accumulated)
        check_dense_real_grad(param.grad, param_label(plan.key, param))
        grad = -local(param.grad) if sign < 0 else local(param.grad)
        return _Target(group, param, plan, local(param), grad, refresh=plan.projected and self.refresh_due(param))

    def _skipped(self, work: list) -> bool:
        """With ``skip_nonfinite``: whether a gradient is not finite, and the step then skipped."""
        if not self.skip_nonfinite:
            return False
        # the gradients as autograd left them (DTensors under FSDP2: their check spans the shards)
        grads = [t.param.grad if t.low_rank_grad is None else t.low_rank_grad
                 for targets in work for kind in targets for t in kind]
        if all_finite(grads):
            return False
        self.skipped_steps += 1
        warnings.warn(f"{type(self).__name__}: non-finite gradient, step skipped ({self.skipped_steps} skipped so far)",
                      RuntimeWarning, stacklevel=4)
        return True

    def refresh_due(self, param: torch.Tensor) -> bool:
        """Whether ``param``'s subspace is recomputed at its next step: at its first, then every
        ``update_proj_gap`` steps (shifted by its plan's ``refresh_phase``)."""
        state = self.state.get(param, {})
        if not any(key.startswith(SUBSPACE_PREFIX) for key in state):
            return True
        return (state["step"] + self.plan_of(param).refresh_phase) % self._groups[param]["update_proj_gap"] == 0

    def gradient_projection(self, param: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """``G ↦ R`` in ``param``'s current subspace (``G·P`` or ``Pᵀ·G``), or None for a plain
        parameter or one whose next step refreshes its subspace (it needs the full gradient)."""
        plan = self.plan_of(param)
        if not plan.projected or self.refresh_due(param):
            return None
        return functools.partial(plan.projector.project, subspace=stored_subspace(self.state[param]),
                                 side=plan.side, backend=plan.backend)

    @torch.no_grad()
    def step_parameter(self, param: torch.Tensor) -> None:
        """Step ``param`` alone from its ``.grad`` (a full gradient or a
        :class:`~lowrank_optim.gradient_stand_ins.ProjectedGradient`): refresh if due, moments, weight
        update. A failed refresh raises with this parameter and its state unchanged."""
        if param.grad is None:
            return
        group = self._groups[param]
        target = self._target(group, param)
        if not target.plan.projected:
            self._plain_step(group, [target], foreach=False)     # one tensor, in chunks: small temporaries
            return
        if target.refresh:
            self._compute_refreshes([target], unchanged="this parameter and its state are unchanged")
        self._projected_step(target)

    def _plain_step(self, group: dict, targets: list[_Target], foreach: bool) -> None:
        """AdamW on plain parameters of ``group`` (:func:`~lowrank_optim.plain_adamw.plain_adamw_step_`)."""
        if not targets:
            return
        params = [t.param for t in targets]
        rounding = [self._rounding(t.param) for t in targets]
        plain_adamw_step_(self.state, group, params, [t.grad for t in targets], form=self.adam_form,
                          moments_dtype=group["moments_dtype"], foreach=foreach, moment_bits=group["moment_bits"],
                          moment_block_size=group["moment_block_size"],
                          generators=rounding if any(g is not None for g in rounding) else None,
                          backends=[t.plan.backend for t in targets], shardings=[t.plan.sharding for t in targets])

    def _compute_refreshes(self, refreshing: list[_Target], advice: str = "",
                           unchanged: str = "no parameter or state was changed") -> None:
        """Every refreshing target's new subspace (and ``R`` where it comes free), all before any
        change: a failure raises naming the parameter with nothing changed."""
        for target, is_finite in zip(refreshing, finite_flags([target.param.grad for target in refreshing])):
            if not is_finite:
                raise FloatingPointError(f"{param_label(target.plan.key, target.param)}: non-finite gradient at a "
                                         f"subspace refresh; {unchanged}{advice}")
        for target in refreshing:
            plan = target.plan
            try:
                target.new_subspace, target.low_rank_grad = plan.projector.select_and_project(
                    target.grad, plan.rank, plan.side, plan.backend, plan.sharding,
                    previous=stored_subspace(self.state.get(target.param, {})))
            except (RuntimeError, ValueError) as error:     # torch.linalg.LinAlgError included
                for done in refreshing:
                    done.new_subspace = done.low_rank_grad = None
                raise RuntimeError(f"{param_label(plan.key, target.param)}: subspace refresh failed ({error}); "
                                   f"{unchanged}") from error

    def _projected_step(self, target: _Target) -> None:
        """One projected parameter's step: its state, the refresh's subspace, ``R``, then its rule."""
        state, group, plan = self.state[target.param], target.group, target.plan
        moments = plan.moments(state, target.weight)
        if not moments.exists:
            state["step"] = 0
            moments.create(self._moments_dtype(group, target.param), target.weight.device)
        if group["bias_correction"] == "slot" and "slot_steps" not in state:
            state["slot_steps"] = torch.full((plan.rank,), state["step"], dtype=torch.int64,
                                             device=target.weight.device)
        source_slots = None
        if target.new_subspace is not None:
            source_slots, overlap = install_subspace(state, target.new_subspace, moments, plan.projector,
                                                     policy=group["moments"], side=plan.side, shape=target.param.shape)
            self.refresh_stats[plan.key] = {"overlap": overlap}
        subspace = stored_subspace(state)
        state["step"] += 1
        low_rank_grad, grad_squares = target.low_rank_grad, None
        if low_rank_grad is None:
            squares = plan.rule.grad_squares(group)
            if squares is None:
                low_rank_grad = plan.projector.project(target.grad, subspace, plan.side, plan.backend)
            else:       # one pass over G for both where the backend can (kernels.projected_norms)
                low_rank_grad, grad_squares = plan.projector.project_with_squared_norms(
                    target.grad, subspace, plan.side, plan.backend, plan.side if squares == "channel" else None)
        if target.new_subspace is not None:
            self.refresh_stats[plan.key]["captured"] = _captured_fraction(low_rank_grad, target.grad, plan.sharding)
        basis_columns = functools.partial(plan.projector.basis_columns, subspace,
                                          compressed_size(target.weight.shape, plan.side), moments.float_dtype,
                                          plan.backend)
        plan.rule.update(
            ProjectedStep(target.weight, target.grad, low_rank_grad, moments, basis_columns, plan.side,
                          self._slot_step_counts(target, state), source_slots, state, plan.sharding, plan.backend,
                          self._rounding(target.param), grad_squares),
            AdamHyperparameters.of(group, self.adam_form), group)

    def _rounding(self, param: torch.Tensor) -> torch.Generator | None:
        """The generator of this step's stochastic rounding of ``param`` (an int8 weight, or a bf16
        one whose group asks for it; None when its plan rounds to nearest)."""
        if not self._plans[param].stochastic_round:
            return None
        step = self.state[param].get("step", 0) + 1 if param in self.state else 1
        return rounding_generator(self._plans[param].key, step, param.device)

    @staticmethod
    def _slot_step_counts(target: _Target, state: dict):
        """The step count ``t`` of the bias corrections: the parameter's (``bias_correction="step"``)
        or, with ``"slot"``, each slot's own count, shaped to broadcast against the moments."""
        if target.group["bias_correction"] != "slot":
            return state["step"]
        state["slot_steps"] += 1
        return state["slot_steps"].view((1, -1) if target.plan.side == "right" else (-1, 1))

    # ------------------------------------------------------------------------- in-backward modes
    @property
    def backward_projection(self) -> bool:
        return self.in_backward is not None

    @property
    def step_in_backward(self) -> bool:
        return self.in_backward is not None and self.in_backward.step_in_backward

    @property
    def accumulation_steps(self) -> int:
        return 1 if self.in_backward is None else self.in_backward.accumulation_steps

    @property
    def communicated_bytes(self) -> int:
        """Bytes this rank sent into the all-reduces of the last step (``process_group``)."""
        return 0 if self.in_backward is None else self.in_backward.communicated_bytes

    def stop_backward_projection(self) -> None:
        """Remove the backward hooks: the parameters get full gradients again and this optimizer
        steps them as without ``backward_projection`` (another optimizer may then take them over)."""
        if self.in_backward is not None:
            self.in_backward.detach()
            self.in_backward = None
        self.stagger_refreshes(False)

    def gradients_in_use(self) -> list[torch.Tensor]:
        """The gradients the next :meth:`step` will use, in parameter order: a projected
        accumulator, or the full gradient (averaged over the process group first under
        ``backward_projection`` with one). :func:`lowrank_optim.clip_grad_norm_` clips these."""
        if self.in_backward is not None:
            self.in_backward.synchronize()
        return [gradient_in_use(param) for param in self._groups if param.grad is not None]

    def zero_grad(self, set_to_none: bool = True) -> None:
        """``torch.optim.Optimizer.zero_grad`` (a projected accumulator goes with its
        :class:`ProjectedGradient`, or is zeroed in it; an accumulation window is dropped)."""
        super().zero_grad(set_to_none)
        if self.in_backward is not None:
            self.in_backward.gradients_zeroed()

    # ---------------------------------------------------------------------------------- summary
    def projection_summary(self) -> ProjectionSummary:
        """One row per parameter: name (or position), shape, projected or not, rank, side and the
        optimizer-state bytes it holds (this rank's shards under FSDP2) or, before its first step,
        will hold. ``str()`` of the result is a table; see :class:`~lowrank_optim.summary.ProjectionSummary`."""
        rows = []
        for group in self.param_groups:
            for param in group["params"]:
                plan = self.plan_of(param)
                held = self.state.get(param)
                state_bytes = tensor_bytes(held) if held else plan.expected_state_bytes(
                    param, group, self._moments_dtype(group, param))
                rows.append(ProjectionRow(plan.key, tuple(param.shape), plan.projected, plan.rank, plan.side,
                                          state_bytes, plan.note))
        return ProjectionSummary(rows)

    # ------------------------------------------------------------------------------ state io
    def state_dict(self):
        state = super().state_dict()
        state["skipped_steps"] = self.skipped_steps
        state["state_format"] = STATE_FORMAT
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict this version saved (:func:`~lowrank_optim.state_io.check_state_format`),
        keeping every saved state tensor's dtype (:mod:`lowrank_optim.state_io`)."""
        check_state_format(state_dict, set(self.defaults), type(self).__name__)
        super().load_state_dict(state_dict)
        restore_saved_dtypes(self, state_dict)
        self.skipped_steps = state_dict.get("skipped_steps", 0)

    def __getstate__(self) -> dict:
        """torch keeps only defaults, state and param_groups; the instance attributes go along, so
        ``copy.deepcopy``, ``pickle`` and ``torch.save`` give an optimizer that steps (an
        in-backward mode is rebuilt on the copy's parameters, without a process group)."""
        state = super().__getstate__()
        state.update(skip_nonfinite=self.skip_nonfinite, skipped_steps=self.skipped_steps,
                     _rank_given=list(self._rank_given), _staggered=self._staggered, _table_names=self._table_names,
                     _in_backward_settings=None if self.in_backward is None else self.in_backward.copied_settings())
        return state

    def __setstate__(self, state: dict) -> None:
        settings = state.pop("_in_backward_settings", None)
        super().__setstate__(state)
        self.refresh_stats = {}
        self.__dict__.setdefault("in_backward", None)      # load_state_dict keeps the mode it has
        self._plans = {}             # resolved again (load_state_dict calls this with the new groups)
        self._plan_all(warn=False)
        if settings is not None and self.in_backward is None:
            self.in_backward = InBackward(self, **settings)      # an unpickled copy hooks its own parameters


def _captured_fraction(low_rank_grad: torch.Tensor, grad: torch.Tensor, sharding: Sharding | None) -> torch.Tensor:
    """``‖R‖²/‖G‖²``: the share of the gradient inside the new subspace (over all shards)."""
    squares = summed(torch.stack([low_rank_grad.float().square().sum(), grad.float().square().sum()]), sharding)
    return squares[0] / squares[1].clamp_min(1e-30)
