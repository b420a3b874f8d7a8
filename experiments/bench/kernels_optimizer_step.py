"""Whole optimizer steps of the kernel benchmark over every weight of a LLaMA model (GaLore protocol
shapes: ALGORITHMS.md §6), refresh steps and ordinary steps reported separately.

Candidates: ``torch.optim.AdamW(fused=True)`` (the strongest dense baseline), ``DCTProjAdam`` on
each available backend, ``GaLoreAdamW`` on the fastest one (its refresh is an SVD on every
backend), and the peer ``galore_torch.GaLoreAdamW`` when installed. Projected optimizers use the
GaLore recipe's rank on the attention and MLP weights; embeddings, head and norms get AdamW. A
refresh step is one with ``update_proj_gap=1`` (a new subspace every step); an ordinary step one
with the subspace fixed (``update_proj_gap=10⁹``, after the first step). Gradients are random and
fixed; each step is timed whole (:func:`.common.measure_ms`).
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass

import torch

from lowrank_optim import DCTProjAdam, GaLoreAdamW

from .common import measure_ms

ORDINARY_GAP = 10**9


@dataclass(frozen=True)
class LlamaShape:
    name: str
    hidden: int
    intermediate: int
    layers: int
    vocab: int
    rank: int


LLAMA_1B = LlamaShape("LLaMA-1B", 2048, 5461, 24, 32000, 512)
LLAMA_SMOKE = LlamaShape("LLaMA-smoke", 64, 172, 2, 512, 16)


def llama_parameters(model: LlamaShape, dtype: torch.dtype, device: torch.device):
    """``(projected, rest)``: named parameters with random gradients, as in a LLaMA model."""
    h, i = model.hidden, model.intermediate
    projected, rest = [], []
    generator = torch.Generator(device=device).manual_seed(0)

    def parameter(shape):
        p = torch.nn.Parameter(0.02 * torch.randn(shape, device=device, generator=generator).to(dtype))
        p.grad = (1e-3 * torch.randn(shape, device=device, generator=generator)).to(dtype)
        return p

    rest.append(parameter((model.vocab, h)))  # embed_tokens
    for _ in range(model.layers):
        projected += [parameter((h, h)) for _ in range(4)]  # q, k, v, o
        projected += [parameter((i, h)), parameter((i, h)), parameter((h, i))]  # gate, up, down
        rest += [parameter((h,)), parameter((h,))]  # the two RMSNorms
    rest += [parameter((h,)), parameter((model.vocab, h))]  # final norm, lm_head
    return projected, rest


def _candidates(model: LlamaShape, backends: list[str]):
    """(label, kinds, factory(projected, rest, gap) -> optimizer)."""
    rank = model.rank
    rows = [
        (
            "torch.optim.AdamW(fused=True)",
            ("ordinary",),
            lambda projected, rest, gap: torch.optim.AdamW(projected + rest, fused=True),
        )
    ]
    for backend in backends:
        rows.append(
            (
                f"DCTProjAdam ({backend})",
                ("refresh", "ordinary"),
                lambda projected, rest, gap, b=backend: DCTProjAdam(
                    [{"params": projected, "rank": rank}, {"params": rest, "rank": None}],
                    update_proj_gap=gap,
                    backend=b,
                ),
            )
        )
    rows.append(
        (
            f"GaLoreAdamW ({backends[-1]})",
            ("refresh", "ordinary"),
            lambda projected, rest, gap: GaLoreAdamW(
                [{"params": projected, "rank": rank, "update_proj_gap": gap, "scale": 0.25}, {"params": rest}],
                backend=backends[-1],
            ),
        )
    )
    try:
        from galore_torch import GaLoreAdamW as PeerGaLoreAdamW

        warnings.filterwarnings("ignore", category=FutureWarning)
        rows.append(
            (
                "galore_torch.GaLoreAdamW",
                ("refresh", "ordinary"),
                lambda projected, rest, gap: PeerGaLoreAdamW(
                    [
                        {"params": projected, "rank": rank, "update_proj_gap": gap, "scale": 0.25, "proj_type": "std"},
                        {"params": rest},
                    ]
                ),
            )
        )
    except ImportError:
        print("galore_torch is not installed: its row is skipped (pip install galore-torch)", file=sys.stderr)
    return rows


def bench_optimizer_step(
    model: LlamaShape, dtypes: list[torch.dtype], backends: list[str], device: torch.device, budget_ms: float
) -> list[dict]:
    rows = []
    for dtype in dtypes:
        projected, rest = llama_parameters(model, dtype, device)
        shape = f"{model.name}: {len(projected)} projected + {len(rest)} other"
        for label, kinds, factory in _candidates(model, backends):
            for kind in kinds:
                optimizer = factory(projected, rest, 1 if kind == "refresh" else ORDINARY_GAP)
                if kind == "ordinary":
                    optimizer.step()  # the first step of any projected optimizer refreshes
                ms = measure_ms(optimizer.step, device, budget_ms=budget_ms, max_reps=20)
                rows.append(
                    dict(
                        section="optimizer step",
                        shape=shape,
                        rank=model.rank,
                        dtype=str(dtype).replace("torch.", ""),
                        impl=label,
                        step=kind,
                        baseline="torch.optim.AdamW(fused=True)",
                        ms=ms,
                    )
                )
                del optimizer
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return rows
