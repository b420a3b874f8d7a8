"""Low-bit rows against their 32-bit counterparts over several seeds: mean and spread.

    python -m experiments.bench.lowbit_seeds --inputs DIR [DIR ...] --out FILE.md

Every input folder holds one ``python -m experiments.results.compare`` run (``results.json`` and
``results.md``, whose header names the seed: "…, seed 0, float32 weights." or, before the weights'
dtype was a flag, "…, seed 0."); the same methods on the same model and budget at
several seeds. For each method: the final validation loss per seed, its mean and spread
(max − min); for each low-bit row, ``Δ% = 100·(mean − mean₃₂)/mean₃₂`` against its 32-bit
counterpart (:data:`~experiments.bench.lowbit_report.REFERENCE`) and the per-seed Δ% (same seed,
same data: the paired difference, which is less noisy than the difference of the means) with their
mean and its standard error, ``s/√n`` of the per-seed Δ% (the noise a goal such as "within +1%" or
"at least as good" is read against). A second
table sets the library's low-bit AdamW beside the peer's of the same bits (:data:`PEER`, torchao's):
the same Δ% with the peer in place of the 32-bit row (negative: the library's ends lower).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
import statistics
from collections import defaultdict
from pathlib import Path

from experiments.bench.common import write_text
from experiments.bench.lowbit_report import ORDER, REFERENCE, bits_of

PEER = {"adamw_lib_8bit": "torchao_adamw8bit", "adamw_lib_4bit": "torchao_adamw4bit"}


def read_runs(folders: list[Path]) -> tuple[dict[str, dict[int, float]], dict[str, str], list[str]]:
    """``{key: {seed: final loss}}``, ``{key: label}`` and the commands of the input folders."""
    losses: dict[str, dict[int, float]] = defaultdict(dict)
    labels, commands = {}, []
    for folder in folders:
        text = (folder / "results.md").read_text(encoding="utf-8")
        seed = int(re.search(r"seed (\d+)[.,]", text).group(1))    # "seed 0, float32 weights." (or "seed 0.")
        commands += re.findall(r"^Command: `(.*)`$", text, flags=re.M)
        for row in json.loads((folder / "results.json").read_text(encoding="utf-8")):
            losses[row["key"]][seed] = row["final_val_loss"]
            labels[row["key"]] = row["label"]
    return losses, labels, commands


@dataclasses.dataclass(frozen=True)
class Difference:
    """``runs`` against ``reference`` over the seeds both have: their means, the ``Δ%`` of the means,
    the paired ``Δ%`` per seed and their mean ± standard error (as table text)."""

    seeds: list[int]
    mean: float
    reference_mean: float
    delta: str
    paired: str
    paired_mean: str


def difference(runs: dict[int, float], reference: dict[int, float]) -> Difference:
    seeds = sorted(set(runs) & set(reference))
    mean, reference_mean = statistics.fmean(runs[s] for s in seeds), statistics.fmean(reference[s] for s in seeds)
    per_seed = [100 * (runs[s] / reference[s] - 1) for s in seeds]
    paired = ", ".join(f"{value:+.2f}%" for value in per_seed)
    if len(per_seed) > 1:
        error = statistics.stdev(per_seed) / len(per_seed) ** 0.5
        paired_mean = f"{statistics.fmean(per_seed):+.2f} ± {error:.2f}%"
    else:
        paired_mean = f"{per_seed[0]:+.2f}% (one seed)"
    return Difference(seeds, mean, reference_mean, f"{100 * (mean / reference_mean - 1):+.2f}%", paired, paired_mean)


def peer_table(losses: dict[str, dict[int, float]], labels: dict[str, str]) -> str:
    lines = ["| library | peer | seeds | library mean | peer mean | Δ% of means | paired Δ% per seed "
             "| paired mean ± s.e. |", "|---|---|---|---|---|---|---|---|"]
    for key, peer in PEER.items():
        if key in losses and peer in losses:
            d = difference(losses[key], losses[peer])
            lines.append(f"| {labels[key]} | {labels[peer]} | {', '.join(map(str, d.seeds))} | {d.mean:.4f} "
                         f"| {d.reference_mean:.4f} | {d.delta} | {d.paired} | {d.paired_mean} |")
    return "\n".join(lines) + "\n" if len(lines) > 2 else ""


def seeds_table(losses: dict[str, dict[int, float]], labels: dict[str, str]) -> str:
    keys = [key for key in ORDER if key in losses] + sorted(key for key in losses if key not in ORDER)
    lines = ["| method | bits | seeds | final val loss per seed | mean | spread | 32-bit mean (same seeds) "
             "| Δ% of means | paired Δ% per seed | paired mean ± s.e. |", "|---|---|---|---|---|---|---|---|---|---|"]
    for key in keys:
        runs = losses[key]
        seeds = sorted(runs)
        mean = statistics.fmean(runs.values())
        spread = max(runs.values()) - min(runs.values())
        reference = losses.get(REFERENCE.get(key, ""), {})
        bits = bits_of(key) or 32
        if reference and bits != 32:
            d = difference(runs, reference)
            delta, paired, paired_mean, reference_text = d.delta, d.paired, d.paired_mean, f"{d.reference_mean:.4f}"
        else:
            delta = paired = paired_mean = reference_text = ""
        per_seed = ", ".join(f"{runs[s]:.4f}" for s in seeds)
        lines.append(f"| {labels[key]} | {bits} | {', '.join(map(str, seeds))} | {per_seed} | {mean:.4f} "
                     f"| {spread:.4f} | {reference_text} | {delta} | {paired} | {paired_mean} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.bench.lowbit_seeds", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inputs", nargs="+", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--title", default="")
    args = parser.parse_args(argv)
    losses, labels, commands = read_runs(args.inputs)
    text = ((f"{args.title}\n\n" if args.title else "") + "Commands: " + "; ".join(f"`{c}`" for c in commands)
            + "\n\n" + seeds_table(losses, labels))
    peers = peer_table(losses, labels)
    if peers:
        text += "\nThe library against the peer, paired by seed:\n\n" + peers
    write_text(args.out, text)
    print(text)


if __name__ == "__main__":
    main()
