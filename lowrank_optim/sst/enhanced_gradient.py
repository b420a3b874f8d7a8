r"""The SST linear map ``y = x·Wᵀ`` with ``W = U·diag(s)·Vᵀ``, and its enhanced-gradient backward.

Shapes: ``x`` (..., n), ``U`` (m, k), ``V`` (n, k), ``s`` (k,), with ``k = min(m, n)``. ``r`` of the k
singular-vector pairs are *active*: their current values live in the trainable ``U_active`` (m, r)
and ``V_active`` (n, r); column ``j`` of those stands for column ``active_indices[j]`` of ``U``/``V``,
whose own entries there are stale and contribute nothing (their products are overwritten or multiplied
by zero). Nothing of size m×n is ever formed:

.. math::
    z = x V \;(\text{active columns: } x V_a), \qquad
    y = (z \odot s)_{\text{frozen}}\, U_{\text{frozen}}^\top + (z \odot s)_a\, U_a^\top .

Backward, with ``gy = ∂L/∂y`` flattened to (b, m) and ``G = ∂L/∂W = gyᵀ·x``:

.. math::
    \frac{\partial L}{\partial s_i} = u_i^\top G v_i = \sum_b (g_y U)_{bi}\, z_{bi}, \qquad
    \nabla U_a = G V_a = g_y^\top z_a, \qquad
    \nabla V_a = G^\top U_a = x^\top (g_y U_a),

    \frac{\partial L}{\partial x} = \big((g_y U) \odot s\big) V^\top \;\text{(active columns from } U_a, V_a).

``∇U_a`` and ``∇V_a`` are SST's *enhanced gradients*: the true gradients are ``G·V_a·diag(s_a)`` and
``Gᵀ·U_a·diag(s_a)``; dropping the ``diag(s_a)`` factor lets vectors paired with a small singular value
learn as fast as the others. Computing them directly (instead of dividing the true gradient by ``s``)
is exact and has no trouble with ``s_i = 0``. ``U_active.grad`` and ``V_active.grad`` therefore hold
the enhanced gradients.
"""

from __future__ import annotations

import torch


class _SpectralLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, U, V, s, active_indices, U_active, V_active):
        flat_x = x.reshape(-1, x.shape[-1])
        z = flat_x @ V
        z.index_copy_(1, active_indices, flat_x @ V_active)
        y = _frozen_plus_active(z * s, active_indices, U, U_active)
        ctx.save_for_backward(flat_x, z, U, V, s, active_indices, U_active, V_active)
        ctx.input_shape = x.shape
        return y.reshape(*x.shape[:-1], U.shape[0])

    @staticmethod
    def backward(ctx, grad_y):
        flat_x, z, U, V, s, active_indices, U_active, V_active = ctx.saved_tensors
        flat_grad_y = grad_y.reshape(-1, U.shape[0])
        grad_u_active = flat_grad_y @ U_active  # (b, r)
        grad_u = flat_grad_y @ U
        grad_u.index_copy_(1, active_indices, grad_u_active)

        grad_x = grad_s = grad_U_active = grad_V_active = None
        if ctx.needs_input_grad[0]:
            grad_x = _frozen_plus_active(grad_u * s, active_indices, V, V_active).reshape(ctx.input_shape)
        if ctx.needs_input_grad[3]:
            grad_s = (grad_u * z).sum(0)
        if ctx.needs_input_grad[5]:
            grad_U_active = flat_grad_y.mT @ z.index_select(1, active_indices)
        if ctx.needs_input_grad[6]:
            grad_V_active = flat_x.mT @ grad_u_active
        return grad_x, None, None, grad_s, None, grad_U_active, grad_V_active


def _frozen_plus_active(h, active_indices, full, active):
    """``h·fullᵀ`` with the active columns of ``full`` replaced by ``active`` (h is consumed)."""
    h_active = h.index_select(1, active_indices)
    h.index_fill_(1, active_indices, 0.0)  # the stale columns of `full` then contribute exactly 0
    return (h @ full.mT).addmm_(h_active, active.mT)


def spectral_linear(
    x: torch.Tensor,
    U: torch.Tensor,
    V: torch.Tensor,
    s: torch.Tensor,
    active_indices: torch.Tensor,
    U_active: torch.Tensor,
    V_active: torch.Tensor,
) -> torch.Tensor:
    """``x·(U·diag(s)·Vᵀ)ᵀ`` with active columns from ``U_active``/``V_active``; enhanced gradients.

    Gradients flow to ``x``, ``s``, ``U_active`` and ``V_active`` (not to the frozen ``U``, ``V``).
    All floating tensors must share one dtype; ``active_indices`` is int64 (r,).
    """
    return _SpectralLinear.apply(x, U, V, s, active_indices, U_active, V_active)
