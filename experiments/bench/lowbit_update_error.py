"""How far does a low-bit moment scheme move the update? Shadow moments on a float run's gradients.

    python -m experiments.bench.lowbit_update_error --optimizer galore_adamw --lr 3e-2 \
        --num_training_steps 1000 --schemes block:128:dyn,float float,block:128:sqrt ... --out DIR

A final validation loss moves by ±0.5–1% from one seed to the next on the tiny models, more than
the effects a 4-bit scheme has to be chosen by. This measures the scheme itself, without that noise:
the run trains with float moments, and every float moment carries one *shadow* pair ``(m̃, ṽ)`` per
scheme, stepped on the same (projected) gradient ``R`` as the real moments, stored after each step
as its quantize → dequantize round trip (:func:`experiments.bench.lowbit_ablation.fake`), remapped
or transformed with the real moments on a subspace change. Each step compares the scheme's update
``Ñ = (m̃/bc1)/(√(ṽ/bc2) + ε)`` with the float one ``N`` over every quantized tensor (the tensors
``moment_bits=4`` would quantize), projected and plain apart::

    relative error = ‖Ñ − N‖ / ‖N‖,        norm ratio = ‖Ñ‖ / ‖N‖        (sums over the tensors)

The shadows accumulate their own rounding (what a quantized run stores), while the trajectory stays
the float one: an open-loop error, the same gradients for every scheme. The run steps plain
parameters one tensor at a time (``foreach=False``: the multi-tensor path has no moments objects). A scheme is
``M_SCHEME,V_SCHEME`` with ``fake``'s scheme strings, ``float`` for a moment kept in float.

Writes ``results.md`` and ``results.json`` into ``--out``: the errors averaged over windows of steps.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch
from lowrank_optim.kernels.moment_update import adam_moment_update_
from lowrank_optim.kernels.slot_remap import remap_slots
from torch.optim.optimizer import register_optimizer_step_pre_hook

from experiments.bench.common import command_line, write_text
from experiments.bench.lowbit_ablation import add_simulation_flags, fake
from experiments.results.compare import base_config
from lowrank_optim.moments import base as moments_base
from lowrank_optim.moments.float_moments import FloatMoments
from lowrank_optim.quantization import moment_bits_for

WINDOWS = ((1, 100), (101, 300), (301, 600), (601, 1000), (1001, 10**9))


def parse_scheme(text: str) -> tuple[str | None, str | None]:
    m_scheme, v_scheme = text.split(",")
    return (None if m_scheme == "float" else m_scheme, None if v_scheme == "float" else v_scheme)


class ErrorLog:
    """Per step, per scheme, per kind (projected/plain): ``Σ‖Ñ − N‖²``, ``Σ‖Ñ‖²``, ``Σ‖N‖²``."""

    def __init__(self, schemes: list[str]):
        self.schemes = schemes
        self.step = 0
        self.sums: dict[tuple[int, str, str], list[float]] = {}

    def add(self, scheme: str, kind: str, shadow: torch.Tensor, normalized: torch.Tensor) -> None:
        sums = self.sums.setdefault((self.step, scheme, kind), [0.0, 0.0, 0.0])
        sums[0] += float((shadow - normalized).square().sum())
        sums[1] += float(shadow.square().sum())
        sums[2] += float(normalized.square().sum())

    def table(self) -> list[dict]:
        rows = []
        last = max((key[0] for key in self.sums), default=0)
        for scheme in self.schemes:
            for kind in ("projected", "plain"):
                for start, stop in WINDOWS:
                    if start > last:
                        break
                    steps = [self.sums[key] for key in self.sums
                             if key[1] == scheme and key[2] == kind and start <= key[0] <= stop]
                    if not steps:
                        continue
                    error = sum((s[0] / s[2]) ** 0.5 for s in steps) / len(steps)
                    ratio = sum((s[1] / s[2]) ** 0.5 for s in steps) / len(steps)
                    rows.append({"scheme": scheme, "kind": kind, "steps": f"{start}-{min(stop, last)}",
                                 "relative_error": error, "norm_ratio": ratio})
        return rows


class ShadowMoments(FloatMoments):
    """Float moments that step one shadow pair per scheme beside themselves (module doc)."""

    log: ErrorLog
    shadows: dict[int, dict[str, list[torch.Tensor]]]

    def _shadows(self) -> dict[str, list[torch.Tensor]]:
        exp_avg, _ = self._local()
        return self.shadows.setdefault(id(self.state), {
            scheme: [torch.zeros_like(exp_avg), torch.zeros_like(exp_avg)] for scheme in self.log.schemes})

    def step(self, backend, grad, *, beta1, beta2, eps, bias_correction1, bias_correction2, step, source_slots=None):
        shadows = self._shadows()
        if source_slots is not None:
            for pair in shadows.values():
                pair[:] = [remap_slots(moment, source_slots, self.layout) for moment in pair]
        normalized = super().step(backend, grad, beta1=beta1, beta2=beta2, eps=eps,
                                  bias_correction1=bias_correction1, bias_correction2=bias_correction2,
                                  step=step, source_slots=source_slots)
        kind = "plain" if self.layout == "flat" else "projected"
        for scheme, (exp_avg, exp_avg_sq) in shadows.items():
            shadow = adam_moment_update_(grad.float(), exp_avg, exp_avg_sq, beta1=beta1, beta2=beta2, eps=eps,
                                         bias_correction1=bias_correction1, bias_correction2=bias_correction2)
            self.log.add(scheme, kind, shadow, normalized.float())
            for moment, moment_scheme, signed in ((exp_avg, parse_scheme(scheme)[0], True),
                                                  (exp_avg_sq, parse_scheme(scheme)[1], False)):
                if moment_scheme is not None:
                    moment.copy_(fake(moment, moment_scheme, self.layout, signed))
        return normalized

    def zero_(self) -> None:
        super().zero_()
        for pair in self._shadows().values():
            for moment in pair:
                moment.zero_()

    def transform_(self, first, second) -> None:
        super().transform_(first, second)
        for pair in self._shadows().values():
            pair[:] = [first(pair[0]), second(pair[1])]


def install(log: ErrorLog) -> None:
    """Make the moments ``moment_bits=4`` would quantize :class:`ShadowMoments` (others stay float)."""
    original = moments_base.MomentSpec.of.__func__
    storage = type("Shadowed", (ShadowMoments,), {"log": log, "shadows": {}})

    def of(cls, shape, side, moment_bits, block_size=None):
        spec = original(cls, shape, side, None, block_size)
        if moment_bits_for(tuple(shape), 4) is None:
            return spec
        return dataclasses.replace(spec, storage=storage)

    moments_base.MomentSpec.of = classmethod(of)


class StepCounter:
    """Advances the log's step before each optimizer step (a pre-hook on ``Optimizer.step``)."""

    def __init__(self, log: ErrorLog):
        self.log = log

    def __call__(self, optimizer, args, kwargs) -> None:
        self.log.step += 1


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.bench.lowbit_update_error", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--schemes", nargs="+", required=True, help="M_SCHEME,V_SCHEME each (module doc)")
    add_simulation_flags(parser, "lowbit_update_error")
    args = parser.parse_args(argv)
    for scheme in args.schemes:
        parse_scheme(scheme)
    from experiments.pretrain import train

    log = ErrorLog(args.schemes)
    original_of = moments_base.MomentSpec.of
    install(log)
    handle = register_optimizer_step_pre_hook(StepCounter(log))
    name = f"{args.optimizer}-shadow-s{args.seed}"
    config = dataclasses.replace(base_config(args), optimizer=args.optimizer, lr=args.lr, run_name=name,
                                 save_dir=str(args.runs_dir / name), optimizer_kwargs={"foreach": False})
    try:
        result = train(config)
    finally:
        handle.remove()
        moments_base.MomentSpec.of = original_of
    write_results(log.table(), result.final_val_loss, args.out,
                  command_line("experiments.bench.lowbit_update_error", argv))


def write_results(rows: list[dict], final_val_loss: float, out: Path, command: str) -> None:
    lines = [f"`{command}`", "", f"float run's final validation loss: {final_val_loss:.4f}", "",
             "| m, v scheme | tensors | steps | relative error of the update | norm ratio |", "|---|---|---|---|---|"]
    lines += [f"| {row['scheme']} | {row['kind']} | {row['steps']} | {row['relative_error']:.4f} | "
              f"{row['norm_ratio']:.4f} |" for row in rows]
    write_text(out / "results.md", "\n".join(lines) + "\n")
    write_text(out / "results.json", json.dumps({"final_val_loss": final_val_loss, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
