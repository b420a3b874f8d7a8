"""Benchmark of the fused Triton kernels (issue #3) against PyTorch, in one run on one device.

    python -m experiments.bench.kernels_bench --csv experiments/results/kernels_h100.csv
    python -m experiments.bench.kernels_bench --tf32 --csv kernels_h100_tf32.csv     # TF32 fp32 GEMMs
    python -m experiments.bench.kernels_bench --smoke                                 # CPU, tiny shapes

The full run takes a quarter of an hour or more on one GPU (autotuning every new shape, SVDs of
7B-sized gradients, LLaMA-1B GaLore refresh steps); ``--sections`` and ``--sizes`` split it, e.g.
``--sections moment selection``, then ``--sections step``, then ``--sections optimizer``.

Sections (``--sections``): ``moment`` (kernel 1: GB/s against the device-to-device copy rate
measured first in the same run; target ≥ 80%), ``selection`` (kernel 2 against
``torch.topk((G·C).abs().sum(0))`` and ``torch.linalg.svd``), ``step`` (kernels 1+3 against the
unfused PyTorch step), ``channel`` (APOLLO's channel norms and scaled update, per channel and per
tensor, Triton against PyTorch: GB/s against the copy rate), all over LLaMA weight shapes (60M …
7B: ``h×h``, ``h×i``, ``i×h``; ``moment`` and ``step`` at ranks 128-1024) in fp32 and bf16; and
``optimizer`` (whole steps over every LLaMA-1B weight: ``DCTProjAdam`` against
``torch.optim.AdamW(fused=True)`` and ``galore_torch.GaLoreAdamW``, refresh and ordinary steps
apart). Formulas of bytes and FLOPs: :mod:`.kernels_cases`.

fp32 GEMMs follow torch's setting, stated in the output: full fp32 by default, TF32 with ``--tf32``
(for torch's matmuls and the kernels alike). Results go to the CSV given by ``--csv`` and are
printed as markdown tables headed by the device. Without a GPU the script says so and exits 0;
``--smoke`` then runs every section end to end on CPU with tiny shapes on the PyTorch backend (and
on the Triton interpreter too when ``TRITON_INTERPRET=1`` is set).
"""

from __future__ import annotations

import argparse
import csv
import os
import sys

import torch
from lowrank_optim.kernels.backend import interpreting, triton_available

from .common import copy_bandwidth_gbps, device_label
from .kernels_cases import (
    CHANNEL_SCALING_SECTIONS,
    LLAMA_1B,
    LLAMA_SMOKE,
    Settings,
    bench_channel_scaling,
    bench_fused_step,
    bench_moment_update,
    bench_optimizer_step,
    bench_selection,
)

# (hidden, intermediate) of the GaLore-protocol LLaMA sizes (ALGORITHMS.md §6).
LLAMA_DIMS = {"60M": (512, 1376), "130M": (768, 2048), "350M": (1024, 2736), "1B": (2048, 5461), "7B": (4096, 11008)}
RANKS = [128, 256, 512, 1024]
SMOKE_DIMS = {"smoke": (48, 136)}
SMOKE_RANKS = [8, 16]
SECTIONS = ("moment", "selection", "step", "channel", "optimizer")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# ------------------------------------------------------------------------------------------ output
# Markdown tables (one per section, ratios taken within the run) and a CSV, one row per measurement.
PEER = "galore_torch.GaLoreAdamW"
CSV_FIELDS = [
    "device",
    "tf32",
    "copy_gb_per_s",
    "section",
    "shape",
    "rank",
    "dtype",
    "impl",
    "step",
    "ms",
    "gb_per_s",
    "pct_of_copy",
    "tflop_per_s",
    "baseline",
    "speedup",
    "svd_ratio",
    "peer_ratio",
]


def _with_ratios(rows: list[dict]) -> list[dict]:
    """Copies of ``rows`` with the ratios, all ``other ms ÷ this row's ms`` within this run:

    * ``speedup``: against the row's baseline on the same case (section, shape, rank, dtype; for
      optimizer steps the baseline's only step kind);
    * ``svd_ratio`` (selection): against ``torch.linalg.svd`` of the same gradient;
    * ``peer_ratio`` (optimizer steps): against ``galore_torch`` on the same dtype and step kind.
    """

    def case(row):
        return row["section"], row["shape"], None if row["section"] == "optimizer step" else row["rank"], row["dtype"]

    baseline_ms = {case(r): r["ms"] for r in rows if r["impl"] == r["baseline"]}
    peer_ms = {(r["dtype"], r["step"]): r["ms"] for r in rows if r["impl"] == PEER}
    out = []
    for row in rows:
        ratios = {"speedup": baseline_ms.get(case(row))}
        if "svd_ms" in row:
            ratios["svd_ratio"] = row["svd_ms"]
        if row["section"] == "optimizer step":
            ratios["peer_ratio"] = peer_ms.get((row["dtype"], row["step"]))
        out.append({**row, **{key: None if ms is None else ms / row["ms"] for key, ms in ratios.items()}})
    return out


def _cell(value, digits=2) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def _table(rows: list[dict], columns: list[tuple[str, str, int]]) -> list[str]:
    lines = ["| " + " | ".join(title for title, _, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(key), digits) for _, key, digits in columns) + " |")
    return lines


def print_tables(header: str, rows: list[dict]) -> None:
    rows = _with_ratios(rows)
    common = [
        ("shape", "shape", 0),
        ("rank", "rank", 0),
        ("dtype", "dtype", 0),
        ("implementation", "impl", 0),
        ("ms", "ms", 3),
    ]
    extra = {
        "kernel 1: moment update": [
            ("GB/s", "gb_per_s", 1),
            ("% of copy", "pct_of_copy", 1),
            ("× torch", "speedup", 2),
        ],
        "kernel 2: selection": [
            ("TFLOP/s", "tflop_per_s", 1),
            ("× torch topk", "speedup", 2),
            ("SVD ms ÷ this", "svd_ratio", 1),
        ],
        "kernels 1+3: ordinary step": [("TFLOP/s", "tflop_per_s", 1), ("× torch unfused", "speedup", 2)],
        **{section: [("GB/s", "gb_per_s", 1), ("% of copy", "pct_of_copy", 1), ("× torch", "speedup", 2)]
           for section in CHANNEL_SCALING_SECTIONS.values()},
        "optimizer step": [
            ("step", "step", 0),
            ("AdamW(fused) ms ÷ this", "speedup", 2),
            ("galore_torch ms ÷ this", "peer_ratio", 2),
        ],
    }
    print(f"\n## Kernel benchmark: {header}")
    for section, columns in extra.items():
        selected = [r for r in rows if r["section"] == section]
        if not selected:
            continue
        print(f"\n### {section}\n")
        print("\n".join(_table(selected, common + columns)))


def write_csv(path: str, device: str, tf32: bool, copy_gbps: float, rows: list[dict]) -> None:
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for row in _with_ratios(rows):
            writer.writerow({"device": device, "tf32": tf32, "copy_gb_per_s": copy_gbps, **row})


# ------------------------------------------------------------------------------------------ run
def weight_shapes(dims: dict[str, tuple[int, int]]) -> list[tuple[int, int]]:
    """Attention ``h×h``, MLP up ``i×h`` (right projection) and down ``h×i`` (left) per size."""
    return [shape for h, i in dims.values() for shape in ((h, h), (i, h), (h, i))]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--csv", help="write every result row to this CSV file")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (no GPU needed)")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument(
        "--sizes",
        nargs="+",
        choices=list(LLAMA_DIMS),
        default=list(LLAMA_DIMS),
        help="LLaMA sizes whose weight shapes the kernel sections use",
    )
    parser.add_argument("--ranks", nargs="+", type=int, default=RANKS)
    parser.add_argument(
        "--dtypes",
        nargs="+",
        choices=list(DTYPES),
        default=list(DTYPES),
        help="gradient/weight dtypes of the kernel sections",
    )
    parser.add_argument(
        "--optimizer-dtypes",
        nargs="+",
        choices=list(DTYPES),
        default=["bfloat16"],
        help="weight dtypes of the whole-optimizer section (GaLore protocol: bf16)",
    )
    parser.add_argument("--tf32", action="store_true", help="allow TF32 for fp32 GEMMs (torch and Triton)")
    parser.add_argument("--budget-ms", type=float, default=100.0, help="time spent timing each case")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.smoke:
        device = torch.device("cpu")
        if interpreting():
            args.dtypes = args.optimizer_dtypes = ["float32"]  # the interpreter's bf16 arithmetic is wrong
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        print(
            "kernels_bench: no CUDA device on this machine; the Triton kernels are GPU kernels, so nothing "
            "was measured. Run it on a GPU, or pass --smoke for a tiny end-to-end CPU run."
        )
        return 0
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    backends = ["torch"]
    if triton_available() and (device.type == "cuda" or interpreting()):
        backends.append("triton")
    elif device.type == "cuda":
        print("triton does not import: only the PyTorch backend is measured", file=sys.stderr)

    dims = SMOKE_DIMS if args.smoke else {size: LLAMA_DIMS[size] for size in args.sizes}
    copy_gbps = copy_bandwidth_gbps(device, 2**22 if args.smoke else 2**30)
    settings = Settings(
        device=device,
        shapes=weight_shapes(dims),
        ranks=SMOKE_RANKS if args.smoke else args.ranks,
        dtypes=[DTYPES[d] for d in args.dtypes],
        backends=backends,
        copy_gbps=copy_gbps,
        budget_ms=args.budget_ms,
    )
    rows = []
    if "moment" in args.sections:
        rows += bench_moment_update(settings)
    if "selection" in args.sections:
        rows += bench_selection(settings)
    if "step" in args.sections:
        rows += bench_fused_step(settings)
    if "channel" in args.sections:
        rows += bench_channel_scaling(settings)
    if "optimizer" in args.sections:
        rows += bench_optimizer_step(
            LLAMA_SMOKE if args.smoke else LLAMA_1B,
            [DTYPES[d] for d in args.optimizer_dtypes],
            backends,
            device,
            args.budget_ms,
        )

    header = (
        f"{device_label(device)}; torch {torch.__version__}; backends {', '.join(backends)}; "
        f"TF32 for fp32 GEMMs: {'on' if args.tf32 else 'off'}; device-to-device copy {copy_gbps:,.0f} GB/s"
    )
    print_tables(header, rows)
    if args.csv:
        write_csv(args.csv, device_label(device), args.tf32, copy_gbps, rows)
        print(f"\nrows written to {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
