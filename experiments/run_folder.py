"""Who may write into a run folder (``save_dir``), and what a resumed run does with the files there.

A run writes only into a folder of its own: one that holds no run yet (no ``config.json``,
``metrics.jsonl`` or ``model_<step>``), or the folder of the checkpoint it resumes from. Resuming
there from a checkpoint older than the folder's latest is refused: the resumed run would overwrite
the later checkpoints (``--continue_from`` the latest, or a new ``--run_name``, resume into a
folder of its own). A resumed run continues the folder's ``metrics.jsonl`` from its step: the rows
logged after that checkpoint by the interrupted process are dropped, the resumed run logs those
steps again. :func:`prune_checkpoints` applies ``--keep_last``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from experiments.checkpoint import CONFIG_FILE, list_checkpoints, resolve_checkpoint
from experiments.config import DEFAULT_RUNS_DIR, TrainConfig
from experiments.errors import UsageError
from experiments.logging_utils import METRICS_FILE


def intended_save_dir(config: TrainConfig) -> Path | None:
    """The folder the run will write to, where it is known before :func:`experiments.config.resolve`
    (``None``: a fresh, timestamped ``runs/<model>-<optimizer>-<time>``)."""
    if config.save_dir:
        return Path(config.save_dir)
    return DEFAULT_RUNS_DIR / config.run_name if config.run_name else None


def _run_files(folder: Path) -> list[str]:
    """The files and checkpoints of a run that ``folder`` holds."""
    names = [name for name in (CONFIG_FILE, METRICS_FILE) if (folder / name).exists()]
    return names + [path.name for _, path in list_checkpoints(folder)]


def check_run_folder(config: TrainConfig) -> None:
    """Raise :class:`UsageError` when the run would write into another run's folder or over a checkpoint."""
    folder = intended_save_dir(config)
    if folder is None or not folder.is_dir():
        return
    found = _run_files(folder)
    if not found:
        return
    if not config.continue_from:
        raise UsageError(
            "--save_dir" if config.save_dir else "--run_name",
            f"{folder} already holds a run ({', '.join(found[:4])}); resume it with --continue_from {folder}, "
            "or pick another --run_name / --save_dir",
        )
    checkpoint = resolve_checkpoint(config.continue_from)
    if checkpoint.parent.resolve() != folder.resolve():
        raise UsageError(
            "--save_dir" if config.save_dir else "--run_name",
            f"{folder} holds another run ({', '.join(found[:4])}) than the checkpoint {checkpoint}; a resumed "
            "run writes to its own folder or to a new one: pick another --run_name / --save_dir",
        )
    later = [
        path.name
        for step, path in list_checkpoints(folder)
        if path.name != checkpoint.name and step > int(checkpoint.name.removeprefix("model_"))
    ]
    if later:
        raise UsageError(
            "--continue_from",
            f"{folder} has checkpoints after {checkpoint.name} ({', '.join(later)}) that resuming into it would "
            f"overwrite; resume from its latest (--continue_from {folder}) or into a new folder (add --run_name NAME)",
        )


def resumes_in_place(config: TrainConfig) -> bool:
    """Whether the (resolved) run resumes from a checkpoint of its own ``save_dir``."""
    if not config.continue_from:
        return False
    return resolve_checkpoint(config.continue_from).parent.resolve() == Path(config.save_dir).resolve()


def truncate_metrics(save_dir: Path, step: int) -> int:
    """Drop the ``metrics.jsonl`` rows after ``step`` (atomically); return how many were dropped."""
    path = save_dir / METRICS_FILE
    if not path.exists():
        return 0
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
    dropped = sum(1 for line in lines if line.strip()) - len(kept)
    if dropped:
        temporary = path.with_name(f".{METRICS_FILE}.{os.getpid()}")
        temporary.write_text("".join(kept), encoding="utf-8")
        os.replace(temporary, path)
    return dropped


def prune_checkpoints(save_dir: str | Path, keep: int) -> list[Path]:
    """Delete all but the ``keep`` newest checkpoints of ``save_dir`` (``0``: keep all); return the deleted."""
    checkpoints = [path for _, path in list_checkpoints(save_dir)]
    if keep < 1 or len(checkpoints) <= keep:
        return []
    deleted = checkpoints[:-keep]
    for path in deleted:
        shutil.rmtree(path)
    return deleted
