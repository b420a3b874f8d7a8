"""``clip_grad_norm_(optimizer, max_norm)``: clip by the global norm of what the optimizer uses."""
from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor

from .validation import InvalidHyperparameter


def clip_grad_norm_(optimizer: torch.optim.Optimizer, max_norm: float, norm_type: float = 2.0,
                    error_if_nonfinite: bool = False) -> torch.Tensor:
    """Scale the gradients ``optimizer``'s next step uses so that their global ``norm_type``-norm
    is at most ``max_norm``; returns the norm before clipping (a 0-d tensor, no host sync).

    For the library's projected optimizers these are :meth:`gradients_in_use`: under
    ``backward_projection=True`` the projected accumulators ``R`` (``‖R‖ ≤ ‖G‖``: the norm of what
    the update reads, with no second backward), the full gradients of weights refreshing this
    step and the plain gradients, averaged over the process group first; otherwise every full
    gradient, exactly as ``torch.nn.utils.clip_grad_norm_(params)``. For any other optimizer, the
    gradients of its parameters. Call it after the last ``backward()`` of the step, before ``step()``.
    """
    if max_norm < 0 or not isinstance(max_norm, (int, float)) or isinstance(max_norm, bool):
        raise InvalidHyperparameter("max_norm", max_norm, f"Invalid max_norm: {max_norm!r} (expected a number >= 0)")
    if getattr(optimizer, "step_in_backward", False):
        raise RuntimeError("clip_grad_norm_: the optimizer steps each parameter inside the backward pass "
                           "(step_in_backward=True), before the global gradient norm exists, so nothing can be "
                           "clipped; use backward_projection=True without step_in_backward to clip")
    if any(isinstance(p, DTensor) for group in optimizer.param_groups for p in group["params"]):
        raise ValueError("clip_grad_norm_: FSDP2-sharded parameters need the norm over all shards; use "
                         "torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm), which reduces over them")
    if hasattr(optimizer, "gradients_in_use"):
        tensors = optimizer.gradients_in_use()
    else:
        tensors = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if not tensors:
        return torch.tensor(0.0)
    total = torch.nn.utils.get_total_norm(tensors, norm_type, error_if_nonfinite)
    coefficient = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    torch._foreach_mul_(tensors, coefficient.to(tensors[0].device))
    return total
