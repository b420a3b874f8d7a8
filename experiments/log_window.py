"""What the step loop gathers between two logs, without waiting for the device.

Each step adds its loss (a detached 0-d tensor on the device) to a sum on the device, and a step
that refreshed a projection leaves the means of the optimizer's ``refresh_stats``, still on the
device. Only :meth:`LogWindow.close`, at a log step, reads them back: one all-reduce of the loss
sum over ranks and one host sync, then the window's wall time. Between logs the host only queues
work, so the tokens/s measured are the device's, not slowed down by a sync every step.

Throughput. A window's tokens/s covers the wall time of its steps (a process's first window
includes its one-time warm-up). The run's tokens/s (:meth:`LogWindow.run_tokens_per_second`, the
number the results tables report) leaves out each process's first step: after it,
:meth:`LogWindow.end_warmup` waits for the device once and starts the run's clock. Evaluations and
checkpoints fall between windows (the loop calls :meth:`LogWindow.reset` after them), so neither
clock counts them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from experiments.distributed import DistributedContext, all_reduce_sum


@dataclass(frozen=True)
class WindowSummary:
    """The training metrics of one window: mean loss over its steps and ranks, its tokens/s, and
    the projection statistics of its latest refresh (``proj/<key>`` and ``proj/refresh_step``)."""

    loss: float
    tokens_per_second: float
    projection: dict[str, float] = field(default_factory=dict)


class LogWindow:
    """Device-side sums of the steps since the last log, and the run's throughput clock."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.timed_tokens = 0
        self.timed_seconds = 0.0
        self._warm = False
        self.reset()

    def reset(self) -> None:
        """Start a new window now (after the log, evaluation or checkpoint that ended the last one)."""
        self._loss_sum = torch.zeros((), device=self.device)
        self._steps = 0
        self._tokens = 0
        self._timed_tokens = 0
        self._refresh_step: int | None = None
        self._refresh: dict[str, torch.Tensor] = {}
        self._started = self._timed_since = time.perf_counter()

    def add(self, loss: torch.Tensor, tokens: int) -> None:
        """Count one optimizer step: its mean loss (0-d, on the device) and the tokens it trained on."""
        self._loss_sum += loss.detach()
        self._steps += 1
        self._tokens += tokens
        if self._warm:
            self._timed_tokens += tokens

    def note_refresh(self, step: int, health: dict[str, torch.Tensor]) -> None:
        """Keep ``health`` (``projection_health`` of a step, empty without a refresh) until the next log."""
        if health:
            self._refresh_step, self._refresh = step, health

    def end_warmup(self) -> None:
        """After the first step of the process: wait for the device once, then start the run's clock."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._warm = True
        self._timed_since = time.perf_counter()

    def close(self, context: DistributedContext) -> WindowSummary:
        """The window's metrics, read back from the device (collective: every rank calls it)."""
        loss_sum = all_reduce_sum(self._loss_sum, context)
        loss = float(loss_sum) / (self._steps * context.world_size)  # the host waits for the device here
        projection = {key: float(value) for key, value in self._refresh.items()}
        if self._refresh_step is not None:
            projection["proj/refresh_step"] = self._refresh_step
        now = time.perf_counter()
        if self._warm:
            self.timed_seconds += now - self._timed_since
            self.timed_tokens += self._timed_tokens
        return WindowSummary(loss=loss, tokens_per_second=self._tokens / (now - self._started), projection=projection)

    def run_tokens_per_second(self) -> float:
        """Tokens per second of the whole run after each process's first step (``nan`` before any)."""
        return self.timed_tokens / self.timed_seconds if self.timed_tokens else float("nan")
