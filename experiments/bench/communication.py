"""What the optimizers send over the network, measured on one LLaMA decoder layer.

    python -m experiments.bench.communication                      # FSDP2: llama_1b, 2 gloo processes
    python -m experiments.bench.communication --model_config llama_micro --world_size 2
    python -m experiments.bench.communication --backward_projection   # DDP vs backward projection
    python -m experiments.bench.communication --backward_projection --model_config llama_micro

FSDP2 (the default):

One decoder layer of ``--model_config`` is sharded by ``fully_shard`` with
:func:`lowrank_optim.sharding.projection_shard_placement`; random gradients are set and
``DCTProjAdam`` (default rank 1/4) and ``GaLoreAdamW`` (same rank, attn+mlp weights) each take a
refresh step and an ordinary step. Every collective the optimizers issue goes through
:class:`lowrank_optim.sharding.Sharding`; they are counted here through torch's dispatcher
(:class:`CollectiveTraffic`, a ``TorchDispatchMode`` around each step: calls and payload bytes
per rank), with nothing of the library patched. FSDP2's own traffic (all-gather of the parameters and
reduce-scatter of the gradients) is the same for every optimizer and listed for scale.

``--backward_projection``: DDP all-reduces every gradient in full each step. Under
``backward_projection=True`` with a ``process_group`` the optimizer all-reduces, once per step, the
projected accumulators (``m×r``) of its projected weights, the full gradients of the weights whose
staggered refresh is due and the plain gradients (``optimizer.communicated_bytes``, the payload
entering the collectives, per rank). One process (gloo, world size 1) runs ``--steps`` steps of one
decoder layer on random inputs with ``update_proj_gap = --gap`` (rank: ``--rank`` of the
smallest side, 512 for llama_1b); the payload does not depend on the world size.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections import Counter

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.fsdp import fully_shard
from torch.utils._python_dispatch import TorchDispatchMode

from experiments.model import DecoderLayer, LlamaConfig
from experiments.model_factory import config_path
from lowrank_optim import DCTProjAdam, GaLoreAdamW, lowrank_param_groups
from lowrank_optim.sharding import projection_shard_placement

COLLECTIVES = {"c10d.allreduce_.default": "all-reduce", "c10d.broadcast_.default": "broadcast",
               "_c10d_functional.all_gather_into_tensor.default": "all-gather"}
NOT_COLLECTIVES = {"_c10d_functional.wait_tensor.default", "_c10d_functional._wrap_tensor_autograd.default"}


class CollectiveTraffic(TorchDispatchMode):
    """The collectives issued inside it, seen through torch's dispatcher (c10d's in-place
    collectives and the functional ones DTensor uses): ``traffic[(kind, "calls" | "bytes")]``,
    the payload per rank (an all-gather's is the whole gathered tensor). A collective of another
    kind is counted under its operator name."""

    def __init__(self) -> None:
        super().__init__()
        self.traffic: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if func.namespace in ("c10d", "_c10d_functional") and name not in NOT_COLLECTIVES:
            kind = COLLECTIVES.get(name, name)
            tensors = args[0] if isinstance(args[0], (list, tuple)) else [args[0]]
            payload = sum(t.numel() * t.element_size() for t in tensors)
            self.traffic[(kind, "calls")] += 1
            self.traffic[(kind, "bytes")] += payload * (args[1] if kind == "all-gather" else 1)
        return func(*args, **(kwargs or {}))


def _rank(layer, rank_fraction: float) -> int:
    """GaLore's integer rank: ``rank_fraction`` of the smallest side of the layer's weights."""
    return int(rank_fraction * min(min(p.shape) for p in layer.parameters() if p.ndim == 2))


def _optimizers(layer, rank_fraction: float):
    weights = [p for p in layer.parameters() if p.ndim == 2]
    rank = _rank(layer, rank_fraction)
    rest = [p for p in layer.parameters() if p.ndim != 2]
    return {
        "DCTProjAdam (defaults)": lambda: DCTProjAdam(layer.parameters(), rank=rank_fraction),
        "DCTProjAdam residual=none": lambda: DCTProjAdam(layer.parameters(), rank=rank_fraction, residual="none"),
        f"GaLoreAdamW (rank {rank})": lambda: GaLoreAdamW([{"params": weights, "rank": rank}, {"params": rest}]),
    }


def _worker(rank: int, world_size: int, rendezvous: str, model_config: str, rank_fraction: float, out: str) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world_size))
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world_size)
    values = json.loads(config_path(model_config).read_text())
    config = LlamaConfig.from_dict({**values, "vocab_size": values.get("vocab_size") or 256})
    torch.manual_seed(0)
    layer = fully_shard(DecoderLayer(config), shard_placement_fn=projection_shard_placement(world_size))
    traffic_by_optimizer = {}
    for label, build in _optimizers(layer, rank_fraction).items():
        optimizer = build()
        for kind in ("refresh step", "ordinary step"):
            for param in layer.parameters():
                param.grad = torch.randn_like(param)
            with CollectiveTraffic() as counted:
                optimizer.step()
            traffic_by_optimizer[f"{label}: {kind}"] = {f"{op} {unit}": n for (op, unit), n in counted.traffic.items()}
    fsdp_bytes = sum(p.numel() * p.element_size() for p in layer.parameters()) * (world_size - 1) // world_size
    if rank == 0:
        with open(out, "w") as file:
            json.dump({"optimizers": traffic_by_optimizer, "fsdp_per_step_each_way_bytes": fsdp_bytes,
                       "weights": {n: list(p.shape) for n, p in layer.named_parameters() if p.ndim == 2},
                       "placements": {n: str(p.placements) for n, p in layer.named_parameters() if p.ndim == 2}},
                      file, indent=2)
    dist.barrier()
    dist.destroy_process_group()


def measure(model_config: str, world_size: int, rank_fraction: float) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "traffic.json")
        mp.spawn(_worker, args=(world_size, os.path.join(folder, "rendezvous"), model_config, rank_fraction, out),
                 nprocs=world_size, join=True)
        with open(out) as file:
            return json.load(file)


def report(result: dict) -> str:
    lines = ["| optimizer: step | collectives the optimizer issues (payload per rank; an all-gather's payload "
             "is the whole matrix) |", "|---|---|"]
    for label, traffic in result["optimizers"].items():
        operators = [key.removesuffix(" calls") for key in traffic if key.endswith(" calls")]
        parts = [f"{traffic[f'{op} calls']} {op} of {traffic[f'{op} bytes']:,} B" for op in operators]
        lines.append(f"| {label} | {'; '.join(parts) or 'none'} |")
    lines.append(f"\nFSDP2 itself, every step and any optimizer: all-gather of the parameters and reduce-scatter "
                 f"of the gradients, each {result['fsdp_per_step_each_way_bytes']:,} B received/sent per rank.")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ backward projection
def _backward_optimizers(layer, rank_fraction: float, gap: int) -> dict:
    rank = _rank(layer, rank_fraction)
    groups = lambda: lowrank_param_groups(layer, target_modules=("attn", "mlp"), rank=rank, update_proj_gap=gap)
    common = dict(backward_projection=True, process_group=dist.group.WORLD)
    return {"DCTProjAdam": lambda: DCTProjAdam(groups(), residual="none", **common),
            "GaLoreAdamW": lambda: GaLoreAdamW(groups(), **common)}


def measure_backward_projection(model_config: str, rank_fraction: float, gap: int, steps: int,
                                tokens: int) -> list[dict]:
    """DDP's payload per step (every gradient) against the optimizers' under backward projection."""
    values = json.loads(config_path(model_config).read_text())
    config = LlamaConfig.from_dict({**values, "vocab_size": values.get("vocab_size") or 256})
    rows = []
    for name in ("DCTProjAdam", "GaLoreAdamW"):
        torch.manual_seed(0)
        layer = DecoderLayer(config)                # a fresh layer: one optimizer hooks its parameters
        full = sum(p.numel() * p.element_size() for p in layer.parameters())
        optimizer = _backward_optimizers(layer, rank_fraction, gap)[name]()
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


def backward_projection(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as folder:
        os.environ.setdefault("OMP_NUM_THREADS", "2")
        dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=0, world_size=1)
        try:
            rows = measure_backward_projection(args.model_config, args.rank, args.gap, args.steps, args.tokens)
        finally:
            dist.destroy_process_group()
    print(f"One {args.model_config} decoder layer, rank {args.rank} × the smallest side, update_proj_gap "
          f"{args.gap}, {args.steps} steps; payload per rank per step\n")
    print("| optimizer | DDP (every gradient, full) | first step | later steps: min / mean / max "
          "| later ÷ DDP (mean) |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['optimizer']} | {row['ddp_bytes']:,} B | {row['first_step']:,} B | {row['min_later']:,} / "
              f"{row['mean_later']:,.0f} / {row['max_later']:,} B | {row['mean_later'] / row['ddp_bytes']:.3f} |")


# ------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.bench.communication", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_config", default="llama_1b")
    parser.add_argument("--rank", type=float, default=0.25, help="rank as a fraction of the smaller side")
    parser.add_argument("--world_size", type=int, default=2, help="FSDP2: processes")
    parser.add_argument("--backward_projection", action="store_true",
                        help="measure DDP against backward projection instead of FSDP2")
    parser.add_argument("--gap", type=int, default=200, help="--backward_projection: update_proj_gap")
    parser.add_argument("--steps", type=int, default=8, help="--backward_projection: steps")
    parser.add_argument("--tokens", type=int, default=16, help="--backward_projection: tokens per step")
    args = parser.parse_args(argv)
    if args.backward_projection:
        backward_projection(args)
        return
    result = measure(args.model_config, args.world_size, args.rank)
    print(json.dumps({"weights": result["weights"], "placements": result["placements"]}, indent=1))
    print(report(result))


if __name__ == "__main__":
    main()
