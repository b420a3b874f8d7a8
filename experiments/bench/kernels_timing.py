"""Timing helpers of the kernel benchmark: one median timer for CUDA and CPU, the device's copy
bandwidth (the yardstick of memory-bound kernels), and the device's name."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

L2_FLUSH_BYTES = 256 * 2**20  # larger than any current GPU's L2 (H100: 50 MB)


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({torch.get_num_threads()} threads)"


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
