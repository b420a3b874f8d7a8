"""Loss plots: the run plot's log loss axis and title, distinct lines in the comparison plot."""

from __future__ import annotations

import matplotlib.colors

from experiments import plotting
from experiments.config import TrainConfig, resolve
from experiments.pretrain import plot_title


def captured_axes(monkeypatch) -> list:
    """The axes each plot function hands to ``save_figure`` (which still writes the file)."""
    seen = []
    finish = plotting.save_figure

    def keep(figure, axes, path, **kwargs):
        seen.append(
            (
                axes.get_yscale(),
                axes.get_title(),
                [
                    (matplotlib.colors.to_hex(line.get_color()), line.get_linestyle(), line.get_marker())
                    for line in axes.get_lines()
                ],
            )
        )
        return finish(figure, axes, path, **kwargs)

    monkeypatch.setattr(plotting, "save_figure", keep)
    return seen


def test_run_plot_has_a_log_loss_axis(monkeypatch, tmp_path):
    seen = captured_axes(monkeypatch)
    records = [{"step": s, "train/loss": 5.6 / s**0.3} for s in range(1, 101)] + [{"step": 100, "val/loss": 1.9}]
    path = plotting.plot_run(records, tmp_path / "run.png", title="t: adamw, lr 0.001")
    assert path.stat().st_size > 0
    assert seen[0][:2] == ("log", "t: adamw, lr 0.001")


def test_run_plot_title_names_the_optimizer_and_lr():
    assert plot_title(resolve(TrainConfig(run_name="t", optimizer="adamw", lr=3e-3), 1)) == "t: adamw, lr 0.003"
    assert plot_title(resolve(TrainConfig(run_name="t", optimizer="galore_adamw", rank=64), 1)) == (
        "t: galore_adamw, lr 0.01, rank 64"
    )


def test_twelve_methods_get_twelve_distinct_styles(monkeypatch, tmp_path):
    seen = captured_axes(monkeypatch)
    curves = {f"method {i}": [(10, 3.0 - i / 100), (20, 2.5 - i / 100)] for i in range(12)}
    plotting.plot_validation_curves(curves, tmp_path / "compare.png", title="12 methods")
    styles = seen[0][2]
    assert len(styles) == 12 and len(set(styles)) == 12
    # AdamW (first) and SST (eleventh) shared tab10's blue with colour alone.
    assert styles[0] != styles[10] and styles[0][1:] != styles[10][1:]
    assert len({(style["color"], style["linestyle"]) for style in map(plotting.line_style, range(40))}) == 40
