"""Optimizer-step time and optimizer-state bytes for one weight, side by side in one run.

    python -m experiments.bench.optimizer_step                       # 4096×1024 fp32, rank 256
    python -m experiments.bench.optimizer_step --shape 2048 5461 --rank 512 --device cuda

Refresh steps (a new subspace every step: ``update_proj_gap=1``) and ordinary steps (subspace
fixed) are timed separately, each as the median of ``--repeats`` steps after three warm-up steps, with
a device synchronisation around every step; the candidates' steps are interleaved round by round.
Ratios are taken within this run only.

Low-bit rows: DCTProjAdam and GaLoreAdamW with ``moment_bits`` 8 and 4 next to their float rows, and
the library's plain AdamW path with 8-/4-bit moments (registered ``adamw8bit``/``adamw4bit``);
``GaLoreAdamW(projector="randomized_svd")`` refresh next to the full-SVD one; ``--torchao`` adds
torchao's ``AdamW8bit``/``AdamW4bit`` (off by default: their compiled step needs seconds to build).
APOLLO (``APOLLOAdamW`` at ``--rank``, channel scaling; ``proj="dct"`` too) and APOLLO-Mini (rank 1, tensor
scaling), each also with ``basis="generated"`` (``P`` drawn at every step, not cached), next to
apollo-torch's APOLLO and APOLLO-Mini (peers, when installed). ``--only`` keeps the rows
whose label contains one of its words (torch's default and fused AdamW, the ratios' bases, always run).
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
import warnings

import torch

from experiments import methods
from experiments.bench.common import device_label, synchronize
from experiments.errors import UsageError
from lowrank_optim import create_optimizer, optimizer_state_bytes
from lowrank_optim.registry import optimizer_info

BASELINE = "torch.optim.AdamW (default)"
FUSED = "torch.optim.AdamW (fused)"            # the strongest baseline: a second ratio column
PEERS = ("galore_torch", "apollo_torch")


def _label(name: str, kwargs: dict) -> str:
    return ", ".join([optimizer_info(name).label, *(f"{key}={value}" for key, value in kwargs.items())])


def _projected(name: str, rank: int, gap: int, kwargs: dict):
    """``factory(param)``: the registered optimizer ``name`` projecting ``param`` at ``rank``."""
    return lambda p: create_optimizer(name, [{"params": [p], "rank": rank, "update_proj_gap": gap}], **kwargs)


def _candidates(rank: int, torchao: bool = False):
    """(label, kind, factory) with kind 'refresh' or 'ordinary'; factory(param) -> optimizer."""
    def galore_torch(gap):
        from galore_torch import GaLoreAdamW as PeerGaLore

        warnings.filterwarnings("ignore", category=FutureWarning)
        return lambda p: PeerGaLore(
            [{"params": [p], "rank": rank, "update_proj_gap": gap, "scale": 1.0, "proj_type": "std"}]
        )

    rows = [
        (BASELINE, "ordinary", lambda p: torch.optim.AdamW([p])),
        ("torch.optim.AdamW (foreach)", "ordinary", lambda p: torch.optim.AdamW([p], foreach=True)),
        ("torch.optim.AdamW (fused)", "ordinary", lambda p: torch.optim.AdamW([p], fused=True)),
        # The library's plain AdamW path (DCTProjAdam projecting nothing) with low-bit moments.
        *((optimizer_info(name).label, "ordinary", lambda p, n=name: create_optimizer(n, [p]))
          for name in ("adamw8bit", "adamw4bit")),
    ]
    if torchao:  # opt-in: torchao's step is torch.compile'd (seconds of compilation before timing)
        try:
            import torchao.optim

            rows += [(f"torchao.optim.AdamW{bits}bit", "ordinary",
                      lambda p, b=bits: getattr(torchao.optim, f"AdamW{b}bit")([p])) for bits in (8, 4)]
        except ImportError:
            print("torchao not installed: low-bit peer baseline skipped", file=sys.stderr)
    for kind, gap in (("refresh", 1), ("ordinary", 10**9)):
        variants = [("dct_adamw", {}), *(("dct_adamw", {"moment_bits": bits}) for bits in (8, 4)),
                    ("dct_adamw", {"residual": "none"}),
                    ("galore_adamw", {}), *(("galore_adamw", {"moment_bits": bits}) for bits in (8, 4))]
        if kind == "refresh":  # randomized SVD refresh next to the full-SVD one
            variants.append(("galore_adamw", {"projector": "randomized_svd"}))
        rows += [(_label(name, kwargs), kind, _projected(name, rank, gap, kwargs)) for name, kwargs in variants]
        try:
            rows.append(("galore_torch.GaLoreAdamW", kind, galore_torch(gap)))
        except ImportError:
            print("galore_torch not installed: peer baseline skipped", file=sys.stderr)
        apollo = [("apollo_adamw", rank, {}), ("apollo_adamw", rank, {"basis": "generated"}),
                  ("apollo_adamw", rank, {"proj": "dct"}), ("apollo_mini", 1, {}),
                  ("apollo_mini", 1, {"basis": "generated"})]
        rows += [(_label(name, kwargs), kind, _projected(name, r, gap, kwargs)) for name, r, kwargs in apollo]
        try:
            rows += [(f"apollo_torch APOLLO{suffix}", kind, _apollo_torch(name, rank, gap))
                     for suffix, name in (("", "apollo_torch_adamw"), ("-Mini", "apollo_torch_mini"))]
        except UsageError:
            print("apollo-torch not installed: peer baseline skipped", file=sys.stderr)
    return rows


def _apollo_torch(name: str, rank: int, gap: int):
    """``factory(param)``: apollo-torch's APOLLO (``rank``, channel) or APOLLO-Mini (rank 1, tensor) on ``param``,
    built as the training script's peers are (experiments.methods; its module alone, without bitsandbytes)."""
    methods._apollo_torch_module()         # raises UsageError when apollo-torch is not installed
    return lambda p: methods.create_optimizer(name, [{"params": [p], "rank": rank, "update_proj_gap": gap,
                                                      "proj_type": "std"}])


def _interleaved_medians(optimizers: list, device: str, repeats: int) -> list[float]:
    """Median seconds per step of each optimizer, the steps of all optimizers interleaved (one step
    of each per round) so that machine drift and order effects hit every candidate alike."""
    for optimizer in optimizers:
        for _ in range(3):  # warm-up: state allocation, first selection, thread pool
            optimizer.step()
    times: list[list[float]] = [[] for _ in optimizers]
    for _ in range(repeats):
        for optimizer, samples in zip(optimizers, times):
            synchronize(device)
            start = time.perf_counter()
            optimizer.step()
            synchronize(device)
            samples.append(time.perf_counter() - start)
    return [statistics.median(samples) for samples in times]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.bench.optimizer_step", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=2, default=[4096, 1024])
    parser.add_argument("--rank", type=int, default=256)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--csv", default=None, help="also write the rows to this CSV file")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--only", nargs="+", default=None, metavar="WORD",
                        help="keep the rows whose label contains one of these words (default: every row)")
    parser.add_argument("--torchao", action="store_true",
                        help="also time torchao.optim.AdamW8bit / AdamW4bit (compiled; peer baselines)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    dtype = getattr(torch, args.dtype)
    generator = torch.Generator(device=args.device).manual_seed(0)
    candidates = [row for row in _candidates(args.rank, args.torchao)
                  if not args.only or row[0] in (BASELINE, FUSED) or any(word in row[0] for word in args.only)]
    optimizers = []
    for _, _, factory in candidates:
        param = torch.nn.Parameter(torch.randn(args.shape, device=args.device, dtype=dtype, generator=generator))
        param.grad = torch.randn(args.shape, device=args.device, dtype=dtype, generator=generator)
        optimizers.append(factory(param))
    seconds = _interleaved_medians(optimizers, args.device, args.repeats)
    rows = [
        # the peers keep Python projector objects in their state: not counted
        dict(optimizer=label, step=kind, ms=s * 1e3,
             state_bytes=None if label.startswith(PEERS) else optimizer_state_bytes(optimizer))
        for (label, kind, _), optimizer, s in zip(candidates, optimizers, seconds)
    ]

    adamw_ms = next(r["ms"] for r in rows if r["optimizer"] == BASELINE)
    fused_ms = next(r["ms"] for r in rows if r["optimizer"] == FUSED)
    svd_refresh_ms = next((r["ms"] for r in rows if r["optimizer"] == "GaLoreAdamW" and r["step"] == "refresh"), None)
    device = device_label(args.device)
    print(f"\n{args.shape[0]}×{args.shape[1]} {args.dtype}, rank {args.rank}, {device}, torch {torch.__version__}\n")
    print("| optimizer | step | ms | × AdamW (default) | × AdamW (fused) | GaLoreAdamW refresh ÷ this | state bytes |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        speedup = f"{svd_refresh_ms / r['ms']:.1f}" if r["step"] == "refresh" and svd_refresh_ms else ""
        state = "" if r["state_bytes"] is None else f"{r['state_bytes']:,}"
        print(f"| {r['optimizer']} | {r['step']} | {r['ms']:.1f} | {r['ms'] / adamw_ms:.2f} | {r['ms'] / fused_ms:.2f} "
              f"| {speedup} | {state} |")
    if args.csv:
        with open(args.csv, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["device", *rows[0]])
            writer.writeheader()
            writer.writerows({"device": device, **r} for r in rows)


if __name__ == "__main__":
    main()
