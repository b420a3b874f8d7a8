"""Checkpoints of FSDP2 runs (``--fsdp``): ``torch.distributed.checkpoint`` (DCP), same atomic folders.

``model_<step>/`` holds ``sharded/`` (DCP: every rank writes its own shards of the model and of
the optimizer state, ``.distcp`` files and one ``.metadata``) instead of ``model.pt`` and
``optimizer.pt``, next to the same ``training_state.pt`` and ``config.json`` as
:mod:`experiments.checkpoint`. The state dicts come from ``get_state_dict`` / ``set_state_dict``
(``torch.distributed.checkpoint.state_dict``), so a checkpoint loads on another number of ranks.

Atomicity as in :mod:`experiments.checkpoint`: all ranks write into one temporary folder, rank 0
adds the training state and renames it once every rank's shards are on disk.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from experiments.checkpoint import (
    SHARDED_DIR,
    TEMPORARY_PREFIX,
    TRAINING_STATE_FILE,
    load_state_file,
    publish,
    remove_temporaries,
    write_files,
)
from experiments.config import TrainConfig


def save_sharded_checkpoint(
    save_dir: str | Path,
    step: int,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    training_state: dict,
    config: TrainConfig,
) -> Path:
    """Collective: every rank calls it; returns ``save_dir/model_<step>``."""
    save_dir = Path(save_dir)
    temporary = save_dir / f"{TEMPORARY_PREFIX}{step}-sharded"
    final = save_dir / f"model_{step}"
    if dist.get_rank() == 0:
        save_dir.mkdir(parents=True, exist_ok=True)
        remove_temporaries(save_dir)
        temporary.mkdir()
    dist.barrier()
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=temporary / SHARDED_DIR)
    if dist.get_rank() == 0:
        write_files(temporary, {TRAINING_STATE_FILE: training_state}, config)
        publish(temporary, final)
    dist.barrier()
    return final


def load_sharded_checkpoint(folder: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Collective: load the model's and optimizer's shards in place; returns the training state.

    ``folder`` is checked first (:func:`experiments.checkpoint.check_checkpoint`)."""
    folder = Path(folder)
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=folder / SHARDED_DIR)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    return load_state_file(folder / TRAINING_STATE_FILE)
