"""Loss plots (matplotlib, headless Agg backend)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import matplotlib.ticker  # noqa: E402

# Distinct looks for many lines: ten colours, then the same colours dashed, dotted, dash-dotted;
# each line also gets its own marker, so that no two methods look alike (12 methods: AdamW and SST
# were both blue with colours alone).
COLOURS = plt.get_cmap("tab10").colors
LINESTYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h")


def line_style(index: int) -> dict:
    """The plot keywords of the ``index``-th line: all (colour, line style) pairs are distinct for up
    to 40 lines, and consecutive lines also differ in marker."""
    return {
        "color": COLOURS[index % len(COLOURS)],
        "linestyle": LINESTYLES[index // len(COLOURS) % len(LINESTYLES)],
        "marker": MARKERS[index % len(MARKERS)],
    }


def plot_run(records: Sequence[dict], path: str | Path, title: str) -> Path:
    """Training and validation loss vs step of one run (records from ``read_metrics``).

    The loss axis is logarithmic: a run falls from ln(vocabulary) (5.6 for the byte tokenizer) to
    about half of it in its first few percent of steps, and on a linear axis that drop takes most of
    the height while the rest of the run, where methods differ, is a flat line. A log axis keeps every
    point (nothing is clipped, a divergence stays visible) and gives equal ratios equal heights."""
    train = [(r["step"], r["train/loss"]) for r in records if "train/loss" in r]
    validation = [(r["step"], r["val/loss"]) for r in records if "val/loss" in r]
    figure, axes = plt.subplots(figsize=(7, 4.5))
    if train:
        axes.plot(*zip(*train, strict=True), label="train loss", linewidth=0.8, alpha=0.7)
    if validation:
        axes.plot(*zip(*validation, strict=True), "o-", label="validation loss")
    axes.set(xlabel="step", ylabel="loss (nats/token, log scale)", title=title)
    axes.set_yscale("log")
    axes.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    axes.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%.1f"))
    return save_figure(figure, axes, path)


def plot_validation_curves(curves: Mapping[str, Sequence[tuple[int, float]]], path: str | Path, title: str) -> Path:
    """Validation loss vs step, one line per method."""
    figure, axes = plt.subplots(figsize=(8, 5))
    for index, (label, points) in enumerate(curves.items()):
        if points:
            axes.plot(*zip(*points, strict=True), markersize=3, label=label, **line_style(index))
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
