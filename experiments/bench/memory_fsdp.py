"""Per-rank peak memory of a training step under FSDP2, side by side with torch AdamW.

    python -m experiments.bench.memory_fsdp                       # LLaMA-130M fp32, every configuration
    python -m experiments.bench.memory_fsdp --configs adamw_fused dct_8bit_sib

No ``torchrun``: each configuration spawns ``--world_size`` (2) fresh CPU processes joined by a
``gloo`` process group (file rendezvous). Every rank builds the repo's LLaMA (random
initialisation, the same seed on every rank, built directly in ``--dtype``) and shards it as
``experiments.pretrain --fsdp`` does (:func:`experiments.distributed.shard_model`: ``fully_shard``
each decoder layer, then the root, with :func:`lowrank_optim.sharding.projection_shard_placement`),
then builds the optimizer over the sharded parameters (GaLore's recipe groups, as in
:mod:`experiments.bench.memory_worker`, rank ``--rank`` on the attention and MLP linears,
``update_proj_gap=200``). Each rank trains on its own random batch of ``--batch``×``--seq`` tokens.

Measurement, per rank (CPU RSS, as the single-process benchmark): before the model is built, a
warm-up of the same optimizer on a one-layer LLaMA sharded the same way (three steps) loads the
lazily loaded code of FSDP2, gloo and the optimizer; the **baseline** is the rank's RSS after it.
Then one warm-up step of the real model (subspace creation and state allocation; GaLore's SVD),
the peak reset (``VmHWM`` through ``/proc/self/clear_refs``, checked at start-up), and one
measured step ``loss.backward(); opt.step(); opt.zero_grad()`` (an ordinary step: no refresh at
gap 200), its peak the max of its forward+backward and ``opt.step()`` phases, each reset before.
The ranks run with ``MALLOC_MMAP_THRESHOLD_`` fixed (``--malloc_mmap_threshold``, default 64 KiB)
so that glibc's dynamic threshold does not keep freed transients resident.

Writes ``results.md`` and ``results.json`` to ``--out`` (default
``experiments/results/memory_fsdp_cpu``): per rank the peak, the ratio to the reference's
(torch AdamW, fused if it runs on CPU DTensors, else foreach) peak on the same rank, and the same
ratio above each run's baseline.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor

from experiments.bench.common import REPO, command_line, git_head, library_dirty, library_hash, load_average, machine
from experiments.bench.memory_worker import (
    DTYPES,
    OPTIMIZERS,
    Meter,
    build_optimizer,
    measured_forward_backward,
    training_step,
)
from experiments.distributed import DistributedContext, shard_model
from experiments.model_factory import build_model, read_model_config
from lowrank_optim import optimizer_state_bytes
from lowrank_optim.gradient_stand_ins import GradientStandIn
from lowrank_optim.state_bytes import tensor_bytes

MIB = 2**20
GAP = 200
DEFAULT_CONFIGS = ("adamw_fused", "adamw_foreach", "galore", "dct", "dct_8bit", "dct_8bit_sib",
                   "apollo_mini_8bit_sib")
REFERENCES = ("adamw_fused", "adamw_foreach")   # the first that ran is the ratios' reference


# ------------------------------------------------------------------------------------------ rank
def _sharded_llama(config, dtype: torch.dtype, context: DistributedContext, checkpointing: bool):
    from experiments.model import Llama, LlamaConfig

    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = Llama(config) if isinstance(config, LlamaConfig) else config()
    finally:
        torch.set_default_dtype(default_dtype)
    model.activation_checkpointing = checkpointing
    return shard_model(model, context)


def _warm_up(args, context: DistributedContext, dtype: torch.dtype) -> None:
    """Three steps of the same optimizer on a sharded one-layer LLaMA (width 512, MLP 1536, rank 32, gap 2:
    rows per rank multiples of 256, so that quantized moments' default blocks split whole)."""
    from experiments.model import LlamaConfig

    model = _sharded_llama(LlamaConfig(vocab_size=512, hidden_size=512, intermediate_size=1536, num_hidden_layers=1,
                                       num_attention_heads=2), dtype, context, OPTIMIZERS[args.config].checkpointing)
    tokens = torch.randint(0, 512, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimizer, _ = build_optimizer(model, args.config, 32, 2, **_overrides(args))
    for _ in range(3):
        training_step(model, optimizer, tokens[:, :-1], tokens[:, 1:])
    del model, optimizer, tokens
    gc.collect()


def _overrides(args) -> dict:
    spec = OPTIMIZERS[args.config]
    return {"moment_block_size": args.moment_block_size} if spec.projected and spec.bits and \
        args.moment_block_size else {}


def _rank_main(rank: int, args, rendezvous: str, out_dir: str) -> None:
    try:
        torch.set_num_threads(args.threads)
        dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=args.world_size)
        context = DistributedContext(rank=rank, local_rank=rank, world_size=args.world_size,
                                     device=torch.device("cpu"))
        result = _measure(args, context)
        dist.barrier()
        dist.destroy_process_group()
    except Exception:                       # noqa: BLE001  the driver reports it per configuration
        result = {"error": traceback.format_exc()[-4000:]}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result), encoding="utf-8")


def _measure(args, context: DistributedContext) -> dict:
    meter = Meter(torch.device("cpu"))
    dtype = DTYPES[args.dtype]
    spec = OPTIMIZERS[args.config]
    _warm_up(args, context, dtype)
    meter.reset_peak()
    baseline = meter.current()

    torch.manual_seed(args.seed)            # the same initialisation on every rank
    vocab_size = read_model_config(args.model).get("vocab_size") or args.vocab_size
    model = _sharded_llama(lambda: build_model(args.model, "native", vocab_size), dtype, context, spec.checkpointing)
    gc.collect()
    if any(t.dtype != dtype for t in [*model.parameters(), *model.buffers()]):
        raise AssertionError(f"model not entirely in {dtype}")
    generator = torch.Generator().manual_seed(args.seed + 1 + context.rank)   # each rank its own batch
    tokens = torch.randint(0, model.config.vocab_size, (args.batch, args.seq + 1), generator=generator)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimizer, projected = build_optimizer(model, args.config, args.rank, GAP, **_overrides(args))
    params = list(model.parameters())
    local_weights = tensor_bytes([p.to_local() for p in params])
    build_peak = meter.peak()

    started = time.perf_counter()
    training_step(model, optimizer, inputs, labels)           # warm-up step: state, subspaces
    warm_step_seconds = time.perf_counter() - started
    gc.collect()

    resident_before = meter.current()
    started = time.perf_counter()
    meter.reset_peak()
    loss = measured_forward_backward(model, inputs, labels)
    peak_forward_backward = meter.peak()
    local_grads = [p.grad._local_tensor if isinstance(p.grad, DTensor) else p.grad for p in params]
    grad_bytes = tensor_bytes([g for g in local_grads if g is not None and not isinstance(g, GradientStandIn)])
    del local_grads
    meter.reset_peak()
    optimizer.step()
    peak_step = meter.peak()
    optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - started
    state = optimizer_state_bytes(optimizer)
    peak = max(peak_forward_backward, peak_step)
    print(f"[{args.config} rank {context.rank}] peak {peak / MIB:.0f} MiB (baseline {baseline / MIB:.0f}), "
          f"loss {loss:.3f}, {seconds:.1f} s", file=sys.stderr, flush=True)
    return {
        "rank": context.rank, "baseline": baseline, "resident_before": resident_before, "build_peak": build_peak,
        "peak_forward_backward": peak_forward_backward, "peak_step": peak_step, "peak": peak,
        "weights": local_weights, "grad_bytes_after_backward": grad_bytes, "state_bytes": state,
        "loss": loss, "warm_step_seconds": warm_step_seconds, "step_seconds": seconds,
        "peak_method": meter.method, "peak_reset_verified": meter.reset_verified,
        "parameters": sum(p.numel() for p in params), "projected_weights": len(projected),
        "placements": sorted({str(p.placements) for p in params}),
    }


# ------------------------------------------------------------------------------------------ driver
def run_config(args, key: str) -> dict:
    """``--world_size`` fresh processes for configuration ``key``: {"ranks": [...]} or {"error": ...}."""
    config = argparse.Namespace(**vars(args), config=key)
    if args.malloc_mmap_threshold:      # inherited by the spawned interpreters (read by glibc at start-up)
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"memory_fsdp_{key}_") as work:
        try:
            mp.spawn(_rank_main, args=(config, str(Path(work, "rendezvous")), work), nprocs=args.world_size,
                     join=True)
        except Exception as error:      # noqa: BLE001  a rank died without writing its result
            return {"error": f"{type(error).__name__}: {error}"[-4000:]}
        ranks = [json.loads(Path(work, f"rank{rank}.json").read_text(encoding="utf-8"))
                 for rank in range(args.world_size)]
    errors = [r["error"] for r in ranks if "error" in r]
    if errors:
        return {"error": errors[0]}
    return {"ranks": ranks, "seconds": time.perf_counter() - started}


def derive(results: dict) -> tuple[str | None, dict]:
    """The reference's key and {key: {"ratios": [per rank], "above_baseline": [per rank]}}."""
    reference = next((key for key in REFERENCES if "ranks" in results.get(key, {})), None)
    derived = {}
    for key, result in results.items():
        if "ranks" not in result or reference is None:
            continue
        ref = results[reference]["ranks"]
        derived[key] = {
            "ratios": [r["peak"] / q["peak"] for r, q in zip(result["ranks"], ref)],
            "above_baseline": [(r["peak"] - r["baseline"]) / (q["peak"] - q["baseline"])
                               for r, q in zip(result["ranks"], ref)],
        }
    return reference, derived


def render(args, results: dict, reference: str | None, derived: dict, meta: dict) -> str:
    mib = lambda value: f"{value / MIB:.0f}"  # noqa: E731
    values = read_model_config(args.model)
    lines = [f"# Per-rank peak memory under FSDP2: {args.model} {args.dtype}, {args.world_size} gloo processes", "",
             f"Command: `{meta['command']}`  ", f"Device: {meta['device']}  ",
             f"Library: {meta['library']}  ", f"Date: {meta['date']}", "",
             f"Model: {args.model} (hidden {values['hidden_size']}, {values['num_hidden_layers']} layers), "
             f"{args.dtype} parameters, sharded by `experiments.distributed.shard_model` (FSDP2 `fully_shard` per "
             f"decoder layer and the root, `projection_shard_placement`). Batch {args.batch}×{args.seq} tokens per "
             f"rank. Projected optimizers: GaLore's groups, rank {args.rank} on the attention and MLP linears "
             "(APOLLO-Mini rank 1), `update_proj_gap=200`"
             + (f", `moment_block_size={args.moment_block_size}` for quantized moments" if args.moment_block_size
                else ", quantized moments with the default block size (256 values for 8 bits)") + ".", "",
             "Measured: one warm-up step of the model, then `VmHWM` reset and one training step "
             "(`loss.backward(); opt.step(); opt.zero_grad()`); peak = max of its forward+backward and "
             f"`opt.step()` peaks (each reset before), per rank. {meta['malloc_note']}. Baseline: the rank's RSS "
             "after a warm-up on a sharded one-layer LLaMA, before the model is built (interpreter, torch, "
             "gloo, FSDP2). Ratios are to "
             + (f"`{reference}` ({OPTIMIZERS[reference].label})" if reference else "nothing (no AdamW row ran)")
             + " on the same rank; \"above baseline\" divides peak − baseline by the reference's.", ""]
    header = ["configuration"]
    for rank in range(args.world_size):
        header += [f"rank {rank} peak MiB", f"rank {rank} × AdamW", f"rank {rank} above baseline × AdamW"]
    header += ["baseline MiB (per rank)", "weights MiB (per rank)", "state MiB (per rank)",
               "grads after backward MiB (per rank)"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key, result in results.items():
        label = f"`{key}` {OPTIMIZERS[key].label}"
        if "ranks" not in result:
            first = result["error"].strip().splitlines()[-1][:200].replace("|", "\\|")
            lines.append(f"| {label} | failed: {first} |" + " |" * (len(header) - 2))
            continue
        ranks, d = result["ranks"], derived.get(key)
        cells = [label]
        for index, r in enumerate(ranks):
            cells += [mib(r["peak"]), f"{d['ratios'][index]:.2f}" if d else "—",
                      f"{d['above_baseline'][index]:.2f}" if d else "—"]
        for field in ("baseline", "weights", "state_bytes", "grad_bytes_after_backward"):
            cells.append(" / ".join(mib(r[field]) for r in ranks))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Per-rank phases (MiB: forward+backward peak / `opt.step()` peak; seconds of the measured step):",
              ""]
    for key, result in results.items():
        if "ranks" in result:
            lines.append(f"* `{key}`: " + "; ".join(
                f"rank {r['rank']}: {mib(r['peak_forward_backward'])} / {mib(r['peak_step'])}, "
                f"{r['step_seconds']:.1f} s" for r in result["ranks"]))
    failed = [key for key, result in results.items() if "ranks" not in result]
    if failed:
        lines += ["", "Failures (last lines of the error):", ""]
        for key in failed:
            lines += [f"* `{key}`:", "", "```", *results[key]["error"].strip().splitlines()[-6:], "```"]
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m experiments.bench.memory_fsdp", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama_130m", help="a config name in experiments/configs or a JSON path")
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    parser.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS), choices=list(OPTIMIZERS))
    parser.add_argument("--rank", type=int, default=256)
    parser.add_argument("--moment_block_size", type=int, default=None,
                        help="quantized moments' block size (default: the library's, 256 values for 8 bits)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--vocab_size", type=int, default=32000, help="used when the config's vocab_size is null")
    parser.add_argument("--world_size", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--malloc_mmap_threshold", type=int, default=65536,
                        help="MALLOC_MMAP_THRESHOLD_ for the ranks (0: glibc's dynamic threshold)")
    parser.add_argument("--out", default=str(REPO / "experiments" / "results" / "memory_fsdp_cpu"))
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    results = {}
    for key in args.configs:
        results[key] = run_config(args, key)
        status = results[key].get("error", "").strip().splitlines()[-1:] if "error" in results[key] else \
            [", ".join(f"rank {r['rank']} {r['peak'] / MIB:.0f} MiB" for r in results[key]["ranks"])]
        print(f"{key}: {status[0] if status else 'failed'}", file=sys.stderr, flush=True)
    reference, derived = derive(results)
    meta = {"command": command_line("experiments.bench.memory_fsdp", argv),
            "device": f"CPU, {args.world_size} gloo processes ({args.threads} torch thread each); {machine()}; "
                      f"load average before: {load_average()}",
            "library": f"git {git_head()} (lowrank_optim hash {library_hash()}"
                       + f", uncommitted library changes: {library_dirty()}), torch {torch.__version__}",
            "date": datetime.date.today().isoformat(),
            "malloc_note": (f"Ranks run with MALLOC_MMAP_THRESHOLD_={args.malloc_mmap_threshold}"
                            if args.malloc_mmap_threshold else "glibc malloc defaults")}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(render(args, results, reference, derived, meta), encoding="utf-8")
    (out / "results.json").write_text(json.dumps({"args": vars(args), "meta": meta, "reference": reference,
                                                  "results": results, "derived": derived}, indent=1),
                                      encoding="utf-8")
    print(f"wrote {out / 'results.md'}", file=sys.stderr)
    return {"reference": reference, "results": results, "derived": derived}


if __name__ == "__main__":
    main()
