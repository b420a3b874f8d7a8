"""Multi-tensor (``torch._foreach_*``) AdamW for the parameters an optimizer does not project.

Same math as :func:`lowrank_optim.kernels.moment_update.adam_moment_update_` applied per tensor, in
either :class:`~lowrank_optim.adam_form.AdamForm`. Moments may be stored in a wider dtype than the
parameter (fp32 moments for bf16 weights): the update is computed in the moments' dtype and rounded
once when added to the weight.
"""
from __future__ import annotations

import math
from collections import defaultdict

import torch

from .adam_form import AdamForm, bias_corrections


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
) -> None:
    """One AdamW step on every tensor of the lists; ``steps`` are the already-incremented counts.
    ``correct_bias=False`` drops the bias corrections (``galore_torch``'s ``correct_bias``)."""
    buckets: dict[tuple, list[int]] = defaultdict(list)
    for i, (p, m) in enumerate(zip(params, exp_avgs)):
        buckets[(p.device, p.dtype, m.dtype)].append(i)
    for indices in buckets.values():
        _foreach_bucket(
            [params[i] for i in indices],
            [grads[i] for i in indices],
            [exp_avgs[i] for i in indices],
            [exp_avg_sqs[i] for i in indices],
            [steps[i] for i in indices],
            lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, form=form,
            correct_bias=correct_bias,
        )


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
