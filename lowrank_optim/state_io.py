"""Loading optimizer state without torch's dtype casts.

``torch.optim.Optimizer.load_state_dict`` casts every state tensor of a floating parameter to the
parameter's dtype (except ``"step"``): integer subspace indices and step counts would become
floats, fp32 moments of bf16 weights would become bf16. The library's optimizers call
:func:`restore_saved_dtypes` right after it, so every saved tensor comes back as it was saved.
"""
from __future__ import annotations

import torch


def restore_saved_dtypes(optimizer: torch.optim.Optimizer, state_dict: dict) -> None:
    """Replace the state tensors torch just loaded by copies of the saved ones, in the saved dtype,
    on the parameter's device (parameters matched by position, as torch does)."""
    saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for saved_id, param in zip(saved_ids, params, strict=True):
        for key, value in state_dict["state"].get(saved_id, {}).items():
            if isinstance(value, torch.Tensor):
                optimizer.state[param][key] = value.to(device=param.device, copy=True)
