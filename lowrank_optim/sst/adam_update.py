r"""AdamW for SST tensors, whose entries restart their moments at different times.

When a singular-vector pair is swapped in, its moments restart from zero while the pairs that stay
active keep theirs; after a re-SVD the singular values restart too. So each column of ``U_active`` /
``V_active`` (and ``s`` as a whole) carries its own step count ``t``, and the bias corrections are
per column. Same arithmetic as ``torch.optim.AdamW`` (:attr:`~lowrank_optim.adam_form.AdamForm.TORCH`):

.. math::
    \eta_t = \eta \cdot \min(1,\; t / t_{\mathrm{warm}})
    \quad (\eta_t = \eta \text{ when } t_{\mathrm{warm}} = 0)

    W \leftarrow W\,(1 - \eta_t \lambda), \quad
    m \leftarrow \beta_1 m + (1-\beta_1)\, g, \quad
    v \leftarrow \beta_2 v + (1-\beta_2)\, g^2

    W \leftarrow W - \frac{\eta_t}{1-\beta_1^t}\cdot\frac{m}{\sqrt{v}/\sqrt{1-\beta_2^t} + \epsilon}

The short linear re-warmup ``t_warm`` of a restarted column is SST's remedy for the full-size first
steps Adam takes from zero moments (the paper re-warms the learning rate for 20 steps).
"""

from __future__ import annotations

import torch


def adamw_with_step_counts_(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    steps: torch.Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    rewarmup_steps: int,
) -> None:
    """One AdamW step in place; ``steps`` (int, already incremented, ≥ 1) broadcasts against ``param``.

    ``steps`` has shape (r,) for an (m, r) matrix of columns, or () for a tensor with one count.
    """
    t = steps.to(torch.float64)
    lr_t = lr * (torch.clamp(t / rewarmup_steps, max=1.0) if rewarmup_steps else torch.ones_like(t))
    bias_correction1 = 1.0 - beta1**t
    bias_correction2 = 1.0 - beta2**t
    dtype = exp_avg.dtype
    if weight_decay:
        param.mul_((1.0 - lr_t * weight_decay).to(dtype))
    exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    denom = (exp_avg_sq.sqrt() / bias_correction2.sqrt().to(dtype)).add_(eps)
    param.sub_(exp_avg / denom * (lr_t / bias_correction1).to(dtype))
