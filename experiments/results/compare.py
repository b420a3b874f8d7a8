"""Compare the methods on one model, one corpus and one token budget: a markdown table and a plot.

    python -m experiments.results.compare                      # every method, CPU size
    python -m experiments.results.compare --methods adamw galore_torch_adamw --lr_factors 0.3 1 3

Each method trains the same model on the same data for the same number of steps, at its own
learning rate (:data:`METHODS`; ``--lr_factors`` multiplies it for a small sweep, and the best final
validation loss per method is reported). Outputs in ``--out``: ``results.md`` (table with optimizer
state bytes and tokens/s beside each method), ``val_loss.png`` (validation loss vs step) and
``results.json``; the runs themselves go to ``--runs_dir``. Labels are the registry's
(``OptimizerInfo.label``); peers (galore_torch, torchao) need their package installed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from experiments.bench.common import command_line, device_label, write_text
from experiments.config import TrainConfig
from experiments.logging_utils import METRICS_FILE, read_metrics
from experiments.methods import info_for
from experiments.plotting import plot_validation_curves
from experiments.pretrain import train


@dataclass(frozen=True)
class Method:
    """A row of the comparison: the optimizer, the learning rate it runs at, more config overrides,
    and what the row's label adds to the optimizer's (``note``), or replaces it with (``label``)."""

    optimizer: str
    lr: float
    overrides: dict = field(default_factory=dict)
    note: str = ""
    label: str = ""

    @property
    def title(self) -> str:
        base = self.label or info_for(self.optimizer).label
        return f"{base}, {self.note}" if self.note else base


# Starting learning rates (``--lr_factors`` sweeps around them). On llama_tiny (results/cpu_tiny) a
# 0.3x/1x/3x sweep put AdamW's best near 1e-3 and the projected methods' best (scale 0.25) at 3e-2,
# the top of that sweep; the DCT default (scaled residual) measured 1.6644 at 1e-2 and 1.6417 at 3e-2.
# SST and SLTrain (B, A, S trained with plain AdamW) start from 3e-3, untuned. Low-bit moments
# (``moment_bits``: projected and plain parameters alike) run at the lr of their 32-bit counterpart.
METHODS: dict[str, Method] = {
    "adamw": Method("adamw", 1e-3, label="AdamW (full rank)"),
    "galore_adamw": Method("galore_adamw", 3e-2),
    "galore_torch_adamw": Method("galore_torch_adamw", 3e-2),
    "dct_default": Method("dct_adamw", 3e-2, note="defaults: l2/transport + scaled residual"),
    **{
        f"dct_{score}_{moments}": Method("dct_adamw", 3e-2, {"score": score, "moments": moments,
                                                            "optimizer_kwargs": {"residual": "none"}},
                                         note=f"{score}/{moments}, no residual")
        for score in ("l2", "l1")
        for moments in ("keep", "reset", "transport")
    },
    **{
        f"{key}_{bits}bit": Method(optimizer, 3e-2, {"optimizer_kwargs": {"moment_bits": bits}},
                                   note=f"{bits}-bit moments")
        for key, optimizer in (("dct", "dct_adamw"), ("galore", "galore_adamw"))
        for bits in (8, 4)
    },
    "adamw_lib": Method("lowrank_plain_adamw", 1e-3, note="32-bit"),
    "adamw_lib_8bit": Method("adamw8bit", 1e-3),
    "adamw_lib_4bit": Method("adamw4bit", 1e-3),
    "torchao_adamw8bit": Method("torchao_adamw8bit", 1e-3),
    "torchao_adamw4bit": Method("torchao_adamw4bit", 1e-3),
    # APOLLO's update is the full gradient scaled channel by channel to Adam's magnitude: AdamW's lr range.
    "apollo": Method("apollo_adamw", 3e-3),
    "apollo_mini": Method("apollo_mini", 3e-3),
    # Its plain group (embedding, norms, head: AdamW) at an lr of its own: on llama_tiny at 1000 steps 1e-2
    # beat Mini's 3e-3 for that group (results/APOLLO.md). --lr_factors scale the projected group's lr only.
    "apollo_mini_plain_lr": Method("apollo_mini", 3e-3, {"plain_lr": 1e-2}, note="plain group at lr 1e-2"),
    "apollo_dct": Method("apollo_adamw", 3e-3, {"optimizer_kwargs": {"proj": "dct"}}, note="proj='dct'"),
    "apollo_mini_dct": Method("apollo_mini", 3e-3, {"plain_lr": 1e-2, "optimizer_kwargs": {"proj": "dct"}},
                              note="proj='dct', plain group at lr 1e-2"),
    "apollo_torch": Method("apollo_torch_adamw", 3e-3),
    "apollo_torch_mini": Method("apollo_torch_mini", 3e-3),
    "apollo_torch_mini_plain_lr": Method("apollo_torch_mini", 3e-3, {"plain_lr": 1e-2},
                                         note="plain group at lr 1e-2"),
    "sst": Method("sst_adamw", 3e-3),
    "sltrain": Method("adamw", 3e-3, {"parameterization": "sltrain"}, label="SLTrain"),
}
# Int8 weights (``--weight_bits 8``: every nn.Linear but the head as int8 codes with one --dtype scale
# per row, embedding, head and norms in --dtype) with the optimizer and lr of the row without them.
# torch.optim.AdamW cannot write int8 weights: AdamW's int8 row is the library's plain path (adamw_lib).
METHODS.update({
    f"{key}_int8": dataclasses.replace(METHODS[key], overrides={**METHODS[key].overrides, "weight_bits": 8},
                                       note=f"{METHODS[key].note}, int8 weights" if METHODS[key].note
                                       else "int8 weights")
    for key in ("adamw_lib", "apollo_mini", "dct_default")
})


def add_budget_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of the budget every method shares (model, steps, batch, rank, evaluation, seed)."""
    parser.add_argument("--model_config", default="llama_tiny")
    parser.add_argument("--num_training_steps", type=int, default=1000)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--max_length", type=int, default=128)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--update_proj_gap", type=int, default=200)
    parser.add_argument("--eval_every", type=int, default=100)
    parser.add_argument("--eval_tokens", type=int, default=65_536)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="weights dtype of every run (with --weight_bits 8: the dtype of the row scales, "
                             "embedding, head and norms); default float32")


def base_config(args: argparse.Namespace) -> TrainConfig:
    """The budget every method shares (no checkpoints, wandb off)."""
    return TrainConfig(
        model_config=args.model_config,
        num_training_steps=args.num_training_steps,
        batch_size=args.batch_size,
        max_length=args.max_length,
        rank=args.rank,
        update_proj_gap=args.update_proj_gap,
        eval_every=args.eval_every,
        eval_tokens=args.eval_tokens,
        save_every=0,
        wandb_mode="disabled",
        seed=args.seed,
        dtype=args.dtype,
    )


def validation_curve(save_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["val/loss"]) for r in read_metrics(save_dir / METRICS_FILE) if "val/loss" in r]


def format_lr(lr: float) -> str:
    """``lr`` in scientific notation with up to three significant digits and no trailing zeros
    (``1e-03``, ``1.5e-03``, ``3.33e-03``): distinct for every ``--lr_factors`` sweep, which one digit
    is not (1.5e-3 and 2e-3 both print ``2e-03``)."""
    mantissa, exponent = f"{lr:.2e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{exponent}"


def run_method(key: str, method: Method, base: TrainConfig, lr_factors: list[float], runs_dir: Path) -> dict:
    """Train ``method`` at each lr; return the best run's summary and every run's final loss."""
    sweep = []
    for factor in lr_factors:
        lr = method.lr * factor
        name = f"{key}-lr{format_lr(lr)}-seed{base.seed}"      # seeds may share a --runs_dir
        config = dataclasses.replace(base, optimizer=method.optimizer, lr=lr, run_name=name,
                                     save_dir=str(runs_dir / name), **method.overrides)
        result = train(config)
        sweep.append(
            {
                "lr": lr,
                "final_val_loss": result.final_val_loss,
                "final_val_perplexity": result.final_val_perplexity,
                "optimizer_state_bytes": result.optimizer_state_bytes,
                "tokens_per_second": result.tokens_per_second,
                "trainable_parameters": result.trainable_parameters,
                "total_parameters": result.total_parameters,
                "curve": validation_curve(Path(config.save_dir)),
            }
        )
    best = min(sweep, key=lambda run: (math.isnan(run["final_val_loss"]), run["final_val_loss"]))
    return {
        "key": key,
        "label": method.title,
        **best,
        "lr_sweep": [(run["lr"], run["final_val_loss"]) for run in sweep],
    }


def markdown_table(rows: list[dict], base: TrainConfig, device: str, command: str) -> str:
    """The results table; optimizer state is also given relative to AdamW when AdamW ran."""
    adamw_bytes = next((row["optimizer_state_bytes"] for row in rows if row["key"] == "adamw"), None)
    tokens = base.num_training_steps * base.batch_size * base.max_length
    lines = [
        f"Model `{base.model_config}`, embedded Shakespeare corpus (byte tokenizer), {base.num_training_steps} "
        f"steps x {base.batch_size} x {base.max_length} tokens = {tokens:,} tokens, rank {base.rank}, "
        f"update gap {base.update_proj_gap}, seed {base.seed}, {base.dtype} weights. Device: {device}.",
        "",
        f"Command: `{command}`",
        "",
        "| method | lr | final val loss | val ppl | optimizer state | vs AdamW | tokens/s | trainable params "
        "| lr sweep (lr: loss) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        ratio = f"{row['optimizer_state_bytes'] / adamw_bytes:.2f}x" if adamw_bytes else "n/a"
        sweep = ", ".join(f"{format_lr(lr)}: {loss:.4f}" for lr, loss in row["lr_sweep"])
        lines.append(
            f"| {row['label']} | {format_lr(row['lr'])} | {row['final_val_loss']:.4f} "
            f"| {row['final_val_perplexity']:.2f} "
            f"| {row['optimizer_state_bytes'] / 2**20:.2f} MiB | {ratio} | {row['tokens_per_second']:.0f} "
            f"| {row['trainable_parameters'] / 1e6:.2f}M | {sweep} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None, *, module: str = "experiments.results.compare") -> None:
    """Run the comparison; ``module`` is the entry point named in ``--help`` and in the recorded command
    (another script that calls this one, e.g. ``experiments.bench.torchao_map_probe``, passes its own)."""
    parser = argparse.ArgumentParser(
        prog=f"python -m {module}",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument(
        "--lr_factors",
        nargs="+",
        type=float,
        default=[1.0],
        help="multiply each method's lr by these factors and keep the best (default: 1)",
    )
    add_budget_flags(parser)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "cpu_tiny")
    parser.add_argument("--runs_dir", type=Path, default=Path("runs") / "compare")
    args = parser.parse_args(argv)

    base = base_config(args)
    rows = [run_method(key, METHODS[key], base, args.lr_factors, args.runs_dir) for key in args.methods]

    command = command_line(module, argv)
    device = device_label("cuda" if torch.cuda.is_available() else "cpu")
    table = markdown_table(rows, base, device, command)
    write_text(args.out / "results.md", table)
    write_text(args.out / "results.json", json.dumps(rows, indent=2) + "\n")
    plot_validation_curves(
        {row["label"]: row["curve"] for row in rows},
        args.out / "val_loss.png",
        title=f"validation loss, {base.model_config}, {base.num_training_steps} steps",
    )
    print(table)
    print(f"wrote {args.out / 'results.md'}, {args.out / 'val_loss.png'}, {args.out / 'results.json'}")


if __name__ == "__main__":
    main()
