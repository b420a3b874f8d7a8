"""Where does the 4-bit loss come from? Train with *simulated* 4-bit moments, one factor at a time.

    python -m experiments.bench.lowbit_ablation --variants float current m_only v_only ... \
        --optimizer dct_adamw --lr 3e-2 --num_training_steps 300 --out DIR

Each variant stores the moments as fp32 tensors and, after every step, replaces them by their
quantize → dequantize round trip under the variant's scheme (the step computes ``N`` from the fp32
moments before that, as the real quantized step does), so one factor can be changed at a time: which
moment (``m``, ``v``), which tensors (projected slots, plain parameters), the map, the block, the
normalization. ``current`` simulates the library's 4-bit scheme of the session that found the cause
(block-wise absmax, blocks of 128 along the slots; dynamic signed map for ``m``, linear zero-free map
``k/16`` for ``v``): it gave the real quantized run's loss then (3.1932 against 3.1933 after 30
steps). ``real`` runs the library's quantized moments as installed: since the fix, compare it with
``v_sqrt``.

Schemes of one moment (``fake`` below; ``x`` a moment in its natural shape, ``layout`` its slots):

* ``block:B:MAP``: absmax per block of ``B`` values along the slots (the library's blocks);
* ``rank1:MAP``: Li et al.'s rank-1 normalization of a 2-D moment, ``scale_ij = min(max_j' |x_ij'|,
  max_i' |x_i'j|)`` (row max, column max); a 1-D moment falls back to ``block:128``;
* ``slot:MAP``: one absmax per slot (a column of ``m×r``, a row of ``r×n``; the whole tensor when flat).

A trailing ``:sr`` rounds stochastically between the two neighbouring levels, unbiased in the
moment's own value (in ``v``, not ``√v``, for ``sqrt``), instead of to the nearest; ``:srs`` does so
unbiased in the stored value (``√v`` for ``sqrt``; the same as ``:sr`` for the other maps).

Maps: ``dyn`` (the 4-bit dynamic map, :func:`~lowrank_optim.quantization.dynamic_map`: for ``m`` the
library's symmetric 15-level signed map up to session 13), ``lin`` (``k/16``, ``k = 1…16``,
zero-free), ``dynu`` (the dynamic unsigned 4-bit map, zero-free, 4 decades), ``sqrt`` (``lin`` applied
to ``√v``: the stored magnitude is ``√v``, so ``v`` spans 1/1024 … 1 of its scale), ``slin`` (the
signed linear 4-bit map ``k/7``, ``k = −7…7``), ``dyn8`` (the library's 8-bit dynamic map, signed for
``m``, zero-free unsigned for ``v``: the 8-bit scheme as a reference), ``nf4`` (QLoRA's NormalFloat-4
levels, signed, for ``m``), ``tao`` (torchao 0.18's signed 4-bit map: 16 levels from −0.8875 to 1.0, for
``m``; the library's since session 14, :func:`lowrank_optim.quantization.full_signed_map`).

Writes ``results.md`` and ``results.json`` into ``--out`` after every run (a cut-off run keeps its
finished rows).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch
from lowrank_optim.kernels.layout import slot_dim

from experiments.bench.common import command_line, write_text
from experiments.results.compare import add_budget_flags, base_config
from lowrank_optim.moments import base as moments_base
from lowrank_optim.moments.float_moments import FloatMoments
from lowrank_optim.quantization import dynamic_map, full_signed_map, linear_zero_free_map, moment_bits_for
from lowrank_optim.quantization.maps import midpoints

# variant: (scheme of m, scheme of v, which tensors: "all", "projected" or "plain"); None = float
VARIANTS = {
    "float": (None, None, "all"),
    "current": ("block:128:dyn", "block:128:lin", "all"),
    "m_only": ("block:128:dyn", None, "all"),
    "v_only": (None, "block:128:lin", "all"),
    "v_sqrt_only": (None, "block:128:sqrt", "all"),
    "projected_only": ("block:128:dyn", "block:128:lin", "projected"),
    "plain_only": ("block:128:dyn", "block:128:lin", "plain"),
    "v_block32": ("block:128:dyn", "block:32:lin", "all"),
    "v_slot": ("block:128:dyn", "slot:lin", "all"),
    "v_dynu": ("block:128:dyn", "block:128:dynu", "all"),
    "v_sqrt": ("block:128:dyn", "block:128:sqrt", "all"),
    "v_rank1": ("block:128:dyn", "rank1:lin", "all"),
    "v_rank1_sqrt": ("block:128:dyn", "rank1:sqrt", "all"),
    "m_block32": ("block:32:dyn", "block:128:lin", "all"),
    "m_rank1": ("rank1:dyn", "block:128:lin", "all"),
    "rank1_both": ("rank1:dyn", "rank1:lin", "all"),
    "m32_v_rank1": ("block:32:dyn", "rank1:lin", "all"),
    "m32_v_rank1_sqrt": ("block:32:dyn", "rank1:sqrt", "all"),
    "m32_v_sqrt": ("block:32:dyn", "block:128:sqrt", "all"),
    "v_floor": (None, "block:128:floor", "all"),
    # the library's 4-bit v (square-root map, stochastic in √v) under three first-moment schemes
    "v_lib": ("block:128:dyn", "block:128:sqrt:srs", "all"),
    "m32_v_lib": ("block:32:dyn", "block:128:sqrt:srs", "all"),
    "m_rank1_v_lib": ("rank1:dyn", "block:128:sqrt:srs", "all"),
    # torchao 0.18's AdamW4bit as published, its signed map included (session 13)
    "torchao_exact": ("block:128:tao", "block:128:lin", "all"),
}


# QLoRA's NormalFloat-4 levels (Dettmers et al. 2023, appendix E): quantiles of a normal distribution
NF4_LEVELS = torch.tensor([-1.0, -0.6961928, -0.5250731, -0.3949175, -0.2844414, -0.1848449, -0.0910500, 0.0,
                           0.0795803, 0.1609302, 0.2461123, 0.3379152, 0.4407098, 0.5626170, 0.7229568, 1.0],
                          dtype=torch.float64)


def _levels(name: str, signed: bool) -> tuple[torch.Tensor, int]:
    """The levels of map ``name`` (module doc) and its bits."""
    if name == "tao":
        if not signed:
            raise ValueError("the 'tao' map is torchao's signed map, for the first moment only")
        return full_signed_map(4), 4
    if name in ("dyn", "dyn8"):
        bits = 8 if name == "dyn8" else 4
        return dynamic_map(bits, signed=signed), bits
    if name == "dynu":
        return dynamic_map(4, signed=False), 4
    if name in ("lin", "sqrt", "floor"):
        return linear_zero_free_map(4), 4
    if name == "slin":
        return torch.arange(-7, 8, dtype=torch.float64) / 7, 4
    if name == "nf4":
        return NF4_LEVELS, 4
    raise ValueError(f"unknown map {name!r}")


def _nearest(t: torch.Tensor, levels: torch.Tensor, bits: int) -> torch.Tensor:
    bounds = midpoints(levels, bits)[: levels.numel() - 1].to(t.dtype)
    return levels.to(t.dtype)[torch.bucketize(t, bounds, right=True)]


def _slot_major(x: torch.Tensor, layout: str) -> torch.Tensor:
    dim = slot_dim(layout)
    if dim is None:
        return x.reshape(1, -1)
    return x.t() if dim == 1 else x


def _scales(x: torch.Tensor, layout: str, normalization: str, block: int) -> torch.Tensor:
    """Per-value scales of ``x`` (its shape)."""
    if normalization == "rank1" and x.ndim == 2:
        magnitude = x.abs()
        return torch.minimum(magnitude.amax(dim=1, keepdim=True), magnitude.amax(dim=0, keepdim=True))
    slots = _slot_major(x.abs(), layout)
    n_slots, length = slots.shape
    if normalization == "slot":
        per_slot = slots.amax(dim=1, keepdim=True).expand(n_slots, length)
    else:
        n_blocks = -(-length // block)
        padded = torch.nn.functional.pad(slots, (0, n_blocks * block - length)).view(n_slots, n_blocks, block)
        per_slot = padded.amax(dim=-1).repeat_interleave(block, dim=1)[:, :length]
    if slot_dim(layout) is None:
        return per_slot.reshape(x.shape)
    return per_slot.t() if slot_dim(layout) == 1 else per_slot


def _stochastic(t: torch.Tensor, levels: torch.Tensor, power: int) -> torch.Tensor:
    """``t`` rounded stochastically to one of its two neighbouring levels, unbiased in ``t^power``:
    ``E[q^power] = t^power`` (``t`` outside the levels' range goes to the nearest end)."""
    levels = levels.to(t.dtype)
    upper = torch.searchsorted(levels, t.contiguous(), right=True).clamp_(1, levels.numel() - 1)
    low, high = levels[upper - 1], levels[upper]
    chance = ((t.pow(power) - low.pow(power)) / (high.pow(power) - low.pow(power))).clamp_(0, 1)
    return torch.where(torch.rand(t.shape, generator=_NOISE, dtype=t.dtype) < chance, high, low)


_NOISE = torch.Generator().manual_seed(0)      # the rounding noise of ``:sr`` schemes, apart from training's


def fake(x: torch.Tensor, scheme: str, layout: str, signed: bool) -> torch.Tensor:
    """The quantize → dequantize round trip of ``x`` under ``scheme`` (module doc)."""
    parts = scheme.split(":")
    stochastic = parts[-1] in ("sr", "srs")
    in_stored_domain = parts[-1] == "srs"
    parts = parts[:-1] if stochastic else parts
    normalization, map_name = parts[0], parts[-1]
    block = int(parts[1]) if normalization == "block" else 128
    if normalization == "rank1" and x.ndim != 2:
        normalization = "block"
    stored = x.sqrt() if map_name == "sqrt" else x
    scales = _scales(stored, layout, normalization, block)
    levels, bits = _levels(map_name, signed)
    if map_name == "floor":
        return torch.maximum(x, scales * levels[0].item())
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    if stochastic:
        rounded = _stochastic(stored / safe, levels, 2 if map_name == "sqrt" and not in_stored_domain else 1) * scales
    else:
        rounded = _nearest(stored / safe, levels, bits) * scales
    return rounded.square() if map_name == "sqrt" else rounded


class SimulatedMoments(FloatMoments):
    """Float moments replaced by their round trip after each step (module doc)."""

    schemes: tuple[str | None, str | None] = (None, None)

    def step(self, backend, grad, **kwargs):
        normalized = super().step(backend, grad, **kwargs)
        exp_avg, exp_avg_sq = self._local()
        for moment, scheme, signed in ((exp_avg, self.schemes[0], True), (exp_avg_sq, self.schemes[1], False)):
            if scheme is not None:
                moment.copy_(fake(moment, scheme, self.layout, signed))
        return normalized


def install(variant: str) -> None:
    """Make ``moment_bits=4`` moments (of the variant's tensors) :class:`SimulatedMoments`."""
    m_scheme, v_scheme, where = VARIANTS[variant]
    original = moments_base.MomentSpec.of.__func__

    def of(cls, shape, side, moment_bits, block_size=None):
        spec = original(cls, shape, side, moment_bits, block_size)
        if moment_bits_for(tuple(shape), moment_bits) != 4:
            return spec
        chosen = where == "all" or (where == "projected") == (side is not None)
        storage = type("Simulated", (SimulatedMoments,), {"schemes": (m_scheme, v_scheme) if chosen else (None, None)})
        return dataclasses.replace(spec, storage=storage, bits=None)

    moments_base.MomentSpec.of = classmethod(of)


def add_simulation_flags(parser: argparse.ArgumentParser, name: str) -> None:
    """The flags of a run with simulated low-bit moments: the optimizer, its lr, the output folder,
    the runs' folder (``runs/NAME``) and the budget every method shares."""
    parser.add_argument("--optimizer", default="dct_adamw")
    parser.add_argument("--lr", type=float, default=3e-2)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--runs_dir", type=Path, default=Path("runs") / name)
    add_budget_flags(parser)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.bench.lowbit_ablation", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", required=True, choices=[*VARIANTS, "real"])
    add_simulation_flags(parser, "lowbit_ablation")
    args = parser.parse_args(argv)
    from experiments.pretrain import train

    base = base_config(args)
    original_of = moments_base.MomentSpec.of
    rows = []
    for variant in args.variants:
        moments_base.MomentSpec.of = original_of
        bits = None if variant == "float" else 4
        if variant not in ("float", "real"):
            install(variant)
        name = f"{args.optimizer}-{variant}-s{args.seed}"
        config = dataclasses.replace(base, optimizer=args.optimizer, lr=args.lr, run_name=name,
                                     save_dir=str(args.runs_dir / name),
                                     optimizer_kwargs={"moment_bits": bits} if bits else {})
        start = time.perf_counter()
        result = train(config)
        rows.append({"variant": variant, "schemes": VARIANTS.get(variant, "library 4-bit"),
                     "final_val_loss": result.final_val_loss, "seconds": time.perf_counter() - start})
        print(rows[-1], flush=True)
        write_results(rows, args.out, command_line("experiments.bench.lowbit_ablation", argv))
    moments_base.MomentSpec.of = original_of


def write_results(rows: list[dict], out: Path, command: str) -> None:
    reference = next((row["final_val_loss"] for row in rows if row["variant"] == "float"), None)
    lines = [f"`{command}`", "", "| variant | m | v | tensors | final val loss | vs float |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        m, v, where = row["schemes"] if isinstance(row["schemes"], tuple) else ("real", "real", "all")
        delta = f"{100 * (row['final_val_loss'] / reference - 1):+.2f}%" if reference else "n/a"
        lines.append(f"| {row['variant']} | {m or 'float'} | {v or 'float'} | {where} | {row['final_val_loss']:.4f} "
                     f"| {delta} |")
    write_text(out / "results.md", "\n".join(lines) + "\n")
    write_text(out / "results.json", json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
