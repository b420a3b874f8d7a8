"""The activation estimate of :func:`experiments.bench.state_memory.checkpointed_activation_bytes`
against the CPU peak of small LLaMAs at 1×2048 tokens, one fresh worker process each.

    python -m experiments.bench.activation_check --out experiments/results/int8_activation_check.json

Each case runs ``python -m experiments.bench.memory_worker`` (``--config``: by default APOLLO-Mini 8-bit,
step in backward, activation checkpointing, bf16 weights; ``int8_apollo_mini_8bit_sib_ckpt`` adds int8
weights and the hook's fp32 ``ΔW``; 2 steps, one torch thread, ``MALLOC_MMAP_THRESHOLD_=65536``).
Its ``transients`` (peak − baseline − weights − gradients − state; gradients are 0 after a backward pass
that stepped every parameter in its hook) hold the activations and what the estimate leaves out: the
rotary buffers, the one gradient alive at the peak and the projector's cached ``P``. The predicted
transients are the estimate plus the buffers plus, when the layer branch sets the peak, the ``d×f``
gradient stepped in its hook (the logits branch peaks before any gradient exists).

Cases (``experiments/bench/configs``): ``act_logits`` (d 512, f 1376, 2 layers, 4 heads, vocabulary
32000: the loss's ``12·t·V`` sets the peak) and ``act_layer`` (d 1024, f 2752, 2 layers, 8 heads,
vocabulary 512: one recomputed layer sets it).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from experiments.bench.common import REPO
from experiments.bench.memory_worker import OPTIMIZERS
from experiments.bench.state_memory import checkpointed_activation_bytes
from experiments.model_factory import read_model_config

CASES = ("act_logits", "act_layer")
CONFIGS = ("apollo_mini_8bit_sib_ckpt", "int8_apollo_mini_8bit_sib_ckpt")
MB = 10**6


def run_case(name: str, key: str, seq: int, steps: int, work: Path) -> dict:
    config = REPO / "experiments" / "bench" / "configs" / f"{name}.json"
    out = work / f"{name}.json"
    command = [sys.executable, "-m", "experiments.bench.memory_worker", "--model", str(config), "--dtype", "bf16",
               "--optimizer", key, "--gap", "2", "--steps", str(steps), "--seq", str(seq), "--threads", "1",
               "--out", str(out)]
    env = dict(os.environ, PYTHONPATH=str(REPO), MALLOC_MMAP_THRESHOLD_="65536")
    subprocess.run(command, cwd=REPO, env=env, check=True, capture_output=True, text=True)
    result = json.loads(out.read_text(encoding="utf-8"))
    values = read_model_config(str(config))
    acts = checkpointed_activation_bytes(values, seq, int8_weights=OPTIMIZERS[key].int8_weights)
    d, f = values["hidden_size"], values["intermediate_size"]
    gradient = 2 * d * f if acts["layer"] > acts["logits"] else 0
    predicted = acts["peak"] + result["buffers"] + gradient
    measured = [s["components"]["transients"] for s in result["steps"]]
    return {"case": name, "values": values, "estimate": acts, "buffers": result["buffers"],
            "concurrent_gradient": gradient, "predicted_transients": predicted, "measured_transients": measured,
            "ratio": [m / predicted for m in measured], "peaks": [s["peak"] for s in result["steps"]],
            "baseline": result["baseline"], "weights": result["weights"],
            "state": [s["state_bytes"] for s in result["steps"]]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.bench.activation_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--config", default=CONFIGS[0], choices=CONFIGS)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="activation_check_") as work:
        for name in args.cases:      # one at a time
            row = run_case(name, args.config, args.seq, args.steps, Path(work))
            rows.append(row)
            est = row["estimate"]
            print(f"{name}: estimate {est['peak'] / MB:.1f} MB (checkpoints {est['checkpoints'] / MB:.1f}, logits "
                  f"{est['logits'] / MB:.1f}, layer {est['layer'] / MB:.1f}) + buffers {row['buffers'] / MB:.1f} + "
                  f"gradient {row['concurrent_gradient'] / MB:.1f} = predicted transients "
                  f"{row['predicted_transients'] / MB:.1f} MB; measured "
                  + ", ".join(f"{m / MB:.1f}" for m in row["measured_transients"])
                  + " MB (× " + ", ".join(f"{r:.3f}" for r in row["ratio"]) + ")", flush=True)
    if args.out is not None:
        payload = {"seq": args.seq, "config": args.config, "cases": rows}
        args.out.write_text(json.dumps(payload, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
