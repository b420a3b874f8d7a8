"""Loss plots (matplotlib, headless Agg backend)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)


def plot_run(records: Sequence[dict], path: str | Path, title: str) -> Path:
    """Training and validation loss vs step of one run (records from ``read_metrics``)."""
    train = [(r["step"], r["train/loss"]) for r in records if "train/loss" in r]
    validation = [(r["step"], r["val/loss"]) for r in records if "val/loss" in r]
    figure, axes = plt.subplots(figsize=(7, 4.5))
    if train:
        axes.plot(*zip(*train, strict=True), label="train loss", linewidth=0.8, alpha=0.7)
    if validation:
        axes.plot(*zip(*validation, strict=True), "o-", label="validation loss")
    axes.set(xlabel="step", ylabel="loss (nats/token)", title=title)
    return save_figure(figure, axes, path)


def plot_validation_curves(curves: Mapping[str, Sequence[tuple[int, float]]], path: str | Path, title: str) -> Path:
    """Validation loss vs step, one line per method."""
    figure, axes = plt.subplots(figsize=(8, 5))
    for label, points in curves.items():
        if points:
            axes.plot(*zip(*points, strict=True), "o-", markersize=3, label=label)
    axes.set(xlabel="step", ylabel="validation loss (nats/token)", title=title)
    return save_figure(figure, axes, path, legend_fontsize=8)


def save_figure(figure, axes, path: str | Path, legend_fontsize: float | None = None) -> Path:
    """The plots' common finish: a light grid, the legend, a tight layout, a 120-dpi file; the figure is closed."""
    axes.grid(alpha=0.3)
    axes.legend(fontsize=legend_fontsize)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return Path(path)
