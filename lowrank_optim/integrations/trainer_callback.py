"""``LowRankOptimCallback``: every param group's learning rate and the subspace statistics in the
Hugging Face ``Trainer``'s logs (and so in wandb, TensorBoard, ``trainer.state.log_history``).

How it hooks in (transformers 5):

* ``on_optimizer_step`` runs right after ``optimizer.step()``, before the scheduler steps. The
  callback records every group's ``lr`` (the one used by this step, as ``Trainer`` logs
  ``learning_rate``) and, when the step refreshed subspaces, the optimizer's ``refresh_stats``
  (a new dict at every step; the 0-d tensors are kept, not read, so there is no host sync here).
  The optimizer it is handed is accelerate's wrapper; the library's optimizer is unwrapped from it.
* ``on_log`` receives the very ``logs`` dict the reporting callbacks (wandb, ...) are given after
  it, and is called after ``Trainer.log`` has appended a copy to ``state.log_history``. The
  callback adds its keys to both, to training logs only (those with ``learning_rate``).
  Callbacks run in list order and ``Trainer(callbacks=[...])`` puts them *after* the reporting
  integrations: :func:`add_lowrank_optim_callback` inserts the callback first, so that every
  reporter sees its keys.
"""

from __future__ import annotations

import torch
from transformers import Trainer, TrainerCallback

from ..clipping import clip_grad_norm_
from ..validation import check_bool

LR_KEY = "learning_rate/group_{index}"
MEAN_KEY = "lowrank/{stat}_mean"
REFRESH_STEP_KEY = "lowrank/refresh_step"


class LowRankOptimCallback(TrainerCallback):
    """Adds to each training log of the ``Trainer``:

    * ``learning_rate/group_{i}``: the learning rate of param group ``i`` at the last optimizer
      step (``Trainer`` itself logs group 0's only, as ``learning_rate``);
    * after a step that refreshed subspaces (``DCTProjAdam``, ``GaLoreAdamW``), from the latest such
      step since the previous log: ``lowrank/captured_mean`` and ``lowrank/overlap_mean``, the means
      over the refreshed parameters of ``captured = ‖R‖²/‖G‖²`` (gradient energy inside the new
      subspace) and ``overlap = ‖P_oldᵀP_new‖²_F / r`` (0 at a parameter's first refresh), and
      ``lowrank/refresh_step``, the global step of that refresh (any other statistic the optimizer
      reports gets its ``lowrank/{stat}_mean`` too). With ``per_layer=True`` also
      ``lowrank/{stat}/{parameter name}`` for each.

    Reading the statistics costs one host sync per log with a new refresh. Optimizers without
    ``refresh_stats`` (``SSTAdamW``, ``torch.optim.AdamW``) get the learning rates only.
    """

    def __init__(self, per_layer: bool = False) -> None:
        check_bool("per_layer", per_layer)
        self.per_layer = per_layer
        self._learning_rates: list[float] = []
        self._refresh: tuple[int, dict[str, dict[str, torch.Tensor]]] | None = None

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        optimizer = unwrap_optimizer(optimizer)
        self._learning_rates = [float(group["lr"]) for group in optimizer.param_groups]
        refresh_stats = getattr(optimizer, "refresh_stats", None)
        if refresh_stats:
            # state.global_step counts this step only after the callbacks of on_optimizer_step.
            self._refresh = (state.global_step + 1, {name: dict(stats) for name, stats in refresh_stats.items()})

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "learning_rate" not in logs:
            return
        added = {LR_KEY.format(index=i): lr for i, lr in enumerate(self._learning_rates)}
        if self._refresh is not None:
            added.update(self._refresh_logs(*self._refresh))
            self._refresh = None
        logs.update(added)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(added)

    def _refresh_logs(self, step: int, refresh_stats: dict[str, dict[str, torch.Tensor]]) -> dict[str, float]:
        entries = [(stat, name, value) for name, stats in refresh_stats.items() for stat, value in stats.items()]
        device = entries[0][2].device
        values = torch.stack([value.detach().float().to(device) for _, _, value in entries]).tolist()
        logs: dict[str, float] = {REFRESH_STEP_KEY: step}
        by_stat: dict[str, list[float]] = {}
        for (stat, name, _), value in zip(entries, values):
            by_stat.setdefault(stat, []).append(value)
            if self.per_layer:
                logs[f"lowrank/{stat}/{name}"] = value
        logs.update({MEAN_KEY.format(stat=stat): sum(row) / len(row) for stat, row in by_stat.items()})
        return logs


class ClipInOptimizerCallback(TrainerCallback):
    """Gradient clipping by :func:`lowrank_optim.clip_grad_norm_` (the norm of what the optimizer
    uses) right before each optimizer step. Under ``backward_projection=True`` Trainer's own
    ``max_grad_norm`` clips the same way (the projected gradients' stand-ins answer its norm);
    this callback is the way to clip with ``process_group``, where the optimizer averages the
    gradients across ranks first. Use it with ``TrainingArguments(max_grad_norm=0)``; the norm
    before clipping is logged as ``grad_norm/optimizer`` at the next log."""

    def __init__(self, max_norm: float) -> None:
        if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)) or max_norm <= 0:
            raise ValueError(f"Invalid max_norm: {max_norm!r} (expected a number > 0)")
        self.max_norm = float(max_norm)
        self._norm: torch.Tensor | None = None

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if args.max_grad_norm:
            raise ValueError(f"Invalid max_grad_norm: {args.max_grad_norm!r} (ClipInOptimizerCallback clips; pass "
                             "TrainingArguments(max_grad_norm=0) so that Trainer does not clip first)")
        self._norm = clip_grad_norm_(unwrap_optimizer(optimizer), self.max_norm)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or self._norm is None or "learning_rate" not in logs:
            return
        logs["grad_norm/optimizer"] = float(self._norm)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1]["grad_norm/optimizer"] = logs["grad_norm/optimizer"]   # a copy, taken before


def unwrap_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer inside wrappers that keep it as ``.optimizer`` (accelerate's
    ``AcceleratedOptimizer``, which ``Trainer`` hands to callbacks)."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def add_lowrank_optim_callback(trainer: Trainer, per_layer: bool = False) -> LowRankOptimCallback:
    """Insert a :class:`LowRankOptimCallback` at the front of ``trainer``'s callbacks, ahead of the
    reporting integrations (wandb, TensorBoard, ...), and return it.

    Raises ``ValueError`` if ``trainer`` already has one.
    """
    callbacks = trainer.callback_handler.callbacks
    if any(isinstance(callback, LowRankOptimCallback) for callback in callbacks):
        raise ValueError("Invalid trainer: it already has a LowRankOptimCallback")
    callback = LowRankOptimCallback(per_layer=per_layer)
    callbacks.insert(0, callback)
    return callback
