"""Merge ``compare`` outputs of the low-bit runs into one table, plus each low-bit row against its
32-bit counterpart.

    python -m experiments.bench.lowbit_report --inputs DIR [DIR ...] --out DIR [compare's budget flags]

Every input folder holds one ``compare`` run's ``results.json`` and ``results.md`` (same model,
data, token budget and seed; the budget flags given here must be those of the runs, and are only
used to describe them). Writes into ``--out``: ``results.md`` (compare's table over all rows, the
commands that made them, and the low-bit table), ``results.json`` (all rows), ``val_loss.png``
(every curve) and ``val_loss_zoom.png`` (the second half of the run).

The low-bit table pairs each row with its float counterpart: DCTProjAdam 8/4-bit → DCTProjAdam
(defaults), GaLoreAdamW 8/4-bit → GaLoreAdamW, AdamW 8/4-bit (library plain path) and torchao's
AdamW8bit/4bit → AdamW (full rank, ``torch.optim.AdamW``).

The inputs come from ``python -m experiments.results.compare --methods ... --out DIR``, torchao's
rows included (``torchao_adamw8bit``/``torchao_adamw4bit`` are peers of ``experiments.methods``).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from experiments.bench.common import write_text  # noqa: E402
from experiments.plotting import plot_validation_curves, save_figure  # noqa: E402
from experiments.results import compare  # noqa: E402

REFERENCE = {
    "dct_8bit": "dct_default", "dct_4bit": "dct_default",
    "galore_8bit": "galore_adamw", "galore_4bit": "galore_adamw",
    "adamw_lib": "adamw", "adamw_lib_8bit": "adamw", "adamw_lib_4bit": "adamw",
    "torchao_adamw8bit": "adamw", "torchao_adamw4bit": "adamw",
}
ORDER = ["adamw", "adamw_lib", "adamw_lib_8bit", "adamw_lib_4bit", "torchao_adamw8bit", "torchao_adamw4bit",
         "galore_adamw", "galore_8bit", "galore_4bit", "dct_default", "dct_8bit", "dct_4bit"]


def bits_of(key: str) -> int | None:
    match = re.search(r"(8|4)bit$", key)
    return int(match.group(1)) if match else None


def lowbit_table(rows: dict[str, dict]) -> str:
    lines = ["| method | bits | final val loss | 32-bit counterpart | its loss | Δ loss | Δ % "
             "| state | state ÷ counterpart's |",
             "|---|---|---|---|---|---|---|---|---|"]
    for key, row in rows.items():
        reference = REFERENCE.get(key)
        bits = bits_of(key)
        if reference not in rows or bits is None:
            continue
        ref = rows[reference]
        delta = row["final_val_loss"] - ref["final_val_loss"]
        percent = 100 * delta / ref["final_val_loss"]
        lines.append(
            f"| {row['label']} | {bits} | {row['final_val_loss']:.4f} | {ref['label']} | {ref['final_val_loss']:.4f} "
            f"| {delta:+.4f} | {percent:+.2f}% "
            f"| {row['optimizer_state_bytes'] / 2**20:.2f} MiB "
            f"| {row['optimizer_state_bytes'] / ref['optimizer_state_bytes']:.2f}x |")
    return "\n".join(lines) + "\n"


def zoom_plot(rows: dict[str, dict], path: Path, title: str) -> None:
    figure, axes = plt.subplots(figsize=(9, 5.5))
    last = max(step for row in rows.values() for step, _ in row["curve"])
    colors = plt.get_cmap("tab20").colors
    for index, row in enumerate(rows.values()):
        points = [(s, v) for s, v in row["curve"] if s >= last / 2]
        if points:
            style = "--" if "4-bit" in row["label"] or "4bit" in row["label"] else (
                ":" if "8-bit" in row["label"] or "8bit" in row["label"] else "-")
            axes.plot(*zip(*points, strict=True), style, marker="o", markersize=3, label=row["label"],
                      color=colors[index % len(colors)])
    axes.set(xlabel="step", ylabel="validation loss (nats/token)", title=title)
    save_figure(figure, axes, path, legend_fontsize=7)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m experiments.bench.lowbit_report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inputs", nargs="+", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--title", default="")
    args, budget = parser.parse_known_args(argv)
    base = compare.base_config(compare_args(budget))

    rows: dict[str, dict] = {}
    commands = []
    for folder in args.inputs:
        for row in json.loads((folder / "results.json").read_text(encoding="utf-8")):
            rows[row["key"]] = row
        text = (folder / "results.md").read_text(encoding="utf-8")
        commands += re.findall(r"^Command: `(.*)`$", text, flags=re.M)
        device = re.search(r"Device: (.*)\.$", text, flags=re.M)
    ordered = {key: rows[key] for key in ORDER if key in rows} | {k: v for k, v in rows.items() if k not in ORDER}

    table = compare.markdown_table(list(ordered.values()), base, device.group(1) if device else "?", "; ".join(
        commands))
    table = table.replace("Command: `", "Commands (one process each, run side by side): `").replace("; ", "`; `")
    text = ((f"{args.title}\n\n" if args.title else "") + table
            + "\n### Low-bit moments vs their 32-bit counterpart\n\n" + lowbit_table(ordered))
    write_text(args.out / "results.md", text)
    write_text(args.out / "results.json", json.dumps(list(ordered.values()), indent=2) + "\n")
    title = f"validation loss, {base.model_config}, {base.num_training_steps} steps"
    plot_validation_curves({row["label"]: row["curve"] for row in ordered.values()}, args.out / "val_loss.png",
                           title=title)
    zoom_plot(ordered, args.out / "val_loss_zoom.png", title + " (second half)")
    print(text)


def compare_args(budget: list[str]) -> argparse.Namespace:
    """compare's budget flags (``--model_config`` … ``--seed``) parsed with compare's own defaults."""
    parser = argparse.ArgumentParser()
    compare.add_budget_flags(parser)
    return parser.parse_args(budget)


if __name__ == "__main__":
    main()
