"""The optimizer shell shared by :class:`GaLoreAdamW` and :class:`DCTProjAdam`.

The math of a projected step is one function, :func:`lowrank_optim.projected_adamw.projected_adamw_`;
plain parameters get :func:`lowrank_optim.plain_adamw.plain_adamw_step_`. This class is the
``torch.optim`` bookkeeping around them, in the shape of ``torch/optim/adam.py``:

* construction validates every hyperparameter (``ValueError`` naming the key and the value) and
  refuses unknown param-group keys; each parameter's *plan* (projected or plain, rank, side,
  backend) is resolved once from its shape, group, sharding and device;
* :meth:`step` loops the groups: :meth:`_init_group` creates state lazily and collects the
  parameters with gradients, the subspace refreshes of the step are all computed before anything
  changes, then every parameter takes its update;
* the state is tensors and ints only (``torch.load(weights_only=True)`` loads it) and keeps its
  dtypes on :meth:`load_state_dict`; ``copy.deepcopy``, ``pickle`` and ``torch.save`` of the
  optimizer keep its instance attributes.

**Refreshes.** A parameter's subspace is (re)computed from its gradient when its step count
(before the step) is ``0 mod update_proj_gap``. When ``P`` changes, the moments follow the group's
``moments`` policy: ``keep`` (slot by slot), ``reset`` (zeroed) or ``transport`` (re-expressed in
the new basis; a slot gather for the DCT, fused into the moment update). A refresh that yields
``R`` for free (the DCT's PyTorch path forms all coefficients ``S`` to score them) keeps it until
its parameter is updated: at a refresh step that holds up to one ``R`` per refreshing weight.

Steps are atomic with respect to refresh failures: a non-finite gradient or an SVD that does not
converge at a refresh raises an error naming the parameter, with every parameter and state as it
was. ``skip_nonfinite=True`` instead checks every gradient once per step and skips the whole step
(counted in ``skipped_steps``, warned).

**torch.compile.** ``torch.compile(opt.step)`` gives the eager trajectory because :meth:`step`
disables Dynamo for itself and everything it calls (``torch._disable_dynamo``, the lazy form of
``torch.compiler.disable``, so that importing the library imports neither Dynamo nor Triton): it runs eagerly
inside a compiled training step. Tracing it was measured to diverge silently — Dynamo's handling
of the step counters kept in the state dicts froze them (eager counts 1 2 3 4 …, compiled 1 2 2
2 …), also when only the frames below :meth:`step` were traced — and compiling the element-wise
math alone would recompile every step (its learning rate and bias corrections are Python floats).
Compile the model; the projected step's heavy work is GEMMs and, on CUDA, the fused Triton kernels.

**FSDP2.** Parameters sharded by ``fully_shard`` (DTensors) are stepped shard by shard, with their
moments as DTensors sharded like them; the projector's selection, the residual's norm and the
finiteness checks reduce over the shards (:mod:`lowrank_optim.sharding`, which also fixes the side).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import ClassVar

import torch

from .adam_form import AdamForm
from .backward_projection import BackwardProjection, Window, stagger_offset
from .finite import all_finite, finite_flags
from .geometry import compressed_size, projected_shape, resolve_side
from .gradient_stand_ins import ProjectedGradient
from .kernels.backend import check_backend, resolve_backend
from .moments import Moments
from .plain_adamw import as_float, plain_adamw_step_
from .projected_adamw import projected_adamw_
from .projectors import PROJECTORS, SUBSPACE_PREFIX, Projector, Subspace, stored_subspace
from .quantization import check_moment_bits, check_moment_block_size
from .residual import RESIDUALS
from .rounding import rounding_generator
from .selection import vocabulary_matrices
from .sharding import Sharding, local, local_side, summed
from .state_bytes import tensor_bytes
from .state_io import STATE_FORMAT, check_state_format, restore_saved_dtypes
from .summary import ProjectionRow, ProjectionSummary
from .validation import (
    InvalidHyperparameter,
    check_adamw_hyperparameters,
    check_bool,
    check_choice,
    check_dense_real_grad,
    check_float_dtype_or_none,
    check_group_keys,
    check_positive_int,
    check_positive_real,
    check_torch_keywords,
    param_label,
)

MOMENT_POLICIES = ("keep", "reset", "transport")
BIAS_CORRECTIONS = ("step", "slot")
TORCH_KEYWORDS = ("foreach", "maximize", "capturable", "differentiable", "fused")


@dataclass(frozen=True)
class _Plan:
    """How one parameter is stepped, resolved once: plain AdamW when ``rank`` is None."""

    key: str                    # its name, or its position in the param groups
    rank: int | None
    side: str | None
    backend: str | None         # "torch" or "triton", for the parameter's device and dtypes
    sharding: Sharding | None
    note: str | None = None     # why a parameter its group would project stays plain


@dataclass
class _Projected:
    """A projected parameter of this step. ``weight`` and ``grad`` are the parameter and its
    gradient (negated under ``maximize``), or this rank's shards of them under FSDP2."""

    group: dict
    param: torch.Tensor
    plan: _Plan
    weight: torch.Tensor
    grad: torch.Tensor
    projector: Projector
    refresh: bool
    new_subspace: Subspace | None = None
    low_rank_grad: torch.Tensor | None = None     # R, when the refresh produced it


class ProjectedAdamW(BackwardProjection, torch.optim.Optimizer):
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
        check_bool("backward_projection", backward_projection)
        check_bool("step_in_backward", step_in_backward)
        check_positive_int("accumulation_steps", accumulation_steps)
        if accumulation_steps != 1 and not step_in_backward:
            raise InvalidHyperparameter("accumulation_steps", accumulation_steps, (
                f"Invalid accumulation_steps: {accumulation_steps!r} (only with step_in_backward=True, whose hooks "
                "must know which backward pass ends a step; otherwise accumulate as usual and call step() once "
                "per window)"))
        if step_in_backward and skip_nonfinite:
            raise InvalidHyperparameter("skip_nonfinite", skip_nonfinite, (
                "Invalid skip_nonfinite: True with step_in_backward=True (each parameter is updated in the "
                "backward pass, before all gradients are known to be finite)"))
        backward_projection = backward_projection or step_in_backward
        if process_group is not None and not backward_projection:
            raise InvalidHyperparameter("process_group", process_group, (
                f"Invalid process_group: {process_group!r} (only with backward_projection=True, where the optimizer "
                "all-reduces the projected gradients; otherwise wrap the model in DDP)"))
        defaults = dict(defaults, foreach=foreach, maximize=maximize, capturable=capturable,
                        differentiable=differentiable, fused=fused)
        self.skip_nonfinite = skip_nonfinite
        self.skipped_steps = 0
        self.refresh_stats: dict[str, dict[str, torch.Tensor]] = {}
        self.backward_projection = backward_projection
        self.step_in_backward = step_in_backward
        self.accumulation_steps = accumulation_steps
        self.communicated_bytes = 0         # sent into all-reduces by this rank at the last step
        self._process_group = process_group
        self._rank_given: list[bool] = []
        self._plans: dict[torch.Tensor, _Plan] = {}
        self._refresh_offsets: dict[torch.Tensor, int] = {}
        self._groups: dict[torch.Tensor, dict] = {}
        self._window = Window()
        self._synchronized = False
        self._hooks: list = []
        super().__init__(params, defaults)
        self._plan_all(warn=True)
        if backward_projection:
            self._start_backward_projection()

    # ----------------------------------------------------------------------------- param groups
    def add_param_group(self, param_group: dict) -> None:
        """Validate and add a group; a rejected group leaves the optimizer as it was."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        check_group_keys(param_group, set(self.defaults) | set(self.group_only_keys), type(self).__name__)
        if self.__dict__.get("_hooks") and self.step_in_backward:
            raise ValueError("add_param_group after construction with step_in_backward=True: the new parameters "
                             "would have no hook and never step; build the optimizer with every param group")
        rank_given = "rank" in param_group
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self._validate_shared_keys(group)
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

    @staticmethod
    def _validate_shared_keys(group: dict) -> None:
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
    def _plan(self, param: torch.Tensor) -> _Plan:
        if param not in self._plans:
            self._plan_all(warn=False)
        return self._plans[param]

    def _plan_all(self, warn: bool) -> None:
        """Resolve every parameter's plan; with ``warn``, say what the default rule could not tell."""
        entries, positions = [], []          # the 2-D parameters of groups without their own rank
        for group_index, group in enumerate(self.param_groups):
            for index, param in enumerate(group["params"]):
                if param.ndim == 2 and not self._rank_given[group_index]:
                    entries.append((self._param_name(group, index), tuple(param.shape)))
                    positions.append((group_index, index))
        vocabulary, undecided = vocabulary_matrices(entries)
        vocabulary = {positions[i] for i in vocabulary}
        plans = {}
        for group_index, group in enumerate(self.param_groups):
            for index, param in enumerate(group["params"]):
                key = self._key(group_index, group, index)
                rank = self._projection_rank(group, param, self._rank_given[group_index],
                                             (group_index, index) in vocabulary)
                plans[param] = self._compressing_plan(group, param, key, rank,
                                                      warn=warn and self._rank_given[group_index])
        self._plans = plans
        self._groups = {param: group for group in self.param_groups for param in group["params"]}
        projected = [(group, param) for group in self.param_groups for param in group["params"]
                     if plans[param].rank is not None]
        self._refresh_offsets = {param: stagger_offset(j, len(projected), group["update_proj_gap"])
                                 for j, (group, param) in enumerate(projected)}
        if not warn:
            return
        for i in undecided:
            group_index, index = positions[i]
            param = self.param_groups[group_index]["params"][index]
            if self._plans[param].rank is not None:
                warnings.warn(f"{type(self).__name__}: cannot tell from its shape whether the 2-D "
                              f"{param_label(self._plans[param].key, param)} is an embedding or output head; it is "
                              "projected. Pass model.named_parameters(), or put it in a param group with "
                              "rank=None to keep it in full AdamW", UserWarning, stacklevel=4)
        if plans and all(plan.rank is None and plan.note is None for plan in plans.values()):
            warnings.warn(f"{type(self).__name__}: {self._nothing_projected_warning()}", UserWarning, stacklevel=4)

    def _compressing_plan(self, group: dict, param: torch.Tensor, key: str, rank: int | None, warn: bool) -> _Plan:
        """The plan of ``param`` at ``rank``, or the plain plan when projecting would not compress
        it: at a rank not below its smaller side (the whole space), or when the projected state
        (moments in the group's format, subspace, counters) would take at least the bytes of
        AdamW's float moments. ``warn``: the group asked for that rank itself, so the user hears
        about it, once."""
        plan = self._resolve_plan(group, param, key, rank)
        if plan.rank is None:
            return plan
        plain = self._resolve_plan(group, param, key, None)
        projected_bytes = self._expected_state_bytes(group, param, plan)
        float_bytes = self._expected_state_bytes({**group, "moment_bits": None}, param, plain)
        if plan.rank < min(param.shape) and projected_bytes < float_bytes:
            return plan
        note = (f"rank {plan.rank} would not compress it: projected state {projected_bytes:,} B >= AdamW's "
                f"{float_bytes:,} B" if plan.rank < min(param.shape) else
                f"rank {plan.rank} spans its smaller side: nothing to compress")
        if warn:
            warnings.warn(f"{type(self).__name__}: {param_label(key, param)} stays plain AdamW: {note}; pass a "
                          "smaller rank to project it", UserWarning, stacklevel=5)
        return _Plan(key, None, None, plain.backend, plain.sharding, note)

    def _resolve_plan(self, group: dict, param: torch.Tensor, key: str, rank: int | None) -> _Plan:
        label = param_label(key, param)
        sharding = Sharding.of(param, label)
        if sharding is not None and group["moment_bits"] is not None:
            raise ValueError(f"{label}: moment_bits={group['moment_bits']} with FSDP2-sharded parameters is not "
                             "supported (quantized blocks would depend on the shard layout); use float moments "
                             "(moment_bits=None) or DDP")
        if group["backend"] == "triton" and group["bf16_stochastic_round"] and param.dtype == torch.bfloat16:
            raise ValueError(f"{label}: backend='triton' with bf16_stochastic_round=True (the fused weight update "
                             "rounds to nearest; stochastic rounding runs on PyTorch); pass backend='auto' (Triton "
                             "moments, PyTorch weight update) or 'torch'")
        try:
            backend = resolve_backend(group["backend"], param.device, (param.dtype, self._moments_dtype(group, param)))
        except ValueError as error:
            raise ValueError(f"{label}: {error}") from None
        if rank is None:
            return _Plan(key, None, None, backend, sharding)
        mode = group[self.side_key]
        side = local_side(sharding, resolve_side(param.shape, mode), mode, label)
        return _Plan(key, rank, side, backend, sharding)

    # ----------------------------------------------------------------------------------- step
    @torch._disable_dynamo        # lazy: importing torch._dynamo here would import Triton (module doc)
    def step(self, closure=None):
        """One optimization step on every parameter with a gradient (module doc)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with torch.no_grad():
            self._step()
        return loss

    def _step(self) -> None:
        if self.step_in_backward:
            self._finish_window()
            return
        try:
            self._step_groups()
        finally:
            self._synchronized = False
            for param in self._groups:          # the step consumed the accumulators projected in the backward pass
                if isinstance(param.grad, ProjectedGradient):
                    param.grad = None

    def _step_groups(self) -> None:
        self._synchronize()
        work = [self._init_group(group) for group in self.param_groups]
        self.refresh_stats = {}
        if self.skip_nonfinite:
            # the gradients as autograd left them (DTensors under FSDP2: their check spans the shards)
            grads = [p.grad for (params, _), _ in work for p in params] + [
                i.param.grad if i.low_rank_grad is None else i.low_rank_grad for _, p in work for i in p]
            if not all_finite(grads):
                self.skipped_steps += 1
                warnings.warn(f"{type(self).__name__}: non-finite gradient, step skipped "
                              f"({self.skipped_steps} skipped so far)", RuntimeWarning, stacklevel=4)
                return

        self._compute_refreshes([item for _, projected in work for item in projected if item.refresh])
        for group, ((params, grads), projected) in zip(self.param_groups, work):
            self._plain_step(group, params, grads, foreach=group["foreach"] is not False)
            for item in projected:
                self._projected_step(item)

    def _init_group(self, group: dict):
        """``((plain params, their grads), projected items)`` of the parameters with gradients,
        gradients validated (and negated under ``maximize``)."""
        params, grads, projected = [], [], []
        for param in group["params"]:
            item = self._work_item(group, param)
            if isinstance(item, _Projected):
                projected.append(item)
            elif item is not None:
                params.append(param)
                grads.append(item)
        return (params, grads), projected

    def _work_item(self, group: dict, param: torch.Tensor) -> _Projected | torch.Tensor | None:
        """What stepping ``param`` takes: a :class:`_Projected` item, the gradient of a plain
        parameter (validated, negated under ``maximize``), or None without a gradient."""
        if param.grad is None:
            return None
        plan = self._plan(param)
        sign = -1.0 if group["maximize"] else 1.0
        if isinstance(param.grad, ProjectedGradient):     # projected in the backward pass
            accumulated = param.grad.low_rank
            return _Projected(group, param, plan, param, None, self._projector(group), refresh=False,
                              low_rank_grad=accumulated.mul_(sign) if sign < 0 else accumulated)
        check_dense_real_grad(param.grad, param_label(plan.key, param))
        grad = -local(param.grad) if sign < 0 else local(param.grad)
        if plan.rank is None:
            return grad
        return _Projected(group, param, plan, local(param), grad, self._projector(group),
                          refresh=self._needs_refresh(param, group))

    def _projector(self, group: dict) -> Projector:
        return PROJECTORS[self._projector_name(group)](group)

    def _step_parameter(self, group: dict, param: torch.Tensor, item: _Projected | torch.Tensor) -> None:
        """One parameter's step from its :meth:`_work_item`, alone (``step_in_backward``'s hooks)."""
        if isinstance(item, _Projected):
            if item.refresh:
                self._compute_refreshes([item], unchanged="this parameter and its state are unchanged "
                                        "(parameters stepped earlier in this backward pass are not)")
            self._projected_step(item)
            return
        self._plain_step(group, [param], [item], foreach=False)     # one tensor, in chunks: small temporaries

    def _plain_step(self, group: dict, params: list[torch.Tensor], grads: list[torch.Tensor], foreach: bool) -> None:
        """AdamW on plain parameters of ``group`` (:func:`~lowrank_optim.plain_adamw.plain_adamw_step_`)."""
        generators = [self._rounding(group, param) for param in params] if group["bf16_stochastic_round"] else None
        plain_adamw_step_(self.state, group, params, grads, form=self.adam_form, moments_dtype=group["moments_dtype"],
                          foreach=foreach, moment_bits=group["moment_bits"],
                          moment_block_size=group["moment_block_size"], generators=generators,
                          backends=[self._plans[param].backend for param in params])

    def _needs_refresh(self, param: torch.Tensor, group: dict) -> bool:
        """Whether ``param``'s subspace is recomputed at its next step: at its first, then every
        ``update_proj_gap`` steps (staggered by weight under ``backward_projection``)."""
        state = self.state.get(param, {})
        has_subspace = any(key.startswith(SUBSPACE_PREFIX) for key in state)
        offset = self._refresh_offsets.get(param, 0) if self._staggered else 0
        return not has_subspace or (state["step"] + offset) % group["update_proj_gap"] == 0

    @property
    def _staggered(self) -> bool:
        """Refreshes are staggered when a refreshing weight's full gradient would outlive its hook:
        under backward projection, unless each step is one backward pass taken in the hooks."""
        return self.backward_projection and not (self.step_in_backward and self.accumulation_steps == 1)

    def _compute_refreshes(self, refreshing: list[_Projected],
                           unchanged: str = "no parameter or state was changed") -> None:
        if not refreshing:
            return
        for item, is_finite in zip(refreshing, finite_flags([item.param.grad for item in refreshing])):
            if not is_finite:
                advice = "" if self.step_in_backward else " (pass skip_nonfinite=True to skip such steps)"
                raise FloatingPointError(
                    f"{param_label(item.plan.key, item.param)}: non-finite gradient at a subspace refresh; "
                    f"{unchanged}{advice}")
        for item in refreshing:
            try:
                item.new_subspace, item.low_rank_grad = item.projector.select_and_project(
                    item.grad, item.plan.rank, item.plan.side, item.plan.backend, item.plan.sharding)
            except (RuntimeError, ValueError) as error:     # torch.linalg.LinAlgError included
                for done in refreshing:
                    done.new_subspace = done.low_rank_grad = None
                raise RuntimeError(f"{param_label(item.plan.key, item.param)}: subspace refresh failed ({error}); "
                                   f"{unchanged}") from error

    def _moments_dtype(self, group: dict, param: torch.Tensor) -> torch.dtype:
        return group["moments_dtype"] or param.dtype

    def _projected_step(self, item: _Projected) -> None:
        state, group, plan = self.state[item.param], item.group, item.plan
        moments = self._moments(item, state)
        if not moments.exists:
            state["step"] = 0
            moments.create(self._moments_dtype(group, item.param), item.weight.device,
                           local_shape=projected_shape(item.weight.shape, plan.side, plan.rank))
        if group["bias_correction"] == "slot" and "slot_steps" not in state:
            state["slot_steps"] = torch.full((plan.rank,), state["step"], dtype=torch.int64, device=item.weight.device)
        source_slots = self._install_subspace(item, state, moments) if item.new_subspace is not None else None
        subspace = stored_subspace(state)
        state["step"] += 1

        low_rank_grad = item.low_rank_grad
        if low_rank_grad is None:
            low_rank_grad = item.projector.project(item.grad, subspace, plan.side, plan.backend)
        if item.new_subspace is not None:
            self.refresh_stats[plan.key]["captured"] = _captured_fraction(low_rank_grad, item.grad, plan.sharding)
        basis, indices = item.projector.basis_columns(
            subspace, compressed_size(item.weight.shape, plan.side), moments.float_dtype, plan.backend)
        beta1, beta2 = group["betas"]
        residual_norm = projected_adamw_(
            item.weight, item.grad, low_rank_grad, moments, basis, indices,
            side=plan.side, step=self._slot_step_counts(item, state), lr=as_float(group["lr"]), beta1=beta1,
            beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"], scale=group["scale"],
            form=self.adam_form, correct_bias=group.get("correct_bias", True), source_slots=source_slots,
            residual=group["residual"] == "scaled", residual_norm=state.get("residual_norm"),
            sharding=plan.sharding, backend=plan.backend,
            stochastic_round=self._rounding(group, item.param) if group["bf16_stochastic_round"] else None)
        if residual_norm is not None:
            state["residual_norm"] = residual_norm

    def _moments(self, item: _Projected, state: dict) -> Moments:
        """The projected moments of ``item`` (of the global projected shape), stored as its state holds them."""
        shape = projected_shape(item.param.shape, item.plan.side, item.plan.rank)
        return Moments.of(state, shape, item.plan.side, item.group["moment_bits"], item.group["moment_block_size"],
                          unwrap=local, wrap=lambda tensor: self._moment(item, tensor))

    def _rounding(self, group: dict, param: torch.Tensor) -> torch.Generator | None:
        """The generator of this step's stochastic rounding of a bf16 ``param`` (None for other dtypes)."""
        if param.dtype != torch.bfloat16:
            return None
        step = self.state[param].get("step", 0) + 1 if param in self.state else 1
        return rounding_generator(self._plans[param].key, step, param.device)

    @staticmethod
    def _moment(item: _Projected, tensor: torch.Tensor) -> torch.Tensor:
        """A moment as stored: this rank's shard of a DTensor sharded like the parameter, or itself."""
        if item.plan.sharding is None:
            return tensor
        return item.plan.sharding.distribute(tensor, projected_shape(item.param.shape, item.plan.side, item.plan.rank))

    @staticmethod
    def _slot_step_counts(item: _Projected, state: dict):
        """The step count ``t`` of the bias corrections: the parameter's (``bias_correction="step"``)
        or, with ``"slot"``, each slot's own count, shaped to broadcast against the moments."""
        if item.group["bias_correction"] != "slot":
            return state["step"]
        state["slot_steps"] += 1
        return state["slot_steps"].view((1, -1) if item.plan.side == "right" else (-1, 1))

    def _install_subspace(self, item: _Projected, state: dict, moments: Moments) -> torch.Tensor | None:
        """Store the new subspace and move the moments by the group's policy; returns the source
        slots of a transport deferred to the moment update (a slot gather), else None."""
        old, new, plan = stored_subspace(state), item.new_subspace, item.plan
        source_slots = None
        if old and item.group["moments"] == "reset":
            moments.zero_()
            if "slot_steps" in state:
                state["slot_steps"].zero_()
        elif old and item.group["moments"] == "transport":
            source_slots = item.projector.transport_slots(old, new)
            if source_slots is None:
                moments.transform_(lambda m: item.projector.transport(m, old, new, plan.side, False),
                                   lambda v: item.projector.transport(v, old, new, plan.side, True))
            elif "slot_steps" in state:
                kept = source_slots >= 0
                state["slot_steps"] = state["slot_steps"][source_slots.clamp(min=0)] * kept
        size = compressed_size(item.param.shape, plan.side)
        self.refresh_stats[plan.key] = {
            "overlap": item.projector.overlap(old, new, size) if old else torch.tensor(0.0)}
        for key in [k for k in state if k.startswith(SUBSPACE_PREFIX)]:
            del state[key]
        for key, tensor in new.items():
            state[SUBSPACE_PREFIX + key] = tensor
        return source_slots

    # ---------------------------------------------------------------------------------- summary
    def projection_summary(self) -> ProjectionSummary:
        """One row per parameter: name (or position), shape, projected or not, rank, side and the
        optimizer-state bytes it holds (this rank's shards under FSDP2) or, before its first step,
        will hold. ``str()`` of the result is a table; see :class:`~lowrank_optim.summary.ProjectionSummary`."""
        rows = []
        for group in self.param_groups:
            for param in group["params"]:
                plan = self._plan(param)
                held = self.state.get(param)
                state_bytes = tensor_bytes(held) if held else self._expected_state_bytes(group, param, plan)
                rows.append(ProjectionRow(plan.key, tuple(param.shape), plan.rank is not None, plan.rank, plan.side,
                                          state_bytes, plan.note))
        return ProjectionSummary(rows)

    def _expected_state_bytes(self, group: dict, param: torch.Tensor, plan: _Plan) -> int:
        """The bytes the first step allocates for ``param`` (whole parameter, before sharding)."""
        dtype = self._moments_dtype(group, param)
        if plan.rank is None:
            return Moments.of({}, param.shape, None, group["moment_bits"],
                              group["moment_block_size"]).expected_bytes(dtype)
        shape = projected_shape(param.shape, plan.side, plan.rank)
        moments = Moments.of({}, shape, plan.side, group["moment_bits"],
                             group["moment_block_size"]).expected_bytes(dtype)
        projector = PROJECTORS[self._projector_name(group)](group)
        subspace = projector.subspace_bytes(compressed_size(param.shape, plan.side), plan.rank, param.dtype)
        slot_steps = 8 * plan.rank if group["bias_correction"] == "slot" else 0
        residual = 4 if group["residual"] == "scaled" else 0
        return moments + subspace + slot_steps + residual

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
        ``copy.deepcopy``, ``pickle`` and ``torch.save`` give an optimizer that steps."""
        state = super().__getstate__()
        state.update(skip_nonfinite=self.skip_nonfinite, skipped_steps=self.skipped_steps,
                     _rank_given=list(self._rank_given), backward_projection=self.backward_projection,
                     step_in_backward=self.step_in_backward, accumulation_steps=self.accumulation_steps)
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("skip_nonfinite", False)
        self.__dict__.setdefault("skipped_steps", 0)
        self.__dict__.setdefault("_rank_given", [False] * len(self.param_groups))
        self.__dict__.setdefault("backward_projection", False)
        self.__dict__.setdefault("step_in_backward", False)
        self.__dict__.setdefault("accumulation_steps", 1)
        self._window = Window()
        self.__dict__.setdefault("communicated_bytes", 0)
        self.__dict__.setdefault("_process_group", None)    # a copy does not share the original's group
        self.__dict__.setdefault("_synchronized", False)
        self.refresh_stats = {}
        self._plans = {}             # resolved again (load_state_dict calls this with the new groups)
        self._refresh_offsets = {}
        self._plan_all(warn=False)
        if self.backward_projection and not self.__dict__.get("_hooks"):
            self._hooks = []
            self._start_backward_projection()         # an unpickled copy hooks its own parameters


def _captured_fraction(low_rank_grad: torch.Tensor, grad: torch.Tensor, sharding: Sharding | None) -> torch.Tensor:
    """``‖R‖²/‖G‖²``: the share of the gradient inside the new subspace (over all shards)."""
    squares = summed(torch.stack([low_rank_grad.float().square().sum(), grad.float().square().sum()]), sharding)
    return squares[0] / squares[1].clamp_min(1e-30)
