"""Output of the kernel benchmark: markdown tables (one per section, ratios taken within the run)
and a CSV with one row per measurement."""

from __future__ import annotations

import csv
import os

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
