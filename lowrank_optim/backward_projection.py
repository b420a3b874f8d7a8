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

**Clipping.** :func:`lowrank_optim.clip_grad_norm_` clips by the global norm of what the
optimizer uses: the accumulators of projected weights (``‖R‖ ≤ ‖G‖``, so it clips less than the
full-gradient norm would), full gradients of refreshing weights and the plain gradients, with no
second backward. ``torch.nn.utils.clip_grad_norm_`` would see no projected gradient and clip
silently too little: once the mode is on it raises an error for parameters under the mode, and
warns when it is only asked for a norm (``max_norm=inf``, as Hugging Face Trainer does to log
``grad_norm``) (:func:`guard_torch_clipping`).

**Data parallel.** With ``process_group=...`` the optimizer all-reduces (averages) the
accumulators, the refreshing full gradients and the plain gradients itself, once per step
(``torch.distributed.all_reduce``): ``r/n`` of DDP's traffic for projected weights. Every rank holds
the same subspace, so the averaged accumulators are exactly the projection of the averaged
gradient. The parameters are broadcast from the group's first rank at construction, as DDP does;
do not wrap the model in ``DistributedDataParallel`` (its buckets would keep full gradients).
"""
from __future__ import annotations

import functools
import math
import warnings
import weakref

import torch
import torch.distributed as dist

# Parameters whose gradients are projected (or stepped) in the backward pass, for the guard on
# torch's clipping: id -> (weak reference, stepped in the hook) (a WeakSet would compare tensors with ==).
_PROJECTED_IN_BACKWARD: dict[int, tuple[weakref.ref, bool]] = {}


def _is_projected_in_backward(param: torch.Tensor) -> bool:
    entry = _PROJECTED_IN_BACKWARD.get(id(param))
    return entry is not None and entry[0]() is param


def _is_stepped_in_backward(param: torch.Tensor) -> bool:
    return _is_projected_in_backward(param) and _PROJECTED_IN_BACKWARD[id(param)][1]


def stagger_offset(position: int, count: int, gap: int) -> int:
    """``o_j = ⌊j·T/W⌋``: the refresh phase of the ``position``-th of ``count`` projected weights."""
    return position * gap // max(count, 1)


def register(params: list[torch.Tensor], hook, labels: list[str], steps: bool = False) -> list:
    """Register ``hook(param)`` after each parameter's gradient accumulation; the handles. A
    parameter already projected by another optimizer is refused (both would free its gradient).
    ``steps``: the hook takes the parameter's optimizer step (``step_in_backward``)."""
    for param, label in zip(params, labels):
        if _is_projected_in_backward(param):
            raise ValueError(f"{label}: its gradient is already projected in the backward pass by another optimizer; "
                             "call that optimizer's stop_backward_projection() first")
    guard_torch_clipping()
    handles = []
    for param in params:
        _PROJECTED_IN_BACKWARD[id(param)] = (weakref.ref(param), steps)
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


def guard_torch_clipping() -> None:
    """Make ``torch.nn.utils.clip_grad_norm_`` refuse parameters whose gradients are projected in
    the backward pass (it would see none of them and return a norm that leaves them out).
    Installed once, the first time the mode is switched on."""
    clip_module = torch.nn.utils.clip_grad
    if getattr(clip_module.clip_grad_norm_, "_lowrank_optim_guard", False):
        return
    original = clip_module.clip_grad_norm_

    @functools.wraps(original)
    def guarded(parameters, max_norm, *args, **kwargs):
        parameters = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
        if not any(_is_projected_in_backward(p) and p.grad is None for p in parameters):
            return original(parameters, max_norm, *args, **kwargs)
        stepped = any(_is_stepped_in_backward(p) and p.grad is None for p in parameters)
        if stepped and not math.isinf(max_norm):
            raise RuntimeError(
                "torch.nn.utils.clip_grad_norm_ after a backward pass that already stepped the parameters "
                "(step_in_backward=True): every update was taken before a global norm existed, so nothing "
                "can be clipped. Use backward_projection=True without step_in_backward to clip "
                "(lowrank_optim.clip_grad_norm_), or train without clipping")
        if math.isinf(max_norm) and stepped:
            warnings.warn("torch.nn.utils.clip_grad_norm_ measures a norm without the parameters stepped in the "
                          "backward pass (step_in_backward=True), whose gradients are gone: the logged gradient "
                          "norm leaves them out", RuntimeWarning, stacklevel=2)
        elif math.isinf(max_norm):        # a norm for the logs only (Hugging Face Trainer's grad_norm)
            warnings.warn("torch.nn.utils.clip_grad_norm_ measures a norm without the gradients projected in the "
                          "backward pass (backward_projection=True): the logged gradient norm leaves them out; "
                          "lowrank_optim.clip_grad_norm_(optimizer, max_norm) returns the norm the step uses",
                          RuntimeWarning, stacklevel=2)
        else:
            raise RuntimeError(
                "torch.nn.utils.clip_grad_norm_ sees no gradient for parameters whose gradients are projected "
                "in the backward pass (backward_projection=True): it would clip by a norm that leaves them out. "
                "Call lowrank_optim.clip_grad_norm_(optimizer, max_norm) instead (with Hugging Face Trainer: "
                "max_grad_norm=0 and lowrank_optim.integrations.transformers.ClipInOptimizerCallback)")
        return original(parameters, max_norm, *args, **kwargs)

    guarded._lowrank_optim_guard = True
    clip_module.clip_grad_norm_ = guarded
    torch.nn.utils.clip_grad_norm_ = guarded
