"""Plumbing shared by the benchmarks of ``experiments/bench``: the device in words, a median timer
for CUDA and CPU, the device's copy bandwidth (the yardstick of memory-bound kernels), how a run was
started, result files, and the provenance of a run (machine, load, library state)."""

from __future__ import annotations

import hashlib
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]

L2_FLUSH_BYTES = 256 * 2**20  # larger than any current GPU's L2 (H100: 50 MB)


def device_label(device: torch.device | str) -> str:
    """The device in words, for the header of a results table: the GPU's name, or the CPU and its
    torch threads."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, torch threads: {torch.get_num_threads()})"


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work (CUDA); nothing on the CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def command_line(module: str, argv: list[str] | None) -> str:
    """How this run was started, for the results: ``python -m module`` and its arguments."""
    return " ".join(["python -m " + module, *(sys.argv[1:] if argv is None else argv)])


def write_text(path: Path, text: str) -> None:
    """Write a results file, making its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def measure_ms(
    fn: Callable[[], object], device: torch.device, *, budget_ms: float = 200.0, max_reps: int = 100
) -> float:
    """Median milliseconds of ``fn()`` after one warm-up call (compilation, autotuning, allocation).

    One timed run estimates the cost; as many runs as fit ``budget_ms`` (at most ``max_reps``)
    follow, or none when the estimate alone fills the budget (a 10-second SVD step is timed once).
    On CUDA the runs are queued back to back, each timed with events after writing a buffer larger
    than L2: kernels read their inputs from memory, and Python launch overhead hides behind the
    previous run as it does in a training loop.
    """
    fn()
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=device) if device.type == "cuda" else None
    estimate = _timed_runs(fn, flush, 1)[0]
    reps = min(max_reps, int(budget_ms / max(estimate, 1e-3)))
    if reps <= 1:
        return estimate
    return statistics.median(_timed_runs(fn, flush, reps))


def _timed_runs(fn: Callable[[], object], flush: torch.Tensor | None, reps: int) -> list[float]:
    if flush is None:
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return times
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for begin, end in events:
        flush.zero_()
        begin.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return [begin.elapsed_time(end) for begin, end in events]


def copy_bandwidth_gbps(device: torch.device, nbytes: int) -> float:
    """Device-to-device copy rate, ``2·nbytes / t`` (read + write), in GB/s (10⁹ B/s)."""
    source = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    target = torch.empty_like(source)
    ms = measure_ms(lambda: target.copy_(source), device, budget_ms=300.0)
    return 2 * source.numel() * 4 / (ms * 1e-3) / 1e9


# ------------------------------------------------------------------------------------------ provenance
def machine() -> str:
    """CPU model, cores, memory and OS of this machine."""
    model = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        mem = next(line for line in open("/proc/meminfo", encoding="utf-8") if line.startswith("MemTotal"))
        mem_gib = int(mem.split()[1]) / 2**20
    except (OSError, StopIteration):
        mem_gib = float("nan")
    return f"{model}, {os.cpu_count()} cores, {mem_gib:.0f} GiB RAM, {platform.platform()}"


def load_average() -> str:
    """The 1/5/15-minute load averages (a shared machine makes times indicative only)."""
    try:
        return " ".join(open("/proc/loadavg", encoding="ascii").read().split()[:3])
    except OSError:
        return "n/a"


def library_hash() -> str:
    """sha256 (16 hex digits) of the library's sources: lowrank_optim/ and kernels/."""
    digest = hashlib.sha256()
    for folder in ("lowrank_optim", "kernels"):
        for path in sorted((REPO / folder).rglob("*.py")):
            digest.update(str(path.relative_to(REPO)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def library_dirty() -> str:
    """Whether ``git status`` (read-only) shows changes under lowrank_optim/ or kernels/."""
    try:
        status = subprocess.run(["git", "status", "--porcelain", "--", "lowrank_optim", "kernels"], cwd=REPO,
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if status.returncode != 0:
        return "unknown"
    return "yes" if status.stdout.strip() else "no"


def git_head() -> str:
    """The short commit of HEAD, or n/a."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "n/a"
    except (OSError, subprocess.SubprocessError):
        return "n/a"
