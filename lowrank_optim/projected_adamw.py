r"""One projected-AdamW step on one weight: the math of ``GaLoreAdamW`` and ``DCTProjAdam``.

For a weight ``W`` (``m×n``), its gradient ``G``, the projected gradient ``R`` (``G·P`` on the right
side, ``Pᵀ·G`` on the left; :mod:`lowrank_optim.geometry`) and ``P = basis[:, idx]`` (or the dense
``basis``):

.. math::
    m &\leftarrow \beta_1 m + (1-\beta_1) R, \qquad v \leftarrow \beta_2 v + (1-\beta_2) R^2 \\
    N &= \frac{m / (1-\beta_1^t)}{\sqrt{v / (1-\beta_2^t)} + \epsilon_{\text{eff}}} \\
    \Delta W &= N P^\top \text{ (right) or } P N \text{ (left)}, \quad\text{plus, with the scaled residual,}\quad
      c\,\varphi \circ (G - R P^\top) \\
    W &\leftarrow a\,W - b\,\Delta W

where ``a, b`` fold learning rate ``η``, ``scale`` ``α`` and decoupled weight decay ``λ`` in either
AdamW form (:func:`lowrank_optim.kernels.weight_update.update_coefficients`; ``ε_eff`` per
:class:`~lowrank_optim.adam_form.AdamForm`), ``t`` is the step count (a per-slot tensor for slot
bias correction) and ``c·φ`` the residual's Adam scaling (:mod:`lowrank_optim.residual`). The
moments are float or 8/4-bit (:class:`~lowrank_optim.moments.Moments`).

Each operation runs on the backend the caller resolved (:mod:`lowrank_optim.kernels.dispatch`):
the PyTorch reference or the fused Triton kernels (one pass for the moments and ``N``, one
back-projection GEMM with the weight update, residual included, in its epilogue). With
``stochastic_round`` (bf16 weights) ``ΔW`` is formed in fp32 and added with unbiased stochastic
rounding (:func:`lowrank_optim.quantization.add_stochastic_round_`), on the PyTorch path.
"""
from __future__ import annotations

import torch

from .adam_form import AdamForm, bias_corrections
from .kernels.dispatch import projected_weight_update_
from .kernels.weight_update import back_project, update_coefficients
from .moments import Moments
from .quantization import add_stochastic_round_
from .residual import residual_coefficients
from .sharding import Sharding


def projected_adamw_(
    weight: torch.Tensor,
    grad: torch.Tensor,
    low_rank_grad: torch.Tensor,
    moments: Moments,
    basis: torch.Tensor,
    indices: torch.Tensor | None,
    *,
    side: str,
    step: int | torch.Tensor,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    scale: float,
    form: AdamForm,
    correct_bias: bool = True,
    source_slots: torch.Tensor | None = None,
    residual: bool = False,
    residual_norm: torch.Tensor | None = None,
    sharding: Sharding | None = None,
    backend: str = "torch",
    stochastic_round: torch.Generator | None = None,
) -> torch.Tensor | None:
    """Update ``weight`` and ``moments`` in place by one step (module doc); returns the residual
    limiter's new norm (None without the residual).

    ``step`` is the already-incremented count, or per-slot counts shaped to broadcast against the
    moments. ``source_slots`` remaps the moments' slots first (a transporting refresh of a column
    subspace). ``residual_norm`` is the limiter's norm of the last step; ``sharding`` makes it
    global over FSDP2 shards. ``stochastic_round``: the generator of the rounding noise for a bf16
    ``weight`` (None: round to nearest).
    """
    bc1, bc2 = bias_corrections(step, beta1, beta2) if correct_bias else (1.0, 1.0)
    normalized = moments.step(backend, low_rank_grad, beta1=beta1, beta2=beta2, eps=form.effective_eps(eps, bc2),
                              bias_correction1=bc1, bias_correction2=bc2, source_slots=source_slots)
    if normalized.dtype != basis.dtype:          # quantized moments give an fp32 N
        normalized = normalized.to(basis.dtype)
    coefficients = dict(lr=lr, scale=scale, weight_decay=weight_decay, decay_before_update=form.decay_before_update)
    phi = None
    if residual:
        phi, residual_norm = residual_coefficients(grad, low_rank_grad, normalized, side, residual_norm, sharding)
    if stochastic_round is not None:
        _stochastic_weight_update_(weight, grad, low_rank_grad, normalized, basis, indices, side, phi,
                                   update_coefficients(**coefficients), stochastic_round)
    elif phi is None:
        projected_weight_update_(backend, weight, normalized, basis, indices, side, **coefficients)
    else:
        projected_weight_update_(backend, weight, normalized, basis, indices, side, **coefficients,
                                 residual_grad=grad, residual_low_rank_grad=low_rank_grad, residual_coefficients=phi)
    return residual_norm


def _stochastic_weight_update_(weight, grad, low_rank_grad, normalized, basis, indices, side, phi, ab,
                               generator) -> None:
    """``W ← SR(a·W − b·ΔW)`` with ``ΔW`` (residual included when ``phi``) formed in fp32."""
    a, b = ab
    core = normalized.float() if phi is None else normalized.float() - phi.float() * low_rank_grad.float()
    delta = back_project(core, basis.float(), indices, side)
    if phi is not None:
        delta.addcmul_(phi.float(), grad.float())
    update = delta.mul_(-b)
    if a != 1.0:
        update.add_(weight.float(), alpha=a - 1.0)
    add_stochastic_round_(weight, update, generator=generator)
