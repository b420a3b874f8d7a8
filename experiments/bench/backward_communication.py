"""What ``backward_projection=True`` all-reduces per step on a LLaMA decoder layer, against DDP.

    python -m experiments.bench.backward_communication                  # llama_1b layer, rank 512
    python -m experiments.bench.backward_communication --model_config llama_micro --rank 8

DDP all-reduces every gradient in full each step. Under ``backward_projection=True`` with a
``process_group`` the optimizer all-reduces, once per step, the projected accumulators (``m×r``)
of its projected weights, the full gradients of the weights whose staggered refresh is due and
the plain gradients (``optimizer.communicated_bytes``, the payload entering the collectives, per
rank). One process (gloo, world size 1) runs ``--steps`` steps of one decoder layer on random
inputs with ``update_proj_gap = --gap``; the payload does not depend on the world size.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile

import torch
import torch.distributed as dist

from experiments.model import DecoderLayer, LlamaConfig
from experiments.model_factory import config_path
from lowrank_optim import DCTProjAdam, GaLoreAdamW, lowrank_param_groups


def _optimizers(layer, rank: int, gap: int) -> dict:
    groups = lambda: lowrank_param_groups(layer, target_modules=("attn", "mlp"), rank=rank, update_proj_gap=gap)
    common = dict(backward_projection=True, process_group=dist.group.WORLD)
    return {"DCTProjAdam": lambda: DCTProjAdam(groups(), residual="none", **common),
            "GaLoreAdamW": lambda: GaLoreAdamW(groups(), **common)}


def measure(model_config: str, rank: int, gap: int, steps: int, tokens: int) -> list[dict]:
    values = json.loads(config_path(model_config).read_text())
    config = LlamaConfig.from_dict({**values, "vocab_size": values.get("vocab_size") or 256})
    rows = []
    for name in ("DCTProjAdam", "GaLoreAdamW"):
        torch.manual_seed(0)
        layer = DecoderLayer(config)                # a fresh layer: one optimizer hooks its parameters
        full = sum(p.numel() * p.element_size() for p in layer.parameters())
        optimizer = _optimizers(layer, rank, gap)[name]()
        sent = []
        for step in range(steps):
            x = torch.randn(1, tokens, config.hidden_size, generator=torch.Generator().manual_seed(step))
            layer(x).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
            sent.append(optimizer.communicated_bytes)
        rows.append({"optimizer": name, "ddp_bytes": full, "first_step": sent[0], "max_later": max(sent[1:]),
                     "min_later": min(sent[1:]), "mean_later": sum(sent[1:]) / len(sent[1:])})
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_config", default="llama_1b")
    parser.add_argument("--rank", type=int, default=512)
    parser.add_argument("--gap", type=int, default=200)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=16)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        os.environ.setdefault("OMP_NUM_THREADS", "2")
        dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=0, world_size=1)
        try:
            rows = measure(args.model_config, args.rank, args.gap, args.steps, args.tokens)
        finally:
            dist.destroy_process_group()
    print(f"One {args.model_config} decoder layer, rank {args.rank}, update_proj_gap {args.gap}, {args.steps} steps; "
          "payload per rank per step\n")
    print("| optimizer | DDP (every gradient, full) | first step | later steps: min / mean / max "
          "| later ÷ DDP (mean) |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['optimizer']} | {row['ddp_bytes']:,} B | {row['first_step']:,} B | {row['min_later']:,} / "
              f"{row['mean_later']:,.0f} / {row['max_later']:,} B | {row['mean_later'] / row['ddp_bytes']:.3f} |")


if __name__ == "__main__":
    main()
