"""Run a wandb sweep's grid locally, without a wandb server.

The YAML files in ``experiments/sweeps/`` are ordinary wandb sweep configs (``method: grid``), so
with an account::

    wandb sweep experiments/sweeps/lowrank_grid.yaml   # prints the sweep id
    wandb agent <entity/project/sweep_id>

Offline, the same grid runs one configuration after another in subprocesses::

    python -m experiments.sweep experiments/sweeps/lowrank_grid.yaml [--dry_run] \
        [--runs_dir runs/sweeps/lowrank_grid] [--wandb_mode offline] [-- extra pretrain flags]

Each run writes to ``<runs_dir>/<run_name>/``; at the end a table of final validation losses is
printed and saved as ``<runs_dir>/summary.md``.
"""

from __future__ import annotations

import argparse
import itertools
import math
import subprocess
import sys
from pathlib import Path

import yaml

from experiments.args import build_parser, explicit_flags
from experiments.logging_utils import METRICS_FILE, read_metrics

EXPERIMENTS_PROGRAM = "experiments.pretrain"


def load_sweep(path: str | Path) -> dict:
    """The sweep config, checked for what the local runner supports (a grid of flags of pretrain)."""
    with open(path, encoding="utf-8") as handle:
        sweep = yaml.safe_load(handle)
    if sweep.get("method") != "grid":
        raise ValueError(f"{path}: method is {sweep.get('method')!r}; the local runner expands grids only")
    flags = {action.dest for action in build_parser()._actions}
    for name, spec in sweep.get("parameters", {}).items():
        if name not in flags:
            raise ValueError(f"{path}: parameter {name!r} is not a flag of experiments.pretrain")
        if not isinstance(spec, dict) or not ({"value", "values"} & set(spec)):
            raise ValueError(f"{path}: parameter {name!r} needs 'value' or 'values' for a grid, got {spec!r}")
    return sweep


def expand_grid(sweep: dict) -> list[dict]:
    """Every combination of the parameters' ``values`` (``value`` entries are fixed), in YAML order."""
    names = list(sweep.get("parameters", {}))
    choices = [spec["values"] if "values" in spec else [spec["value"]] for spec in sweep["parameters"].values()]
    return [dict(zip(names, combination, strict=True)) for combination in itertools.product(*choices)]


def run_name(point: dict, varying: list[str]) -> str:
    """A readable folder name from the parameters that vary across the grid."""
    return "-".join(f"{name}={point[name]}" for name in varying) or "run"


def pretrain_argv(point: dict) -> list[str]:
    """``--name=value`` flags, as wandb's ``${args}`` passes them."""
    return [f"--{name}={value}" for name, value in point.items()]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.sweep", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("sweep", type=Path, help="wandb sweep YAML (method: grid)")
    parser.add_argument("--runs_dir", type=Path, default=None, help="default runs/sweeps/<yaml name>")
    parser.add_argument("--wandb_mode", default="offline", choices=("online", "offline", "disabled"))
    parser.add_argument("--dry_run", action="store_true", help="print the commands only")
    argv = sys.argv[1:] if argv is None else list(argv)
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    extra = argv[split + 1 :]  # flags after "--" go to every run

    sweep = load_sweep(args.sweep)
    grid = expand_grid(sweep)
    varying = [name for name, spec in sweep["parameters"].items() if len(spec.get("values", [])) > 1]
    runs_dir = args.runs_dir or Path("runs") / "sweeps" / args.sweep.stem
    rows = []
    # The runner's --wandb_mode and the flags after "--" replace the YAML's values (online and the step
    # count are what `wandb agent` needs): each flag appears once in a command.
    replaced = {"run_name", "save_dir", "wandb_mode", *explicit_flags(extra)}
    for index, point in enumerate(grid, 1):
        name = run_name(point, varying)
        save_dir = runs_dir / name
        command = [
            sys.executable,
            "-m",
            EXPERIMENTS_PROGRAM,
            *pretrain_argv({key: value for key, value in point.items() if key not in replaced}),
            f"--run_name={name}",
            f"--save_dir={save_dir}",
            f"--wandb_mode={args.wandb_mode}",
            *extra,
        ]
        print(f"[{index}/{len(grid)}] {' '.join(command)}", flush=True)
        if args.dry_run:
            continue
        returncode = subprocess.run(command, check=False).returncode
        validation = (
            [r["val/loss"] for r in read_metrics(save_dir / METRICS_FILE) if "val/loss" in r]
            if (save_dir / METRICS_FILE).exists()
            else []
        )
        rows.append((name, returncode, validation[-1] if validation else float("nan")))
    if rows:
        lines = ["| run | exit code | final val loss |", "|---|---|---|"]
        lines += [
            f"| {name} | {code} | {loss:.4f} |"
            for name, code, loss in sorted(rows, key=lambda r: (math.isnan(r[2]), r[2]))
        ]
        runs_dir.mkdir(parents=True, exist_ok=True)
        (runs_dir / "summary.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
        print("\n".join(lines))


if __name__ == "__main__":
    main()
