"""Run logging: a ``metrics.jsonl`` file in the run directory, and wandb (offline by default).

Every record is one JSON line ``{"step": s, key: value, ...}``. A run resumed in its own folder
first drops the rows logged after its checkpoint (``experiments/run_folder.py``), so no step is
logged twice; :func:`read_metrics` still keeps the last value of each key per step (files written
before that rule).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

import torch

from experiments.config import TrainConfig

METRICS_FILE = "metrics.jsonl"


def projection_health(optimizer) -> dict[str, torch.Tensor]:
    """Means of ``optimizer.refresh_stats`` (``captured``, ``overlap`` per parameter) at a refresh step,
    as ``{"proj/<key>": 0-d tensor}`` left on the device (reading them is the caller's host sync).

    Projected optimizers fill ``refresh_stats`` (``{name: {"captured": x, "overlap": y}}``, numbers or
    0-d tensors) on the steps where they recompute a projection and leave it empty otherwise; other
    optimizers do not have it.
    """
    stats = getattr(optimizer, "refresh_stats", None)
    if not stats:
        return {}
    keys = sorted({key for entry in stats.values() for key in entry})
    means = {}
    for key in keys:
        values = [torch.as_tensor(entry[key], dtype=torch.float32) for entry in stats.values() if key in entry]
        means[f"proj/{key}"] = torch.stack(values).mean()
    return means


def perplexity(loss: float) -> float:
    """``exp(loss)``, infinite rather than an overflow error for a diverged run."""
    return math.exp(loss) if loss < 700 else math.inf


class RunLogger:
    """Writes metrics to ``<save_dir>/metrics.jsonl`` and, unless disabled, to wandb."""

    def __init__(self, config: TrainConfig, wandb_id: str, enabled: bool = True) -> None:
        self.enabled = enabled
        self.path = Path(config.save_dir) / METRICS_FILE
        self._wandb_run = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if config.wandb_mode != "disabled":
            import wandb

            self._wandb_run = wandb.init(
                project=config.wandb_project,
                name=config.run_name,
                id=wandb_id,
                resume="allow",
                dir=config.save_dir,
                mode=config.wandb_mode,
                config=config.to_dict(),
            )

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps({"step": step, **metrics}) + "\n")
        if self._wandb_run is not None:
            self._wandb_run.log(dict(metrics), step=step)

    def finish(self) -> None:
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None


def read_metrics(path: str | Path) -> list[dict]:
    """Records of a ``metrics.jsonl`` merged per step (later lines win), sorted by step."""
    by_step: dict[int, dict] = {}
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                record = json.loads(line)
                by_step.setdefault(record["step"], {}).update(record)
    return [by_step[step] for step in sorted(by_step)]
