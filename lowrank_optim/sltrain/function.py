"""The SLTrain linear map and its memory-lean autograd Function.

Shapes: input ``X`` (…, n), ``B`` (m, r), ``A`` (r, n), ``values`` (nnz,), ``support`` (nnz,) flat
row-major indices into an (m, n) matrix, ``bias`` (m,) or None, ``scale = α/r``.

Forward:   W = scale·B·A + S,   S.flat[support] = values,   Y = X·Wᵀ + b
Backward, with X and dY flattened to (T, n) and (T, m):

    dW       = dYᵀ·X                     (m, n), dense, transient
    dX       = dY·W                      (W rebuilt from the factors)
    dB       = scale · dW·Aᵀ             (m, r)
    dA       = scale · Bᵀ·dW             (r, n)
    dvalues  = dW.flat[support]          (the dense weight gradient gathered at the support)
    db       = Σ_T dY

The Function saves only X and the factors (B, A, values, support), which are the layer's own
parameters and buffer, so no dense (m, n) tensor lives between forward and backward; W and dW exist
only transiently inside forward and backward. Scatter and gather use ``index_add_`` /
``index_select``; no Triton kernel is provided because no GPU benchmark has shown one to help.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


def compose_weight(
    B: torch.Tensor, A: torch.Tensor, values: torch.Tensor, support: torch.Tensor, scale: float
) -> torch.Tensor:
    """The dense weight ``W = scale·B·A + S`` (shape (m, n)), in one (m, n) allocation."""
    out_features, in_features = B.shape[0], A.shape[1]
    weight = torch.zeros(out_features * in_features, dtype=B.dtype, device=B.device)
    weight.index_add_(0, support, values)
    return weight.view(out_features, in_features).addmm_(B, A, alpha=scale)


class SLTrainLinearFunction(torch.autograd.Function):
    """``Y = X·(scale·B·A + S)ᵀ + b`` saving only X and the factors; see the module docstring."""

    @staticmethod
    def forward(ctx, input, B, A, values, support, bias, scale):
        weight = compose_weight(B, A, values, support, scale)
        ctx.save_for_backward(input, B, A, values, support)
        ctx.scale = scale
        return F.linear(input, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        input, B, A, values, support = ctx.saved_tensors
        scale = ctx.scale
        needs_input, needs_B, needs_A, needs_values, _, needs_bias, _ = ctx.needs_input_grad
        grad_rows = grad_output.reshape(-1, grad_output.shape[-1])

        grad_input = grad_B = grad_A = grad_values = grad_bias = None
        if needs_input:
            weight = compose_weight(B, A, values, support, scale)
            grad_input = grad_output.matmul(weight)
            del weight
        if needs_B or needs_A or needs_values:
            grad_weight = grad_rows.t().mm(input.reshape(-1, input.shape[-1]))
            if needs_B:
                grad_B = grad_weight.mm(A.t()).mul_(scale)
            if needs_A:
                grad_A = B.t().mm(grad_weight).mul_(scale)
            if needs_values:
                grad_values = grad_weight.view(-1).index_select(0, support)
        if needs_bias:
            grad_bias = grad_rows.sum(0)
        return grad_input, grad_B, grad_A, grad_values, None, grad_bias, None


def sltrain_linear(
    input: torch.Tensor,
    B: torch.Tensor,
    A: torch.Tensor,
    values: torch.Tensor,
    support: torch.Tensor,
    bias: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """``Y = X·(scale·B·A + S)ᵀ + b`` through :class:`SLTrainLinearFunction`.

    Under autocast the floating inputs are cast to the autocast dtype first and the Function runs
    with autocast off, so forward and backward compute in one dtype (as ``custom_fwd(cast_inputs=…)``
    does); the casts are ordinary autograd ops, so gradients reach the float32 parameters.
    """
    device_type = input.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        input, B, A, values = (t.to(dtype) for t in (input, B, A, values))
        bias = None if bias is None else bias.to(dtype)
        with torch.autocast(device_type, enabled=False):
            return SLTrainLinearFunction.apply(input, B, A, values, support, bias, scale)
    return SLTrainLinearFunction.apply(input, B, A, values, support, bias, scale)
