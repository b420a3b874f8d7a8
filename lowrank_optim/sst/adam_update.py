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

from ..moments import Moments
from ..quantization import stochastic_round_bf16


def adamw_with_step_counts_(
    param: torch.Tensor,
    grad: torch.Tensor,
    moments: Moments,
    steps: torch.Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    rewarmup_steps: int,
    optimizer_step: int,
    generator: torch.Generator | None = None,
) -> None:
    """One AdamW step in place; ``steps`` (int, already incremented, ≥ 1) broadcasts against ``param``;
    ``optimizer_step`` (the optimizer's count, ≥ 1) seeds the moments' stochastic rounding.

    ``steps`` has shape (r,) for an (m, r) matrix of columns, or () for a tensor with one count.
    ``moments`` are float or quantized (:class:`~lowrank_optim.moments.Moments`); ``generator``
    rounds a bf16 ``param`` stochastically.
    """
    t = steps.to(torch.float64)
    lr_t = lr * (torch.clamp(t / rewarmup_steps, max=1.0) if rewarmup_steps else torch.ones_like(t))
    update = moments.step("torch", grad, beta1=beta1, beta2=beta2, eps=eps,
                          bias_correction1=(1.0 - beta1**t).float(), bias_correction2=(1.0 - beta2**t).float(),
                          step=optimizer_step)
    dtype = update.dtype
    decay = (1.0 - lr_t * weight_decay).to(dtype)
    if generator is not None:
        exact = param.float().mul_(decay.float()).sub_(update.float() * lr_t.float())
        param.copy_(stochastic_round_bf16(exact, generator=generator))
        return
    if weight_decay:
        param.mul_(decay)
    param.sub_((update * lr_t.to(dtype)).to(param.dtype))
