"""Loading optimizer state: only the format this version writes, without torch's dtype casts.

**Format.** ``state_dict()["state_format"]`` is :data:`STATE_FORMAT`. This version loads the state
dicts it saves (the promise), and one without the key, as ``torch.distributed.checkpoint`` rebuilds
it from per-parameter entries; a state dict of another format, or whose param groups lack keys of
this version, is refused with what it lacks (no defaults are guessed for an older layout).

Formats 3 and 4 each changed one thing, a map of the 4-bit moments
(:mod:`lowrank_optim.quantization.maps`): format 3 the second moment's (the square-root map), format 4
the first moment's (the full signed map, 16 levels instead of 15). The stored tensors kept their
shapes, so an older 4-bit state would load and be misread. A format-2 or format-3 state dict without
a ``moment_bits=4`` group holds the same tensors as format 4 and is loaded; one with such a group is
refused by name.

``torch.optim.Optimizer.load_state_dict`` casts every state tensor of a floating parameter to the
parameter's dtype (except ``"step"``): integer subspace indices and step counts would become
floats, fp32 moments of bf16 weights would become bf16. The library's optimizers call
:func:`restore_saved_dtypes` right after it, so every saved tensor comes back as it was saved.
"""
from __future__ import annotations

import torch

STATE_FORMAT = 4
# formats that differ from this one only in the maps of 4-bit moments, and what changed since
_OTHER_4BIT_MAPS = {2: "4-bit first and second moments", 3: "4-bit first moments"}


def check_state_format(state_dict: dict, group_keys: set[str], optimizer_name: str) -> None:
    """``ValueError`` naming what is wrong when ``state_dict`` is not of :data:`STATE_FORMAT` (or a
    format-2 or format-3 one without 4-bit moments, module doc) or a saved param group lacks one of
    ``group_keys``; nothing is loaded then."""
    found = state_dict.get("state_format", STATE_FORMAT)
    four_bit = [index for index, group in enumerate(state_dict["param_groups"]) if group.get("moment_bits") == 4]
    if found in _OTHER_4BIT_MAPS and four_bit:
        raise ValueError(f"Invalid state_dict: state_format {found!r} with moment_bits=4 in "
                         f"param_groups[{four_bit[0]}] (format {STATE_FORMAT} stores {_OTHER_4BIT_MAPS[found]} on "
                         "other maps; load it with the version that saved it, or start those moments anew)")
    if found != STATE_FORMAT and found not in _OTHER_4BIT_MAPS:
        raise ValueError(f"Invalid state_dict: state_format {found!r} (this version of lowrank-optim loads format "
                         f"{STATE_FORMAT}; load it with the version that saved it)")
    for index, group in enumerate(state_dict["param_groups"]):
        missing = sorted(group_keys - group.keys())
        if missing:
            raise ValueError(f"Invalid state_dict: param_groups[{index}] lacks {', '.join(map(repr, missing))} "
                             f"(saved by another optimizer or another version of {optimizer_name}; this version "
                             "loads the state dicts it saves)")


def restore_saved_dtypes(optimizer: torch.optim.Optimizer, state_dict: dict) -> None:
    """Replace the state tensors torch just loaded by copies of the saved ones, in the saved dtype,
    on the parameter's device (parameters matched by position, as torch does)."""
    saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for saved_id, param in zip(saved_ids, params, strict=True):
        for key, value in state_dict["state"].get(saved_id, {}).items():
            if isinstance(value, torch.Tensor):
                optimizer.state[param][key] = value.to(device=param.device, copy=True)
