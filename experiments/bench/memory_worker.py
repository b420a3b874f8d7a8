"""One configuration of ``python -m experiments.bench.memory``, in a process of its own.

    python -m experiments.bench.memory_worker --model llama_350m --dtype bf16 --optimizer dct_8bit_bp \\
        --rank 256 --gap 200 --steps 3 --out /tmp/dct_8bit_bp.json

Builds the repo's LLaMA (``experiments.model_factory``, ``--model_impl native``: no ``transformers``
import) with random initialisation (``int8_weights`` rows: then every ``nn.Linear`` but the head
stored in int8 by ``quantize_model_weights``, as ``--weight_bits 8`` does), one optimizer of
:data:`OPTIMIZERS`, and runs ``--steps`` training steps ``loss.backward(); opt.step();
opt.zero_grad()`` on one random token batch. Each step is measured in two phases, forward+backward
and ``opt.step()``, with the memory high-water mark reset before each phase:

* CPU: the kernel's peak resident set size ``VmHWM`` (``/proc/self/status``), reset by writing
  ``5`` to ``/proc/self/clear_refs``. The reset is checked at start-up (a 64 MiB buffer is touched,
  freed, the mark reset, and ``VmHWM`` must fall back); if the kernel does not support it the
  worker reports ``peak_method = "ru_maxrss"`` and only the whole-run peak is meaningful. (The
  reset also resets ``getrusage``'s ``ru_maxrss``, so the whole-run peak reported is the maximum
  of the phases: model and optimizer construction, then each phase of each step.)
* CUDA: ``torch.cuda.max_memory_allocated`` after ``torch.cuda.reset_peak_memory_stats``.

Accounting (same on both devices), per step:

* ``weights``: bytes of the parameters;
* ``gradients``: right after backward, the bytes of the ``.grad`` tensors alive plus the
  projected accumulators of backward projection (held by the ``ProjectedGradient`` stand-ins
  in ``.grad``);
* ``state``: :func:`lowrank_optim.optimizer_state_bytes` after the step;
* ``baseline``: memory of the process before the model is built (interpreter, torch, libraries,
  after a warm-up of the same optimizer on a one-layer model that loads the lazily loaded code;
  0 on CUDA);
* ``transients = peak − baseline − weights − gradients − state``: activations, temporaries of the
  step, caches outside the state (the DCT matrices, rotary tables), allocator slack.

The result is one JSON object (``--out``, else printed on the last line of stdout).
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import re
import resource
import sys
import time
import warnings
from dataclasses import dataclass

import torch

from experiments.model_factory import build_model, read_model_config
from lowrank_optim import create_optimizer, lowrank_param_groups, optimizer_state_bytes
from lowrank_optim.backward_projection import stagger_offset
from lowrank_optim.gradient_stand_ins import GradientStandIn, ProjectedGradient
from lowrank_optim.registry import optimizer_info
from lowrank_optim.state_bytes import tensor_bytes
from lowrank_optim.weights import quantize_model_weights

TARGET_MODULES = ("attn", "mlp")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MIB = 2**20


@dataclass(frozen=True)
class OptimizerSpec:
    label: str
    optimizer: str              # the registry's name: "adamw" (torch.optim.AdamW), "galore_adamw", "dct_adamw",
                                # "apollo_adamw" or "apollo_mini"
    bits: int | None = None     # moment_bits
    backward: bool = False      # backward_projection (APOLLO refuses it: its update scales the full gradient)
    fused: bool = False         # torch AdamW: fused=True (else foreach=True)
    in_backward: bool = False   # step_in_backward (one backward pass per step; GaLore's and DCT's rows also set
                                # backward: their hooks project; APOLLO's hooks step with the full gradient)
    checkpointing: bool = False  # the model's activation checkpointing (layers recomputed in backward)
    rank: int | None = None     # the projected group's rank instead of the bench's --rank (APOLLO-Mini: 1)
    options: tuple[tuple[str, object], ...] = ()   # more constructor keywords of a projected optimizer
    int8_weights: bool = False  # every nn.Linear but the head stored in int8 (quantize_model_weights, as the
                                # training script's --weight_bits 8: after the model is built and cast, before
                                # the optimizer; codes + one scale per row, updated by stochastic rounding)

    @property
    def projected(self) -> bool:
        """Built over GaLore's param groups (``lowrank_param_groups``): the registry's projected optimizers,
        and those given a ``rank`` here (APOLLO-Mini, registered to take ``model.parameters()``: its own
        rule selects the same attention and MLP weights of a LLaMA, the embedding and head stay plain)."""
        return bool(optimizer_info(self.optimizer).projection_keys) or self.rank is not None

    @property
    def deferred(self) -> bool:
        """Backward projection stepped in ``opt.step()``: accumulators and staggered refreshes."""
        return self.backward and not self.in_backward


OPTIMIZERS: dict[str, OptimizerSpec] = {
    "adamw_foreach": OptimizerSpec("torch AdamW (foreach)", "adamw"),
    "adamw_fused": OptimizerSpec("torch AdamW (fused)", "adamw", fused=True),
    "galore": OptimizerSpec("GaLoreAdamW", "galore_adamw"),
    "galore_8bit": OptimizerSpec("GaLoreAdamW 8-bit", "galore_adamw", 8),
    "galore_bp": OptimizerSpec("GaLoreAdamW + backward projection", "galore_adamw", None, True),
    "galore_8bit_bp": OptimizerSpec("GaLoreAdamW 8-bit + backward projection", "galore_adamw", 8, True),
    "dct": OptimizerSpec("DCTProjAdam (residual scaled)", "dct_adamw"),
    "dct_8bit": OptimizerSpec("DCTProjAdam 8-bit (residual scaled)", "dct_adamw", 8),
    "dct_bp": OptimizerSpec("DCTProjAdam + backward projection (residual none)", "dct_adamw", None, True),
    "dct_8bit_bp": OptimizerSpec("DCTProjAdam 8-bit + backward projection (residual none)", "dct_adamw", 8, True),
    "adamw_fused_ckpt": OptimizerSpec("torch AdamW (fused) + activation checkpointing", "adamw", fused=True,
                                      checkpointing=True),
    "galore_sib": OptimizerSpec("GaLoreAdamW + step in backward", "galore_adamw", None, True, in_backward=True),
    "galore_8bit_sib": OptimizerSpec("GaLoreAdamW 8-bit + step in backward", "galore_adamw", 8, True, in_backward=True),
    "dct_sib": OptimizerSpec("DCTProjAdam + step in backward (residual scaled)", "dct_adamw", None, True,
                             in_backward=True),
    "dct_8bit_sib": OptimizerSpec("DCTProjAdam 8-bit + step in backward (residual scaled)", "dct_adamw", 8, True,
                                  in_backward=True),
    "galore_8bit_sib_ckpt": OptimizerSpec("GaLoreAdamW 8-bit + step in backward + activation checkpointing",
                                          "galore_adamw", 8, True, in_backward=True, checkpointing=True),
    "dct_8bit_sib_ckpt": OptimizerSpec("DCTProjAdam 8-bit + step in backward (residual scaled) + activation "
                                       "checkpointing", "dct_adamw", 8, True, in_backward=True, checkpointing=True),
    # APOLLO: no backward projection (refused); under step in backward each hook steps its weight with the
    # full gradient. APOLLO-Mini: rank 1, scale_type "tensor", scale 128 (its defaults), GaLore's groups.
    "apollo_8bit_sib": OptimizerSpec("APOLLO 8-bit + step in backward", "apollo_adamw", 8, in_backward=True),
    "apollo_8bit_sib_ckpt": OptimizerSpec("APOLLO 8-bit + step in backward + activation checkpointing",
                                          "apollo_adamw", 8, in_backward=True, checkpointing=True),
    "apollo_mini_8bit_sib": OptimizerSpec("APOLLO-Mini 8-bit + step in backward", "apollo_mini", 8,
                                          in_backward=True, rank=1),
    "apollo_mini_8bit_sib_ckpt": OptimizerSpec("APOLLO-Mini 8-bit + step in backward + activation checkpointing",
                                               "apollo_mini", 8, in_backward=True, checkpointing=True, rank=1),
    "apollo_8bit_sib_ckpt_gen": OptimizerSpec("APOLLO 8-bit + step in backward + activation checkpointing, "
                                              "basis='generated'", "apollo_adamw", 8, in_backward=True,
                                              checkpointing=True, options=(("basis", "generated"),)),
    # int8 weights (issue #23): the leanest runs of docs/int8-weights.md, each parameter stepped in its hook
    # with checkpointing; the embedding, head and norms stay bf16 (plain AdamW with the same moment bits)
    "int8_apollo_mini_8bit_sib_ckpt": OptimizerSpec("int8 weights + APOLLO-Mini 8-bit + step in backward + "
                                                    "activation checkpointing", "apollo_mini", 8, in_backward=True,
                                                    checkpointing=True, rank=1, int8_weights=True),
    "int8_apollo_mini_4bit_sib_ckpt": OptimizerSpec("int8 weights + APOLLO-Mini 4-bit + step in backward + "
                                                    "activation checkpointing", "apollo_mini", 4, in_backward=True,
                                                    checkpointing=True, rank=1, int8_weights=True),
    "int8_dct_8bit_sib_ckpt": OptimizerSpec("int8 weights + DCTProjAdam 8-bit + step in backward (residual scaled) + "
                                            "activation checkpointing", "dct_adamw", 8, True, in_backward=True,
                                            checkpointing=True, int8_weights=True),
}


# ------------------------------------------------------------------------------------------ memory
def _status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as handle:
        match = re.search(rf"^{field}:\s+(\d+) kB", handle.read(), re.MULTILINE)
    if match is None:
        raise OSError(f"/proc/self/status has no {field}")
    return int(match.group(1))


class Meter:
    """Current and peak memory of this process (CPU: RSS; CUDA: allocated bytes), peak resettable."""

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            self.method = "torch.cuda.max_memory_allocated"
            self.reset_verified = True
        else:
            self.method, self.reset_verified = self._check_clear_refs()

    @staticmethod
    def _check_clear_refs() -> tuple[str, bool]:
        """Whether writing 5 to /proc/self/clear_refs resets VmHWM here: touch 64 MiB, free it,
        reset; the mark must fall back below the buffer's peak."""
        try:
            buffer = torch.ones(64 * MIB // 4)
            high = _status_kib("VmHWM")
            del buffer
            with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
                handle.write("5")
            after = _status_kib("VmHWM")
        except OSError:
            return "ru_maxrss", False
        ok = high - after >= 48 * 1024
        return ("VmHWM (reset via /proc/self/clear_refs)" if ok else "ru_maxrss"), ok

    def current(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        return _status_kib("VmRSS") * 1024

    def reset_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.reset_verified:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
                handle.write("5")

    def peak(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        if self.reset_verified:
            return _status_kib("VmHWM") * 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024



# ------------------------------------------------------------------------------------------ setup
def build_optimizer(model: torch.nn.Module, key: str, rank: int, gap: int, **overrides):
    """The optimizer ``key`` over ``model`` (``overrides``: more constructor keywords of a projected
    one), and the parameters it projects (empty for torch AdamW)."""
    spec = OPTIMIZERS[key]
    if not spec.projected:
        kwargs = {"fused": True} if spec.fused else {"foreach": True}
        return create_optimizer(spec.optimizer, model.parameters(), lr=1e-3, **kwargs), []
    groups = lowrank_param_groups(model, target_modules=TARGET_MODULES, rank=spec.rank or rank, update_proj_gap=gap)
    projected = [param for _, param in groups[0]["params"]]
    kwargs = dict(lr=1e-3, moment_bits=spec.bits, backward_projection=spec.backward,
                  step_in_backward=spec.in_backward, **dict(spec.options), **overrides)
    if spec.deferred and spec.optimizer == "dct_adamw":
        kwargs["residual"] = "none"          # required with backward projection (the hooks free G)
    return create_optimizer(spec.optimizer, groups, **kwargs), projected


def expected_refreshing(step: int, count: int, gap: int, backward: bool) -> int:
    """Projected weights whose subspace is (re)computed at optimizer step ``step`` (1-based): all
    at the first; under backward projection weight ``j`` when ``(t + o_j) mod T = 0`` with ``t =
    step − 1`` (lowrank_optim.backward_projection), else all when ``t mod T = 0``."""
    t = step - 1
    if t == 0:
        return count
    if not backward:
        return count if t % gap == 0 else 0
    return sum((t + stagger_offset(j, count, gap)) % gap == 0 for j in range(count))


def accumulator_shapes(optimizer) -> list[tuple[int, int]]:
    """Shapes of the projected accumulators backward projection keeps (``m×r`` right, ``r×n``
    left), from ``projection_summary()`` (nothing allocated)."""
    shapes = []
    for row in optimizer.projection_summary():
        if row.projected:
            m, n = row.shape
            shapes.append((m, row.rank) if row.side == "right" else (row.rank, n))
    return shapes


# ------------------------------------------------------------------------------------------ run
def measured_forward_backward(model, inputs, labels) -> float:
    """Forward, next-token loss and backward of one measured step; the logits are freed before the
    backward (only what autograd saved stays); returns the loss."""
    logits = model(inputs)
    loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
    del logits
    loss.backward()
    return float(loss.detach())


def training_step(model, optimizer, inputs, labels) -> None:
    logits = model(inputs)
    torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten()).backward()
    del logits
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def warm_up(args, device: torch.device, dtype: torch.dtype) -> None:
    """Three steps of the same optimizer on a one-layer LLaMA of the same head size (width 128,
    rank 32), so that the libraries' lazily loaded code, thread pools and caches are part of the
    baseline rather than of the first measured step's transients."""
    from experiments.model import Llama, LlamaConfig

    model = Llama(LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=352, num_hidden_layers=1,
                              num_attention_heads=2, max_position_embeddings=max(1024, args.seq))
                  ).to(device=device, dtype=dtype)
    model.activation_checkpointing = OPTIMIZERS[args.optimizer].checkpointing
    if OPTIMIZERS[args.optimizer].int8_weights:    # torchao's int8 weight and its linear loaded before the baseline
        quantize_model_weights(model)
    tokens = torch.randint(0, 512, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(1)).to(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimizer, _ = build_optimizer(model, args.optimizer, 32, 2)
    for _ in range(3):          # gap 2: a refresh, a projected step (hooks under backward projection), a refresh
        training_step(model, optimizer, tokens[:, :-1], tokens[:, 1:])
    del model, optimizer, tokens
    gc.collect()


def run(args) -> dict:
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    meter = Meter(device)
    dtype = DTYPES[args.dtype]
    started = time.perf_counter()
    if args.warm_up:
        warm_up(args, device, dtype)
    warm_up_seconds = time.perf_counter() - started
    warm_up_peak = meter.peak()             # since the process started: imports and warm-up
    torch.manual_seed(args.seed)
    meter.reset_peak()
    baseline = meter.current()
    dtype = DTYPES[args.dtype]
    spec = OPTIMIZERS[args.optimizer]

    started = time.perf_counter()
    # the config's own vocab_size; --vocab_size only where the file leaves it null
    vocab_size = read_model_config(args.model).get("vocab_size") or args.vocab_size
    # built directly in the training dtype (no fp32 copy of a bf16 model in the whole-run peak)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = build_model(args.model, "native", vocab_size)
    finally:
        torch.set_default_dtype(default_dtype)
    model = model.to(device=device, dtype=dtype)
    model.activation_checkpointing = spec.checkpointing
    if any(t.dtype != dtype for t in [*model.parameters(), *model.buffers()]):
        raise AssertionError(f"model not entirely in {dtype}")
    int8_weights = quantize_model_weights(model) if spec.int8_weights else []
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(args.seed)
    tokens = torch.randint(0, vocab, (args.batch, args.seq + 1), generator=generator).to(device)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimizer, projected = build_optimizer(model, args.optimizer, args.rank, args.gap)
    projected_ids = {id(p) for p in projected}
    params = list(model.parameters())
    weights = tensor_bytes(params)
    buffers = tensor_bytes(list(model.buffers()))
    build_seconds = time.perf_counter() - started
    expected_accumulators = 0
    if spec.deferred:       # stepping in the hooks keeps no accumulator
        itemsize = torch.empty((), dtype=dtype).element_size()
        expected_accumulators = sum(math.prod(shape) * itemsize for shape in accumulator_shapes(optimizer))

    build_peak = meter.peak()               # baseline + building the model and the optimizer
    steps = []
    for step in range(1, args.steps + 1):
        record = {"step": step}
        state_before = optimizer_state_bytes(optimizer)
        record["resident_before"] = meter.current()

        t0 = time.perf_counter()
        meter.reset_peak()
        record["loss"] = measured_forward_backward(model, inputs, labels)
        record["peak_forward_backward"] = meter.peak()
        t1 = time.perf_counter()

        holds_full = [p.grad is not None and not isinstance(p.grad, GradientStandIn) for p in params]
        full_grads = [p.grad for p, full in zip(params, holds_full) if full]
        accumulators = [p.grad.low_rank for p in params if isinstance(p.grad, ProjectedGradient)]
        record["grad_bytes"] = tensor_bytes(full_grads)
        record["accumulator_bytes"] = tensor_bytes(accumulators)
        record["full_projected_grads"] = sum(full and id(p) in projected_ids for p, full in zip(params, holds_full))
        record["expected_refreshing"] = (expected_refreshing(step, len(projected), args.gap, spec.deferred)
                                         if projected else 0)
        del full_grads, accumulators
        record["resident_after_backward"] = meter.current()

        meter.reset_peak()
        optimizer.step()
        record["peak_step"] = meter.peak()
        t2 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        record["resident_after_step"] = meter.current()
        record["seconds_forward_backward"] = t1 - t0
        record["seconds_step"] = t2 - t1

        state = optimizer_state_bytes(optimizer)
        gradients = record["grad_bytes"] + record["accumulator_bytes"]
        peak = max(record["peak_forward_backward"], record["peak_step"])
        record.update(
            peak=peak, state_bytes_before=state_before, state_bytes=state,
            components={"weights": weights, "gradients": gradients, "state": state,
                        "transients": peak - baseline - weights - gradients - state})
        steps.append(record)
        print(f"[{args.optimizer} {args.model} gap {args.gap}] step {step}: peak {peak / MIB:.0f} MiB, "
              f"{record['full_projected_grads']} full projected grads, "
              f"{t2 - t0:.1f} s", file=sys.stderr, flush=True)

    return {
        "optimizer": args.optimizer, "label": spec.label, "registry_name": spec.optimizer, "moment_bits": spec.bits,
        "backward_projection": spec.backward, "model": args.model, "dtype": args.dtype, "rank": args.rank,
        "update_proj_gap": args.gap, "batch": args.batch, "seq": args.seq, "device": str(device),
        "torch": torch.__version__, "peak_method": meter.method, "peak_reset_verified": meter.reset_verified,
        "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
        "threads": torch.get_num_threads(),
        "int8_weights": len(int8_weights),
        "parameters": sum(p.numel() for p in params), "projected_weights": len(projected),
        "projected_parameters": sum(p.numel() for p in projected),
        "baseline": baseline, "weights": weights, "buffers": buffers,
        "expected_accumulator_bytes": expected_accumulators,
        "state_bytes_summary": (optimizer.projection_summary().state_bytes if projected else None),
        "warm_up": args.warm_up, "warm_up_seconds": warm_up_seconds, "build_seconds": build_seconds,
        "steps": steps, "warm_up_peak": warm_up_peak, "build_peak": build_peak,
        # writing 5 to clear_refs also resets ru_maxrss, so the run's peak is the max of its phases
        "whole_run_peak": max([build_peak, *(record["peak"] for record in steps)]),
    }


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m experiments.bench.memory_worker", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a config name in experiments/configs or a JSON path")
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    parser.add_argument("--optimizer", required=True, choices=list(OPTIMIZERS))
    parser.add_argument("--rank", type=int, default=256)
    parser.add_argument("--gap", type=int, default=200, help="update_proj_gap")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--vocab_size", type=int, default=32000, help="used when the config's vocab_size is null")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    parser.add_argument("--no_warm_up", dest="warm_up", action="store_false",
                        help="skip the warm-up on a one-layer model before the baseline is read")
    parser.add_argument("--out", default=None, help="write the JSON result here (else: last line of stdout)")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    result = run(args)
    text = json.dumps(result)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            handle.write(text)
    else:
        print(text)


if __name__ == "__main__":
    main()
