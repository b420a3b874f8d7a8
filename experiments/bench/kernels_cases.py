"""Kernel-level cases of the kernel benchmark: each section returns rows (dicts) for one issue target.

* kernel 1, moment update: achieved GB/s against the device's copy bandwidth. Bytes per element of
  the moments: read ``R``, ``m``, ``v``, write ``m``, ``v``, ``N``: ``size(R) + 5·size(moment)``.
  The PyTorch reference is charged the same useful bytes (it moves more).
* kernel 2, selection: fused scores + top-r (and + ``R`` by gather-GEMM) against
  ``torch.topk((G·C).abs().sum(0), r)`` and against ``torch.linalg.svd`` (GaLore's refresh).
  FLOPs: ``2·M·k²`` for the scores (``k`` the compressed size, ``M`` the other one), ``+2·M·k·r``
  for ``R``.
* kernels 1+3, the ordinary step after the projection: moment update then back-projection and
  weight update, against the unfused PyTorch step, for the DCT's gathered basis and GaLore's dense
  ``P``. FLOPs: ``2·m·n·r``.
* APOLLO's channel scaling (:mod:`lowrank_optim.kernels.channel_scaling`): the channel norms of
  ``G`` then ``W ← a·W − b·(f∘G)``, one factor per channel (APOLLO) or one per tensor
  (APOLLO-Mini), Triton against the PyTorch reference: GB/s against the copy rate. Bytes per
  element of ``W`` (``e`` bytes each): norms ``e`` (read ``G``), update ``3e`` (read ``G`` and ``W``,
  write ``W``): ``4e`` in all. Rank-independent (the projection before it is a GEMM).
* whole optimizer steps over every weight of a LLaMA model (GaLore protocol shapes: ALGORITHMS.md
  §6), refresh and ordinary steps apart: ``torch.optim.AdamW(fused=True)`` (the strongest dense
  baseline), ``DCTProjAdam`` on each available backend, ``GaLoreAdamW`` on the fastest one (its
  refresh is an SVD on every backend), and the peer ``galore_torch.GaLoreAdamW`` when installed.
  Projected optimizers use the GaLore recipe's rank on the attention and MLP weights; embeddings,
  head and norms get AdamW. A refresh step is one with ``update_proj_gap=1``; an ordinary step one
  with the subspace fixed (``update_proj_gap=10⁹``, after the first step). Gradients are random and
  fixed; each step is timed whole (:func:`.common.measure_ms`).

Rows carry ``baseline``: the implementation their ``speedup`` is taken against (within one run).
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass
from functools import partial

import torch
from lowrank_optim.kernels.column_select import top_columns
from lowrank_optim.kernels.dispatch import (
    adam_moment_update,
    channel_squared_norms,
    projected_weight_update_,
    scaled_weight_update_,
)
from lowrank_optim.kernels.layout import layout_for

from lowrank_optim import DCTProjAdam, GaLoreAdamW
from lowrank_optim.geometry import compressed_size, projected_shape, resolve_side
from lowrank_optim.projectors.dct_basis import dct_matrix

from .common import measure_ms

ADAM = dict(beta1=0.9, beta2=0.999, eps=1e-8, bias_correction1=1 - 0.9**10, bias_correction2=1 - 0.999**10)
UPDATE = dict(lr=1e-3, scale=0.25, weight_decay=0.1)


@dataclass
class Settings:
    device: torch.device
    shapes: list[tuple[int, int]]
    ranks: list[int]
    dtypes: list[torch.dtype]
    backends: list[str]  # "torch", plus "triton" where it runs
    copy_gbps: float
    budget_ms: float


def _cases(settings: Settings):
    """(shape, side, rank) for every shape and every rank below its smaller side."""
    for shape in settings.shapes:
        for rank in settings.ranks:
            if rank < min(shape):
                yield shape, resolve_side(torch.Size(shape), "auto"), rank


def _row(section, shape, rank, dtype, impl, baseline, ms, *, nbytes=None, flops=None, settings=None, **extra):
    row = dict(
        section=section,
        shape=f"{shape[0]}×{shape[1]}",
        rank=rank,
        dtype=str(dtype).replace("torch.", ""),
        impl=impl,
        baseline=baseline,
        ms=ms,
        gb_per_s=None,
        pct_of_copy=None,
        tflop_per_s=None,
        **extra,
    )
    if nbytes is not None:
        row["gb_per_s"] = nbytes / (ms * 1e-3) / 1e9
        row["pct_of_copy"] = 100.0 * row["gb_per_s"] / settings.copy_gbps
    if flops is not None:
        row["tflop_per_s"] = flops / (ms * 1e-3) / 1e12
    return row


def _randn(shape, dtype, device, seed=0):
    generator = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(shape, device=device, generator=generator).to(dtype)


def bench_moment_update(settings: Settings) -> list[dict]:
    rows = []
    for shape, side, rank in _cases(settings):
        for dtype in settings.dtypes:
            rows += _moment_update_case(settings, shape, side, rank, dtype)
    return rows


def _moment_update_case(settings, shape, side, rank, dtype) -> list[dict]:
    device = settings.device
    moment_shape = projected_shape(torch.Size(shape), side, rank)
    grad = _randn(moment_shape, dtype, device)
    exp_avg = torch.zeros(moment_shape, device=device)
    exp_avg_sq = torch.zeros(moment_shape, device=device)
    nbytes = grad.numel() * (grad.element_size() + 5 * exp_avg.element_size())
    slots = torch.randperm(rank, device=device)
    slots[::4] = -1  # a quarter of the columns are new
    impls = {"torch reference": lambda: adam_moment_update("torch", grad, exp_avg, exp_avg_sq, **ADAM)}
    if "triton" in settings.backends:
        impls["triton"] = lambda: adam_moment_update("triton", grad, exp_avg, exp_avg_sq, **ADAM)
        impls["triton, transport remap"] = lambda: adam_moment_update(
            "triton", grad, exp_avg, exp_avg_sq, source_slots=slots, layout=layout_for(side), **ADAM
        )
    return [
        _row(
            "kernel 1: moment update",
            shape,
            rank,
            dtype,
            impl,
            "torch reference",
            measure_ms(fn, device, budget_ms=settings.budget_ms),
            nbytes=nbytes,
            settings=settings,
        )
        for impl, fn in impls.items()
    ]


def bench_selection(settings: Settings) -> list[dict]:
    rows, svd_ms = [], {}
    for shape in settings.shapes:
        for dtype in settings.dtypes:
            rows += _selection_case(settings, shape, dtype, svd_ms)
    return rows


def _selection_case(settings, shape, dtype, svd_ms_by_shape: dict) -> list[dict]:
    """Rows of one gradient; the SVD (always fp32, rank-independent) is timed once per shape."""
    device = settings.device
    side = resolve_side(torch.Size(shape), "auto")
    size = compressed_size(torch.Size(shape), side)
    other = shape[0] if side == "right" else shape[1]
    grad = _randn(shape, dtype, device)
    basis = dct_matrix(size, dtype, device)
    column_major = basis.T.contiguous().T
    baseline = "torch topk(|G·C| sums)"
    if shape not in svd_ms_by_shape:
        svd = partial(torch.linalg.svd, grad.float(), full_matrices=False)
        svd_ms_by_shape[shape] = measure_ms(svd, device, budget_ms=settings.budget_ms, max_reps=5)
    svd_ms = svd_ms_by_shape[shape]
    rows = [
        _row(
            "kernel 2: selection",
            shape,
            "all",
            dtype,
            "torch.linalg.svd (GaLore refresh)",
            baseline,
            svd_ms,
            svd_ms=svd_ms,
        )
    ]
    for rank in [r for r in settings.ranks if r < min(shape)]:
        score_flops = 2 * other * size * size
        impls = {baseline: (partial(_torch_topk, grad, basis, rank, side), score_flops)}
        if "triton" in settings.backends:
            from lowrank_optim.kernels.column_select_triton import select_columns_triton

            impls["triton scores + top-r"] = (
                partial(select_columns_triton, grad, column_major, rank, side, "l1"),
                score_flops,
            )
            impls["triton scores + top-r + R"] = (
                partial(select_columns_triton, grad, column_major, rank, side, "l1", project=True),
                score_flops + 2 * other * size * rank,
            )
        rows += [
            _row(
                "kernel 2: selection",
                shape,
                rank,
                dtype,
                impl,
                baseline,
                measure_ms(fn, device, budget_ms=settings.budget_ms),
                flops=flops,
                svd_ms=svd_ms,
            )
            for impl, (fn, flops) in impls.items()
        ]
    return rows


def _torch_topk(grad, basis, rank, side):
    if side == "right":
        return torch.topk((grad @ basis).abs().sum(0), rank)
    return torch.topk((basis.T @ grad).abs().sum(1), rank)


def bench_fused_step(settings: Settings) -> list[dict]:
    """Kernels 1+3: moments in the weight's dtype (the optimizers' default ``moments_dtype``)."""
    rows = []
    for shape, side, rank in _cases(settings):
        for dtype in settings.dtypes:
            rows += _fused_step_case(settings, shape, side, rank, dtype)
    return rows


def _fused_step_case(settings, shape, side, rank, dtype) -> list[dict]:
    device = settings.device
    size = compressed_size(torch.Size(shape), side)
    moment_shape = projected_shape(torch.Size(shape), side, rank)
    weight = _randn(shape, dtype, device)
    grad = _randn(moment_shape, dtype, device, seed=1)
    exp_avg = torch.zeros(moment_shape, dtype=dtype, device=device)
    exp_avg_sq = torch.zeros(moment_shape, dtype=dtype, device=device)
    indices = top_columns(torch.rand(size, device=device), rank)
    dense = torch.linalg.qr(torch.randn(size, rank, device=device)).Q.to(dtype)
    bases = {
        "dct": {"torch": dct_matrix(size, dtype, device), "triton": dct_matrix(size, dtype, device).T.contiguous().T},
        "galore": {"torch": dense, "triton": dense},
    }

    def step(backend, case, decay_before_update):
        update, _, _ = adam_moment_update(backend, grad, exp_avg, exp_avg_sq, **ADAM)
        projected_weight_update_(
            backend,
            weight,
            update,
            bases[case][backend],
            indices if case == "dct" else None,
            side,
            decay_before_update=decay_before_update,
            **UPDATE,
        )

    rows = []
    for case, decay_before_update in (("dct", True), ("galore", False)):
        baseline = f"{case}: torch unfused"
        for backend in settings.backends:
            impl = baseline if backend == "torch" else f"{case}: triton kernels 1+3"
            ms = measure_ms(partial(step, backend, case, decay_before_update), device, budget_ms=settings.budget_ms)
            rows.append(
                _row(
                    "kernels 1+3: ordinary step",
                    shape,
                    rank,
                    dtype,
                    impl,
                    baseline,
                    ms,
                    flops=2 * shape[0] * shape[1] * rank,
                )
            )
    return rows


CHANNEL_SCALING_SECTIONS = {"channel": "APOLLO scaling: per channel", "tensor": "APOLLO-Mini scaling: per tensor"}


def bench_channel_scaling(settings: Settings) -> list[dict]:
    """APOLLO's norms + scaled update on every shape and dtype, per channel and per tensor."""
    rows = []
    for shape in settings.shapes:
        for dtype in settings.dtypes:
            rows += _channel_scaling_case(settings, shape, dtype)
    return rows


def _channel_scaling_case(settings, shape, dtype) -> list[dict]:
    device = settings.device
    side = resolve_side(torch.Size(shape), "auto")
    weight = _randn(shape, dtype, device)
    grad = _randn(shape, dtype, device, seed=1)
    channels = shape[0] if side == "right" else shape[1]
    a, b = 1.0 - UPDATE["lr"] * UPDATE["weight_decay"], UPDATE["lr"]
    # NOTE: fixed factors: their own small math (moments, limiter: a few hundred values) is not these kernels'.
    factors = {"channel": torch.full((channels,), 0.5, device=device), "tensor": torch.tensor(0.5, device=device)}

    def step(backend, scale_type):
        channel_squared_norms(backend, grad, side if scale_type == "channel" else None)
        scaled_weight_update_(backend, weight, grad, factors[scale_type], side, a=a, b=b)

    rows = []
    for scale_type, section in CHANNEL_SCALING_SECTIONS.items():
        for backend in settings.backends:
            impl = "torch reference" if backend == "torch" else "triton norms + update"
            ms = measure_ms(partial(step, backend, scale_type), device, budget_ms=settings.budget_ms)
            rows.append(_row(section, shape, "—", dtype, impl, "torch reference", ms,
                             nbytes=4 * weight.numel() * weight.element_size(), settings=settings))
    return rows


# ------------------------------------------------------------------------------------------ whole optimizer steps
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
