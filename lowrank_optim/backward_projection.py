"""Gradients that never exist full-size: projection inside the backward pass.

``DCTProjAdam(..., backward_projection=True)`` (or ``GaLoreAdamW``) registers a
``register_post_accumulate_grad_hook`` on every projected parameter. As soon as the backward pass
has produced a weight's gradient ``G`` (``m×n``) the hook projects it into an ``m×r`` (or ``r×n``)
accumulator, ``A ← A + G·P`` (or ``Pᵀ·G``), and frees ``G``: at most one layer's full gradient is
alive at a time, plus the accumulators. The training loop stays
``loss.backward(); opt.step(); opt.zero_grad()``; plain parameters keep ordinary gradients.

**Exact accumulation.** The subspace is frozen within an accumulation window (it only changes in
:meth:`step`), so ``Σᵢ Gᵢ·P = (Σᵢ Gᵢ)·P``: ``k`` micro-batches accumulate exactly the projection of
the summed gradient, and a step with accumulation ``k`` equals one step on the ``k``-times batch.

**Refresh steps.** A refresh needs the summed full gradient (the selection is nonlinear in it), so
on the step where a weight's subspace is due the hook leaves its gradient alone and it accumulates
full-size as usual. Refreshes are *staggered*: weight ``j`` of ``W`` projected weights refreshes
when ``(t + o_j) mod T = 0`` (``t`` its step count, ``T`` = ``update_proj_gap``,
``o_j = ⌊j·T/W⌋``), so a step holds at most ``⌈W/T⌉`` full projected gradients. The first step,
which has no subspace yet, holds all of them once.

**Stepping in the backward pass** (``step_in_backward=True``, which implies the mode) goes one
step further: *every* parameter of the optimizer, projected or plain, is hooked, and at the last
of ``accumulation_steps`` backward passes of a window its hook takes the parameter's whole step
(refresh if due, moments, weight update) and frees its gradient and accumulator. Nothing
gradient-sized survives the backward pass: at most one parameter's full gradient exists at a time
(plus the accumulators of the other weights inside a window when ``accumulation_steps > 1``).
:meth:`step` only closes the window (a parameter that missed some micro-batches steps there on
what it accumulated; a window no parameter completed is an error, as is a backward pass after a
parameter's step and before :meth:`step`). With ``accumulation_steps=1`` the refresh schedule is
the standard one and each hook has the step's full gradient, so the trajectory is the standard
loop's, the scaled residual included; with more, refreshes are staggered as above and the residual
is refused. What it gives up: clipping by a global norm (every update happens before that norm
exists: both clipping calls raise), the atomicity of a step (an error in one hook leaves the
parameters stepped before it stepped) and ``skip_nonfinite``. The learning rate is read from the
group when the hook runs, so a scheduler stepped after :meth:`step` acts on the next window, as
in the standard loop. With ``process_group``, each hook averages its parameter's window gradient
(accumulator, refreshing or plain gradient) with ``torch.distributed.all_reduce`` before stepping;
the hooks run in the same order on every rank.

**What the mode refuses.** The scaled residual (DCTProjAdam's default) adds ``c·φ∘G`` with the
step's full ``G``, which the hooks free: ``residual="scaled"`` is an error (pass ``"none"``).
FSDP2-sharded parameters are refused too (their gradients are reduce-scattered by FSDP itself).

**Clipping.** Every clipping route (``torch.nn.utils.clip_grad_norm_`` by any reference,
``get_total_norm`` + ``clip_grads_with_norm_``, accelerate, Hugging Face Trainer's
``max_grad_norm``) reads ``param.grad``, so a projected weight's ``.grad`` is not freed but
replaced by a :class:`~lowrank_optim.gradient_stand_ins.ProjectedGradient`, which owns the
accumulator ``R``: the norm is ``‖R‖`` (``= ‖G·P‖ ≤ ‖G‖``, the norm of what the update reads) and
clipping scales ``R``. Each route therefore clips exactly as :func:`lowrank_optim.clip_grad_norm_`
does, with no second backward. Under ``step_in_backward`` a stepped parameter's ``.grad`` is a
:class:`~lowrank_optim.gradient_stand_ins.SteppedGradient`: its norm is the one the step used
(so logging it works) and clipping raises. Both leave ``.grad`` at :meth:`step`.

**Data parallel.** With ``process_group=...`` the optimizer all-reduces (averages) the
accumulators, the refreshing full gradients and the plain gradients itself, once per step
(``torch.distributed.all_reduce``): ``r/n`` of DDP's traffic for projected weights. Every rank holds
the same subspace, so the averaged accumulators are exactly the projection of the averaged
gradient. The parameters are broadcast from the group's first rank at construction, as DDP does;
do not wrap the model in ``DistributedDataParallel`` (its buckets would keep full gradients).
"""
from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .gradient_stand_ins import ProjectedGradient, SteppedGradient
from .projectors import stored_subspace
from .sharding import local
from .validation import param_label

# Parameters whose gradients are projected (or stepped) in the backward pass, so that a second
# optimizer cannot hook them too: id -> weak reference (a WeakSet would compare tensors with ==).
_PROJECTED_IN_BACKWARD: dict[int, weakref.ref] = {}


def _is_projected_in_backward(param: torch.Tensor) -> bool:
    entry = _PROJECTED_IN_BACKWARD.get(id(param))
    return entry is not None and entry() is param


def stagger_offset(position: int, count: int, gap: int) -> int:
    """``o_j = ⌊j·T/W⌋``: the refresh phase of the ``position``-th of ``count`` projected weights."""
    return position * gap // max(count, 1)


def register(params: list[torch.Tensor], hook, labels: list[str]) -> list:
    """Register ``hook(param)`` after each parameter's gradient accumulation; the handles. A
    parameter already projected by another optimizer is refused (both would replace its gradient)."""
    for param, label in zip(params, labels):
        if _is_projected_in_backward(param):
            raise ValueError(f"{label}: its gradient is already projected in the backward pass by another optimizer; "
                             "call that optimizer's stop_backward_projection() first")
    handles = []
    for param in params:
        _PROJECTED_IN_BACKWARD[id(param)] = weakref.ref(param)
        handles.append(param.register_post_accumulate_grad_hook(hook))
    return handles


def unregister(params: list[torch.Tensor], handles: list) -> None:
    """Remove the hooks of :func:`register`."""
    for handle in handles:
        handle.remove()
    for param in params:
        _PROJECTED_IN_BACKWARD.pop(id(param), None)


def synchronize(tensors: list[torch.Tensor], group) -> int:
    """Average ``tensors`` over ``group`` in place (one all-reduce each, in the given order, which
    every rank shares); returns the bytes sent into the collectives."""
    world = dist.get_world_size(group)
    for tensor in tensors:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
        tensor.div_(world)
    return sum(t.numel() * t.element_size() for t in tensors)


def broadcast_parameters(params: list[torch.Tensor], group) -> None:
    """Every rank starts from the group's first rank's parameters (as DDP's constructor does)."""
    source = dist.get_global_rank(group, 0)
    with torch.no_grad():
        for param in params:
            dist.broadcast(param.data, src=source, group=group)


@dataclass
class Window:
    """An accumulation window under ``step_in_backward``: backward passes each parameter has seen,
    the parameters already stepped, the bytes all-reduced."""

    backward_passes: dict = field(default_factory=dict)
    stepped: set = field(default_factory=set)
    communicated_bytes: int = 0

    @property
    def started(self) -> bool:
        return bool(self.backward_passes or self.stepped)


class BackwardProjection:
    """The optimizer side of the mode, mixed into :class:`lowrank_optim.engine.ProjectedAdamW`:
    hooks, accumulators, the accumulation window of ``step_in_backward`` and the all-reduces. It
    uses the engine's per-parameter steps (``_work_item``, ``_step_parameter``, ``_projector``,
    ``_needs_refresh``, ``_plan``)."""

    def _start_backward_projection(self) -> None:
        """Check the groups, hook every projected parameter (every parameter under
        ``step_in_backward``), broadcast the parameters of a process group (module
        :mod:`lowrank_optim.backward_projection`)."""
        residual_allowed = self.step_in_backward and self.accumulation_steps == 1
        hooked = self._hooked_params()
        for param in hooked:
            label = param_label(self._plans[param].key, param)
            if self._plans[param].rank is not None and self._groups[param]["residual"] == "scaled" \
                    and not residual_allowed:
                raise ValueError(f"{label}: residual='scaled' needs each step's full gradient, which "
                                 "backward_projection=True frees in the backward pass; pass residual='none' "
                                 "(or step_in_backward=True with accumulation_steps=1, where the hook has it)")
            if self._plans[param].sharding is not None:
                raise ValueError(f"{label}: backward_projection=True with FSDP2-sharded parameters is not supported "
                                 "(FSDP2 reduce-scatters full gradients itself); use it with one process or "
                                 "process_group=...")
        hook = self._step_in_backward if self.step_in_backward else self._project_in_backward
        self._hooks = register(hooked, hook, [param_label(self._plans[param].key, param) for param in hooked])
        if self._process_group is not None:
            broadcast_parameters(list(self._groups), self._process_group)

    def _hooked_params(self) -> list[torch.Tensor]:
        """The parameters the mode hooks, in parameter order: the projected ones, or every one
        under ``step_in_backward``."""
        return [param for param in self._groups if self.step_in_backward or self._plan(param).rank is not None]

    def stop_backward_projection(self) -> None:
        """Remove the backward hooks: the parameters get full gradients again and this optimizer
        steps them as without ``backward_projection`` (another optimizer may then take them over)."""
        if self._window.started:
            raise RuntimeError("stop_backward_projection() inside an accumulation window; call step() first")
        unregister(self._hooked_params(), self._hooks)
        self._hooks, self.backward_projection, self._process_group = [], False, None
        self.step_in_backward, self.accumulation_steps = False, 1

    @torch.no_grad()
    def _project_in_backward(self, param: torch.Tensor) -> None:
        """The post-accumulate-grad hook: replace ``G`` by a :class:`ProjectedGradient` holding
        ``A = proj(G)``, unless the parameter refreshes at the coming step (then its full gradient
        accumulates as usual). Later micro-batches accumulate into it (``A ← A + proj(G)``) in
        the autograd engine's ``grad += G``, before this hook runs again."""
        group = self._groups[param]
        if isinstance(param.grad, ProjectedGradient) or self._needs_refresh(param, group):
            return
        plan = self._plan(param)
        project = functools.partial(self._projector(group).project, subspace=stored_subspace(self.state[param]),
                                    side=plan.side, backend=plan.backend)
        param.grad = ProjectedGradient(param, param_label(plan.key, param), project(param.grad), project,
                                       averaged_in_step=self._process_group is not None)

    @torch.no_grad()
    def _step_in_backward(self, param: torch.Tensor) -> None:
        """The hook under ``step_in_backward``: accumulate this micro-batch (projected weights as
        :meth:`_project_in_backward` does, the others in ``.grad``) and, at the window's last
        backward pass, take the parameter's whole step and free everything it used."""
        window, group, plan = self._window, self._groups[param], self._plan(param)
        count = window.backward_passes.get(param, 0) + 1
        if count == 1 and param in window.stepped:
            raise RuntimeError(f"{param_label(plan.key, param)}: a backward pass after this parameter took its step "
                               f"(accumulation_steps={self.accumulation_steps}) and before optimizer.step(); "
                               f"call step() after every {self.accumulation_steps} backward pass(es)")
        if not window.started:
            self.refresh_stats = {}
        last = count == self.accumulation_steps
        if plan.rank is not None and (not last or isinstance(param.grad, ProjectedGradient)):
            self._project_in_backward(param)     # at a window's only backward pass the step projects G itself
        window.backward_passes[param] = count
        if last:
            self._step_one(group, param)

    def _step_one(self, group: dict, param: torch.Tensor) -> None:
        """One parameter's whole step from what its window accumulated (averaged over the process
        group first); its gradient and accumulator are then freed, and ``.grad`` holds a
        :class:`SteppedGradient` with their norm until :meth:`step`."""
        window = self._window
        if param.grad is None:              # zeroed outside the optimizer since its last backward pass
            window.backward_passes.pop(param, None)
            return
        used = _gradient_in_use(param)
        if self._process_group is not None:
            window.communicated_bytes += synchronize([used], self._process_group)
        norm = torch.linalg.vector_norm(used)
        item = self._work_item(group, param)
        window.backward_passes.pop(param, None)
        window.stepped.add(param)
        self._step_parameter(group, param, item)
        param.grad = SteppedGradient(param, param_label(self._plan(param).key, param), norm, self.accumulation_steps)

    def _finish_window(self) -> None:
        """:meth:`step` under ``step_in_backward``: the hooks took the steps; parameters that saw
        fewer backward passes than the others (unused in some micro-batches) step now on what they
        accumulated, and the window closes. A window no parameter completed is an error. Gradients
        set without a backward pass (torchtitan's zero-gradient step that creates the state) are
        stepped here, as the standard loop would."""
        window = self._window
        pending = list(window.backward_passes)        # stepped parameters leave it
        set_outside = [param for param in self._groups if param.grad is not None
                       and param not in window.backward_passes and param not in window.stepped]
        if pending and not window.stepped:
            param = pending[0]
            label = param_label(self._plan(param).key, param)
            raise RuntimeError(f"optimizer.step() after {window.backward_passes[param]} of accumulation_steps="
                               f"{self.accumulation_steps} backward passes (e.g. {label}); nothing was stepped. "
                               "Call backward() accumulation_steps times per step")
        for param in pending + set_outside:
            self._step_one(self._groups[param], param)
        for param in window.stepped:
            param.grad = None
        self.communicated_bytes = window.communicated_bytes
        self._window = Window()

    def _gradient_tensors(self) -> list[torch.Tensor]:
        """What the next step uses, in parameter order: each projected weight's accumulator, or
        the gradient of every other parameter that has one."""
        return [_gradient_in_use(param) for group in self.param_groups for param in group["params"]
                if param.grad is not None]

    def _synchronize(self) -> None:
        """Average the step's gradients over the process group, once per step."""
        if self._process_group is None or self._synchronized:
            return
        self.communicated_bytes = synchronize(self._gradient_tensors(), self._process_group)
        self._synchronized = True

    def gradients_in_use(self) -> list[torch.Tensor]:
        """The gradients the next :meth:`step` will use (averaged over the process group first
        under ``backward_projection`` with one): projected accumulators, full gradients otherwise.
        :func:`lowrank_optim.clip_grad_norm_` clips these in place."""
        self._synchronize()
        return self._gradient_tensors()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """``torch.optim.Optimizer.zero_grad`` (a projected accumulator goes with its
        :class:`ProjectedGradient`, or is zeroed in it)."""
        super().zero_grad(set_to_none)
        self._synchronized = False
        self._window.backward_passes.clear()        # a partial window is dropped with its gradients


def _gradient_in_use(param: torch.Tensor) -> torch.Tensor:
    """The tensor a step reads for ``param``: the accumulator of its :class:`ProjectedGradient`,
    or its gradient (this rank's shard under FSDP2)."""
    grad = param.grad
    return grad.low_rank if isinstance(grad, ProjectedGradient) else local(grad)
