"""AdamW for the parameters an optimizer does not project, and the state bookkeeping around it.

:func:`plain_adamw_step_` is what every optimizer of the library runs on its plain parameters
(embeddings, norms, biases, the head; everything of a model for ``SSTAdamW`` but the SST
factors): lazy zero moments, one step count per parameter, then one AdamW step in either
:class:`~lowrank_optim.adam_form.AdamForm`, through the multi-tensor path (``torch._foreach_*``,
:func:`foreach_adamw_`) or the single-tensor one (:func:`single_tensor_adamw_`), which also serves
8/4-bit moments (:mod:`lowrank_optim.moments`) and every weight rounded stochastically (int8
weights, and bf16 weights with ``bf16_stochastic_round``:
:func:`lowrank_optim.weight_store.stochastic_weight_update_`). Float
moments may be stored in a wider dtype than the parameter (fp32 moments for bf16 weights): the
update is computed in the moments' dtype and rounded once when added to the weight.
"""
from __future__ import annotations

import math
from collections import defaultdict

import torch

from .adam_form import AdamForm, bias_corrections
from .moments import Moments
from .sharding import Sharding, local, moment_storage
from .weight_store import stochastic_weight_update_
from .weights import is_int8_weight


def plain_adamw_step_(state: dict, group: dict, params: list[torch.Tensor], grads: list[torch.Tensor], *,
                      form: AdamForm, moments_dtype: torch.dtype | None = None, foreach: bool = True,
                      moment_bits: int | None = None, moment_block_size: int | None = None,
                      generators: list | None = None, backends: list[str] | None = None,
                      shardings: list[Sharding | None] | None = None) -> None:
    """One AdamW step with ``group``'s hyperparameters on ``params`` (their gradients ``grads``;
    local shards of FSDP2 parameters, whose float moments are then DTensors), creating each
    parameter's state ``{step, moments}`` in ``state`` (the optimizer's) on its first step.

    ``moment_bits`` (8 or 4) stores the moments quantized, ``moment_block_size`` values per scale
    (:mod:`lowrank_optim.moments`; tensors under 4096 values stay float) and ``generators`` (one
    per parameter, or None each) rounds the update of each parameter that has one stochastically
    (int8 weights, bf16 weights with ``bf16_stochastic_round``). Those take the single-tensor path,
    whose moment update runs on each parameter's resolved backend (``backends``; default
    ``"torch"``); the others of a call with float moments and ``foreach`` take the multi-tensor one.
    ``shardings`` (one per parameter, or None each) are the FSDP2 shardings: 8/4-bit moments of a
    sharded parameter are DTensors of codes and scales sharded like it."""
    if not params:
        return
    views, steps = [], []
    for index, param in enumerate(params):
        entry = state[param]
        sharding = None if shardings is None else shardings[index]
        moments = Moments.of(entry, param.shape, None, moment_bits, moment_block_size,
                             **moment_storage(sharding, local(param).shape))
        if not moments.exists:
            entry["step"] = 0
            moments.create(moments_dtype or param.dtype, param.device, like=param)
        entry["step"] += 1
        views.append(moments)
        steps.append(entry["step"])
    beta1, beta2 = group["betas"]
    hyper = dict(lr=as_float(group["lr"]), beta1=beta1, beta2=beta2, eps=group["eps"],
                 weight_decay=group["weight_decay"], form=form, correct_bias=group.get("correct_bias", True))
    generators = [None] * len(params) if generators is None else generators
    single = [i for i in range(len(params)) if not foreach or moment_bits is not None or generators[i] is not None]
    multi = sorted(set(range(len(params))) - set(single))
    if multi:
        foreach_adamw_([local(params[i]) for i in multi], [grads[i] for i in multi],
                       [views[i].unwrap(views[i].state["exp_avg"]) for i in multi],
                       [views[i].unwrap(views[i].state["exp_avg_sq"]) for i in multi], [steps[i] for i in multi],
                       **hyper)
    for i in single:
        backend = "torch" if backends is None else backends[i]
        single_tensor_adamw_(local(params[i]), grads[i], views[i], steps[i], backend=backend,
                             generator=generators[i], **hyper)


def as_float(value) -> float:
    """A hyperparameter that may be a 0-d tensor (a tensor ``lr``) as a Python float."""
    return value.item() if isinstance(value, torch.Tensor) else float(value)


def single_tensor_adamw_(param: torch.Tensor, grad: torch.Tensor, moments: Moments, step: int, *,
                         chunk_values: int | None = None, **hyper) -> None:
    """The step of :func:`foreach_adamw_` on one tensor (``foreach=False``), with float or quantized
    moments; ``generator``: stochastic rounding of ``param`` (an int8 weight, or a bf16 one: the
    new value in fp32, rounded once, unbiased).

    The update is element-wise, so a large tensor is stepped in consecutive chunks of
    ``chunk_values`` (default :data:`CHUNK_VALUES`) values, views of the parameter, gradient and
    state: the fp32 temporaries (dequantized moments, ``N``, codes being searched) then take a
    chunk's size instead of the tensor's, and every value is computed exactly as in one piece
    (stochastic rounding draws its noise chunk by chunk from the same generator). An int8 weight is
    stepped whole: its rows share scales that one update rewrites (the temporaries are one
    tensor's, as for a projected weight's ``ΔW``)."""
    chunk = CHUNK_VALUES if chunk_values is None else chunk_values
    whole = is_int8_weight(param) or not (param.is_contiguous() and grad.is_contiguous())
    if param.numel() <= chunk or whole:
        _single_tensor_adamw_(param, grad, moments, step, **hyper)
        return
    flat_param, flat_grad = param.view(-1), grad.view(-1)
    for start in range(0, param.numel(), chunk):
        stop = min(start + chunk, param.numel())
        _single_tensor_adamw_(flat_param[start:stop], flat_grad[start:stop], moments.flat_chunk(start, stop), step,
                              **hyper)


# 2**20 values: a multiple of every quantization block (chunks start on block boundaries); its
# temporaries stay in the tens of MiB while each chunk is large enough to run at full speed.
CHUNK_VALUES = 1 << 20


def _single_tensor_adamw_(param: torch.Tensor, grad: torch.Tensor, moments: Moments, step: int, *, lr: float,
                          beta1: float, beta2: float, eps: float, weight_decay: float, form: AdamForm,
                          correct_bias: bool = True, backend: str = "torch",
                          generator: torch.Generator | None = None) -> None:
    bc1, bc2 = bias_corrections(step, beta1, beta2) if correct_bias else (1.0, 1.0)
    update = moments.step(backend, grad, beta1=beta1, beta2=beta2, eps=form.effective_eps(eps, bc2),
                          bias_correction1=bc1, bias_correction2=bc2, step=step)
    decay = 1.0 - lr * weight_decay
    if generator is not None:       # (W − ηu)(1 − ηλ) after the update: a = 1 − ηλ, b = η(1 − ηλ)
        b = lr if form.decay_before_update else lr * decay
        stochastic_weight_update_(param, update, a=decay, b=b, generator=generator, backend=backend)
        return
    if weight_decay and form.decay_before_update:
        param.mul_(decay)
    param.add_(update.to(param.dtype), alpha=-lr)
    if weight_decay and not form.decay_before_update:
        param.add_(param, alpha=-lr * weight_decay)


def foreach_adamw_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    steps: list[int],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    form: AdamForm,
    correct_bias: bool = True,
    batch_values: int | None = None,
) -> None:
    """One AdamW step on every tensor of the lists; ``steps`` are the already-incremented counts.
    ``correct_bias=False`` drops the bias corrections (``galore_torch``'s ``correct_bias``).

    The update is element-wise, so the tensors are stepped in batches of at most ``batch_values``
    (default :data:`FOREACH_BATCH_VALUES`) values, a contiguous tensor larger than that in
    consecutive flat chunks: the temporaries (denominators, updates, gradients cast to the moments'
    dtype) take a batch's size instead of every plain parameter's, and each value goes through the
    same operations as in one call over all of them (tested bit for bit at one thread; bf16 CPU
    kernels round the tail of a vectorised loop differently, so chunks are a multiple of every
    vector width)."""
    batch = FOREACH_BATCH_VALUES if batch_values is None else batch_values
    buckets: dict[tuple, list[int]] = defaultdict(list)
    for i, (p, m) in enumerate(zip(params, exp_avgs)):
        buckets[(p.device, p.dtype, m.dtype)].append(i)
    for indices in buckets.values():
        pieces = [(piece, steps[i]) for i in indices
                  for piece in _flat_pieces((params[i], grads[i], exp_avgs[i], exp_avg_sqs[i]), batch)]
        for part in _batches(pieces, batch):
            _foreach_bucket(*(list(tensors) for tensors in zip(*(piece for piece, _ in part))),
                            [step for _, step in part], lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                            weight_decay=weight_decay, form=form, correct_bias=correct_bias)


# 2**22 values per multi-tensor batch: its temporaries stay in the tens of MiB.
FOREACH_BATCH_VALUES = 1 << 22


def _flat_pieces(tensors: tuple[torch.Tensor, ...], size: int) -> list[tuple[torch.Tensor, ...]]:
    """Same-shape ``tensors`` as consecutive flat chunks of ``size`` values (whole when smaller or
    not all contiguous)."""
    numel = tensors[0].numel()
    if numel <= size or not all(t.is_contiguous() for t in tensors):
        return [tensors]
    flat = [t.view(-1) for t in tensors]
    return [tuple(t[start:start + size] for t in flat) for start in range(0, numel, size)]


def _batches(pieces: list, size: int) -> list[list]:
    """Consecutive runs of ``(tensors, step)`` pieces of at most ``size`` values each (a larger piece alone)."""
    batches, current, values = [], [], 0
    for piece in pieces:
        numel = piece[0][0].numel()
        if current and values + numel > size:
            batches.append(current)
            current, values = [], 0
        current.append(piece)
        values += numel
    return batches + [current] if current else batches


def _foreach_bucket(params, grads, exp_avgs, exp_avg_sqs, steps, *, lr, beta1, beta2, eps,
                    weight_decay, form: AdamForm, correct_bias: bool) -> None:
    moment_dtype = exp_avgs[0].dtype
    if grads[0].dtype != moment_dtype:
        grads = [g.to(moment_dtype) for g in grads]
    if correct_bias:
        corrections = [bias_corrections(s, beta1, beta2) for s in steps]
    else:
        corrections = [(1.0, 1.0)] * len(steps)

    if weight_decay and form.decay_before_update:
        torch._foreach_mul_(params, 1.0 - lr * weight_decay)

    torch._foreach_mul_(exp_avgs, beta1)
    torch._foreach_add_(exp_avgs, grads, alpha=1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)

    denoms = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denoms, [math.sqrt(bc2) for _, bc2 in corrections])
    torch._foreach_add_(denoms, [form.effective_eps(eps, bc2) for _, bc2 in corrections])
    updates = torch._foreach_div(exp_avgs, denoms)
    torch._foreach_mul_(updates, [-lr / bc1 for bc1, _ in corrections])
    if params[0].dtype != moment_dtype:
        updates = [u.to(params[0].dtype) for u in updates]
    torch._foreach_add_(params, updates)

    if weight_decay and not form.decay_before_update:
        torch._foreach_add_(params, params, alpha=-lr * weight_decay)
