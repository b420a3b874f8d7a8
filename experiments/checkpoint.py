"""Atomic checkpoints: one folder ``model_<step>/`` per checkpoint inside the run's ``save_dir``.

A checkpoint is written into a hidden temporary folder (``.tmp-model_<step>-<pid>``), flushed to
disk, and only then renamed to ``model_<step>`` (``os.replace``, atomic on POSIX). A run killed at
any moment therefore leaves either a complete ``model_<step>`` or none, never a partial one;
temporary folders left by a killed run are removed by the next save.

Contents, all loadable with ``torch.load(weights_only=True)``:

* ``model.pt``: the model's ``state_dict()`` (unwrapped from DDP);
* ``optimizer.pt``: ``optimizer.state_dict()``;
* ``training_state.pt``: step, tokens seen, scheduler state, data-loader state (position and its
  generator), RNG states (torch CPU, CUDA when used), the wandb run id;
* ``config.json``: the resolved :class:`~experiments.config.TrainConfig`.

Reading one back, every user mistake is a :class:`~experiments.errors.UsageError` naming the folder
or file: no checkpoint where ``--continue_from`` points, a missing file, a file ``torch.load`` cannot
read (truncated, corrupt), the wrong kind for ``--fsdp``, or states that do not fit the run.
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
from pathlib import Path

import torch

from experiments.config import TrainConfig
from experiments.errors import UsageError, excerpt

CHECKPOINT_PATTERN = re.compile(r"^model_(\d+)$")
TEMPORARY_PREFIX = ".tmp-model_"
RETIRED_PREFIX = ".old-model_"
MODEL_FILE = "model.pt"
OPTIMIZER_FILE = "optimizer.pt"
TRAINING_STATE_FILE = "training_state.pt"
CONFIG_FILE = "config.json"
SHARDED_DIR = "sharded"  # FSDP2 runs: model and optimizer shards (experiments/checkpoint_sharded.py)
PLAIN_CONTENTS = (MODEL_FILE, OPTIMIZER_FILE, TRAINING_STATE_FILE, CONFIG_FILE)
SHARDED_CONTENTS = (SHARDED_DIR, TRAINING_STATE_FILE, CONFIG_FILE)


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_files(folder: Path, files: dict[str, dict], config: TrainConfig) -> None:
    """``torch.save`` each of ``files`` (name -> state) and the config into ``folder``, flushed to disk."""
    for name, state in files.items():
        torch.save(state, folder / name)
    config.save_json(folder / CONFIG_FILE)
    for name in (*files, CONFIG_FILE):
        _fsync(folder / name)
    _fsync(folder)


def publish(temporary: Path, final: Path) -> None:
    """Rename the finished ``temporary`` folder to ``final`` (replacing an older one of that name)."""
    if final.exists():  # a resumed run saving a step again: swap, so ``final`` is never missing
        retired = final.with_name(f"{RETIRED_PREFIX}{final.name.removeprefix('model_')}-{os.getpid()}")
        os.replace(final, retired)
        os.replace(temporary, final)
        shutil.rmtree(retired)
    else:
        os.replace(temporary, final)
    _fsync(final.parent)


def remove_temporaries(save_dir: Path) -> None:
    """Delete temporary and retired folders that a killed run left behind in ``save_dir``."""
    for prefix in (TEMPORARY_PREFIX, RETIRED_PREFIX):
        for path in save_dir.glob(f"{prefix}*"):
            shutil.rmtree(path, ignore_errors=True)


def save_checkpoint(
    save_dir: str | Path,
    step: int,
    *,
    model_state: dict,
    optimizer_state: dict,
    training_state: dict,
    config: TrainConfig,
) -> Path:
    """Write ``save_dir/model_<step>`` atomically and return its path."""
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    remove_temporaries(save_dir)
    temporary = save_dir / f"{TEMPORARY_PREFIX}{step}-{os.getpid()}"
    temporary.mkdir()
    files = {MODEL_FILE: model_state, OPTIMIZER_FILE: optimizer_state, TRAINING_STATE_FILE: training_state}
    write_files(temporary, files, config)
    final = save_dir / f"model_{step}"
    publish(temporary, final)
    return final


def list_checkpoints(save_dir: str | Path) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every complete checkpoint in ``save_dir``, by step."""
    save_dir = Path(save_dir)
    if not save_dir.is_dir():
        return []
    found = [
        (int(match.group(1)), path)
        for path in save_dir.iterdir()
        if path.is_dir() and (match := CHECKPOINT_PATTERN.match(path.name))
    ]
    return sorted(found)


def resolve_checkpoint(path: str | Path) -> Path:
    """``path`` itself if it is a checkpoint folder, else the latest checkpoint inside it."""
    path = Path(path)
    if (path / CONFIG_FILE).is_file() and CHECKPOINT_PATTERN.match(path.name):
        return path
    checkpoints = list_checkpoints(path)
    if not checkpoints:
        if path.is_dir():
            found = "holds no model_<step> folder"
        else:
            found = "is not a directory" if path.exists() else "does not exist"
        raise UsageError(
            "--continue_from", f"expected a checkpoint folder model_<step> or a save_dir holding one; {path} {found}"
        )
    return checkpoints[-1][1]


def check_checkpoint(folder: Path, sharded: bool) -> None:
    """Raise :class:`UsageError` unless ``folder`` is a complete checkpoint of the expected kind
    (``sharded``: written by an FSDP2 run, for a run with ``--fsdp``)."""
    if (folder / SHARDED_DIR).is_dir() and not sharded:
        raise UsageError(str(folder), "is a sharded checkpoint (an FSDP2 run): resume it with --fsdp under torchrun")
    if sharded and (folder / MODEL_FILE).is_file():
        raise UsageError(str(folder), "is not sharded (a DDP or single-process run): resume it without --fsdp")
    expected = SHARDED_CONTENTS if sharded else PLAIN_CONTENTS
    missing = [name for name in expected if not (folder / name).exists()]
    if missing:
        raise UsageError(
            str(folder), f"is an incomplete checkpoint: {', '.join(missing)} missing (expected {', '.join(expected)})"
        )


def load_state_file(path: Path, map_location: str | torch.device = "cpu") -> dict:
    """``torch.load(path, weights_only=True)``; a missing, truncated or corrupt file is a :class:`UsageError`."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise UsageError(str(path), "is missing from its checkpoint folder") from None
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as error:
        raise UsageError(
            str(path),
            f"cannot be loaded with torch.load(weights_only=True): truncated, corrupt or not a checkpoint file "
            f"({excerpt(error)}); resume from another checkpoint",
        ) from None


def load_state_into(target: torch.nn.Module | torch.optim.Optimizer, state: dict, path: Path) -> None:
    """``target.load_state_dict(state)``; a state that does not fit ``target`` (the run's flags
    describe another model or optimizer than the saved one) is a :class:`UsageError` naming ``path``."""
    try:
        target.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError) as error:
        raise UsageError(
            str(path),
            f"does not fit this run's {type(target).__name__} ({excerpt(error)}); resume with the model and "
            "optimizer flags of the saved run",
        ) from None


def load_checkpoint(folder: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """The three state files of a checkpoint folder, loaded with ``weights_only=True``."""
    folder = Path(folder)
    return {
        "model": load_state_file(folder / MODEL_FILE, map_location),
        "optimizer": load_state_file(folder / OPTIMIZER_FILE, map_location),
        "training_state": load_state_file(folder / TRAINING_STATE_FILE),
    }
