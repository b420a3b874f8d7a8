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

**Stepping in the backward pass** (``step_in_backward=True``, which implies the mode) goes one step
further: *every* parameter of the optimizer, projected or plain, is hooked, and at the last of
``accumulation_steps`` backward passes of a window its hook takes the parameter's whole step
(refresh if due, moments, weight update) and frees its gradient and accumulator. Nothing
gradient-sized survives the backward pass: at most one parameter's full gradient exists at a time
(plus the accumulators of the other weights inside a window when ``accumulation_steps > 1``).
:meth:`step` only closes the window (a parameter that missed some micro-batches steps there on what
it accumulated; a window no parameter completed is an error, as is a backward pass after a
parameter's step and before :meth:`step`). With ``accumulation_steps=1`` the refresh schedule is the
standard one and each hook has the step's full gradient, so the trajectory is the standard loop's,
the scaled residual included; with more, refreshes are staggered as above. A weight whose update
rule reads the full gradient (the scaled residual, APOLLO) is not projected in its hooks: its
gradient accumulates full-size through the window, as a plain parameter's does, and its last hook
steps it exactly as the standard loop would. What it gives up: clipping by a global norm (every
update happens before that norm exists: both clipping calls raise), the atomicity of a step (an
error in one hook leaves the parameters stepped before it stepped) and ``skip_nonfinite``. The
learning rate is read from the group when the hook runs, so a scheduler stepped after :meth:`step`
acts on the next window, as in the standard loop. With ``process_group``, each hook averages its
parameter's window gradient (accumulator, refreshing or plain gradient) with
``torch.distributed.all_reduce`` before stepping; the hooks run in the same order on every rank.

**What the mode refuses.** Without ``step_in_backward``, an update rule that reads the step's full
``G`` (the scaled residual, DCTProjAdam's default, adds ``c·φ∘G``; APOLLO scales ``G``), which the
hooks free: ``residual="scaled"`` and ``update_rule="apollo"`` are errors naming the parameter.
FSDP2-sharded parameters are refused too: FSDP2 reduce-scatters the full unsharded gradient before
any hook sees it (projecting the shard afterwards saves no communication) and adds a later
micro-batch's shard into ``.grad``'s local tensor itself, bypassing the accumulator.

**FSDP2** (``step_in_backward`` only). FSDP2 runs a sharded parameter's post-accumulate-grad hooks
right after its reduce-scatter (HSDP: after the replicate all-reduce too), with ``.grad`` the reduced
shard: the hook steps that shard with :meth:`~lowrank_optim.engine.ProjectedAdamW.step_parameter`,
as ``step()`` would, the refresh's collectives included (score all-reduces, GaLore's gather and
broadcast, the norms APOLLO and the residual reduce). A hook's collectives cannot deadlock: every
rank runs the same hooks in the same order (FSDP2's reduction order, the same model) and decides
whether to communicate from state every rank shares (step counts, plans; non-finite flags are
reduced first), so each process group sees the same sequence of collectives on every rank, FSDP2's
own interleaved as FSDP2 issues them. The stepped parameter's ``.grad`` is its
:class:`~lowrank_optim.gradient_stand_ins.SteppedGradient` as a DTensor placed like the parameter
(its local norm the shard's), so DTensor's norm reduction gives the global gradient norm, clipping
raises as on one process, and the shard's reduced gradient is freed. Accumulate with
``model.set_requires_gradient_sync(False)`` on the non-final micro-batches and
``accumulation_steps=1``: FSDP2 then keeps the unsharded gradients itself and runs the hooks once,
on the window's summed gradient (``accumulation_steps > 1`` and ``process_group`` are refused for
sharded parameters).

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

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from .gradient_stand_ins import ProjectedGradient, SteppedGradient
from .sharding import local, placed_like
from .validation import InvalidHyperparameter, check_bool, check_positive_int, param_label
from .weights import int8_storage, is_int8_weight

if TYPE_CHECKING:
    from .engine import ProjectedAdamW


def stagger_offset(position: int, count: int, gap: int) -> int:
    """``o_j = ⌊j·T/W⌋``: the refresh phase of the ``position``-th of ``count`` projected weights."""
    return position * gap // max(count, 1)


def synchronize(tensors: list[torch.Tensor], group) -> int:
    """Average ``tensors`` over ``group`` in place (one all-reduce each, in the given order, which
    every rank shares); returns the bytes sent into the collectives."""
    world = dist.get_world_size(group)
    for tensor in tensors:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
        tensor.div_(world)
    return sum(t.numel() * t.element_size() for t in tensors)


def broadcast_parameters(params: list[torch.Tensor], group) -> None:
    """Every rank starts from the group's first rank's parameters (as DDP's constructor does; an
    int8 weight as its codes and scales, the tensors it holds)."""
    source = dist.get_global_rank(group, 0)
    with torch.no_grad():
        for param in params:
            for tensor in int8_storage(param) if is_int8_weight(param) else (param.data,):
                dist.broadcast(tensor, src=source, group=group)


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


class InBackward:
    """``backward_projection`` or ``step_in_backward`` for one optimizer (module doc).

    Built on the optimizer's per-parameter API only (:meth:`~lowrank_optim.engine.ProjectedAdamW.plan_of`,
    :meth:`~lowrank_optim.engine.ProjectedAdamW.gradient_projection`,
    :meth:`~lowrank_optim.engine.ProjectedAdamW.step_parameter`,
    :meth:`~lowrank_optim.engine.ProjectedAdamW.stagger_refreshes`): the optimizer holds it and calls
    :meth:`before_step` at :meth:`step`, :meth:`gradients_zeroed` at ``zero_grad`` and
    :meth:`check_new_group` at ``add_param_group``. The hooks live on the parameters; which
    parameters are hooked is read from their hooks, so two optimizers never project one gradient."""

    @staticmethod
    def settings(*, backward_projection: bool, step_in_backward: bool, accumulation_steps: int, process_group,
                 skip_nonfinite: bool) -> dict | None:
        """The keywords of :class:`InBackward` for an optimizer's constructor keywords, checked
        (``ValueError`` naming the keyword); None when neither mode is asked for."""
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
        if process_group is not None and not (backward_projection or step_in_backward):
            raise InvalidHyperparameter("process_group", process_group, (
                f"Invalid process_group: {process_group!r} (only with backward_projection=True, where the optimizer "
                "all-reduces the projected gradients; otherwise wrap the model in DDP)"))
        if not (backward_projection or step_in_backward):
            return None
        return dict(step_in_backward=step_in_backward, accumulation_steps=accumulation_steps,
                    process_group=process_group)

    def __init__(self, optimizer: ProjectedAdamW, *, step_in_backward: bool, accumulation_steps: int = 1,
                 process_group=None):
        self.optimizer = optimizer
        self.step_in_backward = step_in_backward
        self.accumulation_steps = accumulation_steps
        self.process_group = process_group
        self.communicated_bytes = 0          # sent into all-reduces by this rank at the last step
        self._window = Window()
        self._synchronized = False
        self._params = [param for group in optimizer.param_groups for param in group["params"]
                        if step_in_backward or optimizer.plan_of(param).projected]
        self._check_parameters()
        optimizer.stagger_refreshes(not (step_in_backward and accumulation_steps == 1))
        self._handles = [param.register_post_accumulate_grad_hook(self._hook) for param in self._params]
        if process_group is not None:
            broadcast_parameters([p for group in optimizer.param_groups for p in group["params"]], process_group)

    def _label(self, param: torch.Tensor) -> str:
        return param_label(self.optimizer.plan_of(param).key, param)

    def _check_parameters(self) -> None:
        groups = {param: group for group in self.optimizer.param_groups for param in group["params"]}
        self._full_gradient = set()          # projected weights whose rule reads G: never projected in a hook
        for param in self._params:
            plan = self.optimizer.plan_of(param)
            use = plan.rule.full_gradient_use(groups[param]) if plan.projected else None
            if use is not None and not self.step_in_backward:
                raise ValueError(f"{self._label(param)}: {use[0]} needs each step's full gradient, which "
                                 f"backward_projection=True frees in the backward pass; {use[1]} (or "
                                 "step_in_backward=True, where the last hook of a window has it)")
            if use is not None:
                self._full_gradient.add(param)
            if plan.sharding is not None:
                self._check_sharded(param)
            if any(isinstance(getattr(hook, "__self__", None), InBackward)
                   for hook in (getattr(param, "_post_accumulate_grad_hooks", None) or {}).values()):
                raise ValueError(f"{self._label(param)}: its gradient is already projected in the backward pass by "
                                 "another optimizer; call that optimizer's stop_backward_projection() first")

    def _check_sharded(self, param: torch.Tensor) -> None:
        """What an FSDP2-sharded parameter allows (module doc, *FSDP2*): ``step_in_backward`` with
        ``accumulation_steps=1`` and no ``process_group``."""
        label = self._label(param)
        if not self.step_in_backward:
            raise ValueError(f"{label}: backward_projection=True without step_in_backward is not supported with "
                             "FSDP2-sharded parameters: FSDP2 reduce-scatters the full unsharded gradient before any "
                             "hook sees it (projecting the shard afterwards saves no communication) and adds each "
                             "later micro-batch into .grad's local tensor itself, bypassing a projected accumulator; "
                             "use step_in_backward=True, or the standard loop")
        if self.accumulation_steps != 1:
            raise InvalidHyperparameter("accumulation_steps", self.accumulation_steps, (
                f"Invalid accumulation_steps: {self.accumulation_steps!r} with FSDP2-sharded parameters ({label}): "
                "FSDP2 adds each micro-batch's reduce-scattered gradient into .grad's local tensor itself, so the "
                "hooks cannot keep a projected accumulator; use accumulation_steps=1 and "
                "model.set_requires_gradient_sync(False) on the non-final micro-batches (FSDP2 then accumulates "
                "unsharded and the hooks run once per window, on the summed gradient)"))
        if self.process_group is not None:
            raise InvalidHyperparameter("process_group", self.process_group, (
                f"Invalid process_group: {self.process_group!r} with FSDP2-sharded parameters ({label}): FSDP2 "
                "already reduces their gradients; leave process_group=None"))

    def copied_settings(self) -> dict:
        """The keywords a copy of the optimizer rebuilds the mode with (a copy does not share the process group)."""
        return dict(step_in_backward=self.step_in_backward, accumulation_steps=self.accumulation_steps)

    def detach(self) -> None:
        """Remove the hooks (the optimizer's ``stop_backward_projection``)."""
        if self._window.started:
            raise RuntimeError("stop_backward_projection() inside an accumulation window; call step() first")
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def check_new_group(self) -> None:
        """Refuse a param group added after construction under ``step_in_backward``."""
        if self.step_in_backward:
            raise ValueError("add_param_group after construction with step_in_backward=True: the new parameters "
                             "would have no hook and never step; build the optimizer with every param group")

    # ------------------------------------------------------------------------------- the hooks
    @torch.no_grad()
    def _hook(self, param: torch.Tensor) -> None:
        self._synchronized = False           # a backward pass: the next step averages again
        if self.step_in_backward:
            self._step_in_backward(param)
        else:
            self._project(param)

    def _project(self, param: torch.Tensor) -> None:
        """Replace ``G`` by a :class:`ProjectedGradient` holding ``A = proj(G)``, unless the
        parameter refreshes at the coming step (then its full gradient accumulates as usual).
        Later micro-batches accumulate into it (``A ← A + proj(G)``) in the autograd engine's
        ``grad += G``, before this hook runs again."""
        if isinstance(param.grad, ProjectedGradient):
            return
        project = self.optimizer.gradient_projection(param)
        if project is not None:
            param.grad = ProjectedGradient(param, self._label(param), project(param.grad), project,
                                           averaged_in_step=self.process_group is not None)

    def _step_in_backward(self, param: torch.Tensor) -> None:
        """Accumulate this micro-batch (projected weights as :meth:`_project` does, the others in
        ``.grad``) and, at the window's last backward pass, take the parameter's whole step and
        free everything it used."""
        window = self._window
        count = window.backward_passes.get(param, 0) + 1
        if count == 1 and param in window.stepped:
            raise RuntimeError(f"{self._label(param)}: a backward pass after this parameter took its step "
                               f"(accumulation_steps={self.accumulation_steps}) and before optimizer.step(); "
                               f"call step() after every {self.accumulation_steps} backward pass(es)")
        if not window.started:
            self.optimizer.refresh_stats = {}
        last = count == self.accumulation_steps
        projected_here = self.optimizer.plan_of(param).projected and param not in self._full_gradient
        if projected_here and (not last or isinstance(param.grad, ProjectedGradient)):
            self._project(param)     # at a window's only backward pass the step projects G itself
        window.backward_passes[param] = count
        if last:
            self._step_one(param)

    def _step_one(self, param: torch.Tensor) -> None:
        """One parameter's whole step from what its window accumulated (averaged over the process
        group first); its gradient and accumulator are then freed, and ``.grad`` holds a
        :class:`SteppedGradient` with their norm until the optimizer's ``step()``."""
        window = self._window
        if param.grad is None:              # zeroed outside the optimizer since its last backward pass
            window.backward_passes.pop(param, None)
            return
        used = gradient_in_use(param)
        if self.process_group is not None:
            window.communicated_bytes += synchronize([used], self.process_group)
        norm = torch.linalg.vector_norm(used)
        window.backward_passes.pop(param, None)
        window.stepped.add(param)
        self.optimizer.step_parameter(param)
        stepped = SteppedGradient(local(param), self._label(param), norm, self.accumulation_steps)
        param.grad = stepped if self.optimizer.plan_of(param).sharding is None else placed_like(stepped, param.grad)

    # -------------------------------------------------------------------- what the optimizer calls
    def before_step(self) -> None:
        """At the optimizer's ``step()``: close the window (``step_in_backward``), else average the
        step's gradients over the process group, once."""
        if self.step_in_backward:
            self._finish_window()
        else:
            self.synchronize()

    def synchronize(self) -> None:
        """Average the step's gradients over the process group, once per step."""
        if self.process_group is None or self._synchronized:
            return
        params = [p for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
        self.communicated_bytes = synchronize([gradient_in_use(p) for p in params], self.process_group)
        self._synchronized = True

    def gradients_zeroed(self) -> None:
        """``zero_grad``: a partial window is dropped with its gradients."""
        self._synchronized = False
        self._window.backward_passes.clear()

    def _finish_window(self) -> None:
        """The hooks took the steps; parameters that saw fewer backward passes than the others
        (unused in some micro-batches) step now on what they accumulated, and the window closes. A
        window no parameter completed is an error. Gradients set without a backward pass
        (torchtitan's zero-gradient step that creates the state) are stepped here, as the standard
        loop would."""
        window = self._window
        pending = list(window.backward_passes)        # stepped parameters leave it
        set_outside = [param for param in self._params if param.grad is not None
                       and param not in window.backward_passes and param not in window.stepped]
        if pending and not window.stepped:
            param = pending[0]
            raise RuntimeError(f"optimizer.step() after {window.backward_passes[param]} of accumulation_steps="
                               f"{self.accumulation_steps} backward passes (e.g. {self._label(param)}); nothing was "
                               "stepped. Call backward() accumulation_steps times per step")
        for param in pending + set_outside:
            self._step_one(param)
        for param in window.stepped:
            param.grad = None
        self.communicated_bytes = window.communicated_bytes
        self._window = Window()


def gradient_in_use(param: torch.Tensor) -> torch.Tensor:
    """The tensor a step reads for ``param``: the accumulator of its :class:`ProjectedGradient`,
    or its gradient (this rank's shard under FSDP2)."""
    grad = param.grad
    return grad.low_rank if isinstance(grad, ProjectedGradient) else local(grad)
