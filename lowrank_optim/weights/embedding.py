"""``F.embedding`` on an int8 weight, which torchao's tensor does not implement (it has
``F.linear`` only): the looked-up rows are dequantized (``s_i·q[i, :]`` in fp32, rounded once to
the weight's dtype), never the whole table, and the gradient is the dense ``∂L/∂Ŵ`` of
``nn.Embedding`` (``sparse=False``): the output gradients summed into the looked-up rows, zero at
``padding_idx``.

Registered on torchao's class through its extension point ``implements_torch_function``
(:func:`register_embedding`, once); ``max_norm`` (it renormalizes the weight in place),
``scale_grad_by_freq`` and ``sparse`` are refused.
"""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

_SIGNATURE = inspect.signature(F.embedding)
_REFUSED = {"max_norm": None, "scale_grad_by_freq": False, "sparse": False}


class _Int8Embedding(torch.autograd.Function):
    @staticmethod
    def forward(ctx, indices: torch.Tensor, weight: torch.Tensor, padding_idx: int | None) -> torch.Tensor:
        ctx.save_for_backward(indices)
        ctx.shape, ctx.padding_idx = weight.shape, padding_idx
        rows = weight.int_data[indices].float() * weight.scale[indices].float().unsqueeze(-1)
        return rows.to(weight.dtype)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (indices,) = ctx.saved_tensors
        n_cols = ctx.shape[1]
        grad_weight = grad_output.new_zeros(ctx.shape)
        grad_weight.index_add_(0, indices.reshape(-1), grad_output.reshape(-1, n_cols))
        if ctx.padding_idx is not None:
            grad_weight[ctx.padding_idx] = 0
        return None, grad_weight, None


def _int8_embedding(func, types, args, kwargs):
    bound = _SIGNATURE.bind(*args, **(kwargs or {}))
    bound.apply_defaults()
    options = bound.arguments
    for name, default in _REFUSED.items():
        if options[name] != default:
            raise NotImplementedError(f"F.embedding on an int8 weight does not take {name}={options[name]!r} "
                                      f"(only {name}={default!r})")
    weight, padding_idx = options["weight"], options["padding_idx"]
    if padding_idx is not None and padding_idx < 0:
        padding_idx += weight.shape[0]
    return _Int8Embedding.apply(options["input"], weight, padding_idx)


def register_embedding(int8_class: type) -> None:
    """Route ``F.embedding`` with an ``int8_class`` weight to the function above."""
    int8_class.implements_torch_function(F.embedding)(_int8_embedding)
