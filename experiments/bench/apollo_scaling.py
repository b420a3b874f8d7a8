r"""How well APOLLO's projected moments estimate full Adam's per-channel scaling: a random projection
(the paper's) against DCT columns aligned with the gradient, at rank 1 and rank r.

    python -m experiments.bench.apollo_scaling --out experiments/results/APOLLO_SCALING.md

The llama_tiny model trains with ``torch.optim.AdamW`` on the embedded corpus; at every step each
attention/MLP weight's gradient ``G`` also feeds shadow estimators that never touch the model:

* full Adam moments of ``G``: ``N = m̂/(√v̂+ε)`` and the true scaling of channel ``c`` (rows of ``G``
  on the right side, columns on the left), ``s*_c = ‖N_c‖/‖G_c‖``, and of the tensor, ``s* = ‖N‖/‖G‖``;
* APOLLO's estimate from the Adam moments of ``R`` (``G·P`` or ``Pᵀ·G``): ``s_c = ‖Ñ_c‖/‖R_c‖`` and
  ``s = ‖Ñ‖/‖R‖``, with ``P`` seeded Gaussian (resampled every ``--gap`` steps, moments kept, as
  apollo-torch) or DCT columns chosen by alignment (re-selected every ``--gap`` steps, moments
  transported slot by slot) — the library's two projectors.

Each estimate is judged by ``log(s/s*)`` over the weights and steps after the first ``--warmup``:
its *bias* (the mean: a constant factor, which APOLLO's ``scale`` absorbs — APOLLO-Mini's
``√128``), and its *spread*, what no constant can fix: for channel factors the mean over weights and
steps of the median over channels of ``|log(s_c/s*_c) − their mean|`` (is the pattern across
channels right?); for the tensor factor the standard deviation of ``log(s/s*)``. 0.1 ≈ 10 %.
Bias correction is the same on both sides (it cancels in the ratios).
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from lowrank_optim.kernels.layout import layout_for
from lowrank_optim.kernels.slot_remap import remap_slots

from experiments.bench.common import command_line, device_label, write_text
from experiments.config import DEFAULT_CACHE_DIR
from experiments.data import build_data
from experiments.data_interface import DataSpec
from experiments.evaluation import next_token_loss
from experiments.model_factory import build_model
from lowrank_optim.channels import channel_squared_norms
from lowrank_optim.geometry import resolve_side
from lowrank_optim.projectors import PROJECTORS

BETAS, EPS = (0.9, 0.999), 1e-8


class _Moments:
    """Adam's moments of one tensor and the channel and tensor scaling factors they give."""

    def __init__(self):
        self.m = self.v = None

    def update(self, x: torch.Tensor) -> torch.Tensor:
        if self.m is None:
            self.m, self.v = torch.zeros_like(x), torch.zeros_like(x)
        self.m.mul_(BETAS[0]).add_(x, alpha=1 - BETAS[0])
        self.v.mul_(BETAS[1]).addcmul_(x, x, value=1 - BETAS[1])
        return self.m / (self.v.sqrt() + EPS)


def _factors(normalized: torch.Tensor, source: torch.Tensor, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    channel = (channel_squared_norms(normalized, side) / channel_squared_norms(source, side).clamp_min(1e-30)).sqrt()
    return channel, normalized.norm() / source.norm().clamp_min(1e-30)


class _Estimator:
    """APOLLO's estimate for one weight with one projector (module doc)."""

    def __init__(self, name: str, shape, rank: int, side: str, position: int):
        group = {"seed": 0, "score": "l2", "transform": "auto", "basis": "cached"}
        self.projector = PROJECTORS[name](group, position=position, side=side, rank=rank)
        self.rank, self.side, self.subspace, self.moments = rank, side, {}, _Moments()

    def factors(self, grad: torch.Tensor, refresh: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if refresh:
            new = self.projector.select(grad, self.rank, self.side, previous=self.subspace)
            slots = self.projector.transport_slots(self.subspace, new) if self.subspace else None
            if slots is not None:                      # DCT: moments follow their columns
                layout = layout_for(self.side)
                self.moments.m = remap_slots(self.moments.m, slots, layout)
                self.moments.v = remap_slots(self.moments.v, slots, layout)
            self.subspace = new
        low_rank = self.projector.project(grad, self.subspace, self.side)
        return _factors(self.moments.update(low_rank), low_rank, self.side)


def _log_ratio(estimate: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    return (estimate.clamp_min(1e-30) / truth.clamp_min(1e-30)).log()


def _logits(output) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--gap", type=int, default=50)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    spec = DataSpec("shakespeare", "byte", 128, 8, eval_tokens=128, seed=0, cache_dir=DEFAULT_CACHE_DIR)
    data = build_data(spec)
    model = build_model("llama_tiny", "native", data.tokenizer.vocab_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    weights = [(n, p) for n, p in model.named_parameters() if p.ndim == 2 and ("attn" in n or "mlp" in n)]
    truth = {n: _Moments() for n, _ in weights}
    estimators = {(kind, rank, n): _Estimator(kind, p.shape, rank, resolve_side(p.shape, "std"), i + 1)
                  for kind in ("random", "dct") for rank in args.ranks for i, (n, p) in enumerate(weights)}
    errors = {(kind, rank, scale): [] for kind in ("random", "dct") for rank in args.ranks
              for scale in ("channel", "tensor")}
    for step in range(args.steps):
        batch = data.train.next_batch()
        optimizer.zero_grad()
        next_token_loss(_logits(model(batch)), batch, pad_id=-1).backward()
        with torch.no_grad():
            for name, param in weights:
                side = resolve_side(param.shape, "std")
                true_channel, true_tensor = _factors(truth[name].update(param.grad), param.grad, side)
                for kind in ("random", "dct"):
                    for rank in args.ranks:
                        channel, tensor = estimators[(kind, rank, name)].factors(param.grad, step % args.gap == 0)
                        if step >= args.warmup:
                            errors[(kind, rank, "channel")].append(_log_ratio(channel, true_channel))
                            errors[(kind, rank, "tensor")].append(_log_ratio(tensor, true_tensor).reshape(1))
        optimizer.step()
    lines = ["# APOLLO's scaling estimate: random against DCT-aligned projections\n",
             f"`{command_line('experiments.bench.apollo_scaling', argv)}` — llama_tiny, {args.steps} AdamW steps "
             f"(lr {args.lr}), resample/re-selection every {args.gap}, {device_label('cpu')}; "
             f"{len(weights)} attention/MLP weights, steps after {args.warmup}. Bias: mean of log(s/s*) "
             "(a constant factor, absorbed by `scale`); spread: what no constant fixes (module doc).\n",
             "| projection | rank | channel: bias | channel: spread | tensor: bias | tensor: spread |",
             "|---|---|---|---|---|---|"]
    for rank in args.ranks:
        for kind in ("random", "dct"):
            channel, tensor = errors[(kind, rank, "channel")], torch.cat(errors[(kind, rank, "tensor")])
            channel_bias = torch.cat(channel).mean().item()
            spread = sum((r - r.mean()).abs().median().item() for r in channel) / len(channel)
            lines.append(f"| {kind} | {rank} | {channel_bias:+.2f} (×{math.exp(channel_bias):.2f}) | {spread:.3f} | "
                         f"{tensor.mean().item():+.2f} (×{math.exp(tensor.mean().item()):.2f}) | "
                         f"{tensor.std().item():.3f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        write_text(Path(args.out), text)


if __name__ == "__main__":
    main()
