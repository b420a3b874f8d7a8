"""``experiments.results.compare`` with torchao's low-bit AdamW registered and countable.

    python -m experiments.bench.lowbit_compare [compare's flags]      # e.g. --methods adamw torchao_adamw8bit

Two things this wrapper adds, both only for the process it runs in (nothing in the library or in
``experiments`` is changed):

* ``torchao_adamw8bit`` / ``torchao_adamw4bit`` (``torchao.optim.AdamW8bit`` / ``AdamW4bit``, peer
  baselines) are added to :data:`experiments.methods.BASELINE_OPTIMIZERS`. They are not registered
  there permanently: the training tests run every registered method and would fail on the next point.
* ``lowrank_optim.optimizer_state_bytes`` raises ``RuntimeError: Attempted to access the data
  pointer on an invalid python storage`` on torchao's state: its moments are tensor subclasses
  (``OptimState8bit``/``OptimState4bit``, traceable wrapper subclasses holding ``codes``, ``scale``
  and ``qmap``) whose own storage is a placeholder. The counting here flattens such subclasses into
  their inner tensors (``__tensor_flatten__``) before the library counts storages; plain tensors are
  counted exactly as the library does (same storages, same bytes).
* torchao keeps each group's ``lr`` as a 0-d tensor (LambdaLR then ``fill_``s it), so
  ``scheduler.get_last_lr()`` returns tensors and ``experiments.pretrain`` fails writing
  ``metrics.jsonl`` (``TypeError: Object of type Tensor is not JSON serializable``). The scheduler
  built here reports its last lrs as Python floats; the schedule itself is LambdaLR's, unchanged.

After ``compare`` has written ``results.md``, its ``Command:`` line is rewritten to name this
module, so that the table says how it was made. ``--out`` defaults to ``experiments/results/lowbit_cpu``
(not compare's ``cpu_tiny``).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

import experiments.pretrain
import lowrank_optim.state_bytes as state_bytes
from experiments.methods import BASELINE_OPTIMIZERS
from experiments.schedulers import build_scheduler

_library_tensors = state_bytes._tensors
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "results" / "lowbit_cpu"


def _flatten(tensor):
    """``tensor``, or the plain tensors inside a traceable wrapper subclass (recursively)."""
    if is_traceable_wrapper_subclass(tensor):
        names, _ = tensor.__tensor_flatten__()
        for name in names:
            yield from _flatten(getattr(tensor, name))
    else:
        yield tensor


def _tensors_with_subclasses(value, seen):
    for tensor in _library_tensors(value, seen):
        yield from _flatten(tensor)


def patch_state_bytes() -> None:
    """Make ``lowrank_optim``'s state-byte count see through tensor subclasses (this process only)."""
    state_bytes._tensors = _tensors_with_subclasses


class _FloatLastLR(torch.optim.lr_scheduler.LambdaLR):
    """LambdaLR whose ``get_last_lr()`` gives floats also when the groups hold tensor lrs."""

    def get_last_lr(self) -> list[float]:
        return [float(lr) for lr in super().get_last_lr()]


def _build_float_lr_scheduler(*args, **kwargs):
    scheduler = build_scheduler(*args, **kwargs)
    scheduler.__class__ = _FloatLastLR
    return scheduler


def patch_scheduler() -> None:
    """The training loop's scheduler reports float lrs (this process only)."""
    experiments.pretrain.build_scheduler = _build_float_lr_scheduler


def _torchao(name: str):
    def factory(params, **kwargs):
        import torchao.optim

        return getattr(torchao.optim, name)(params, **kwargs)

    factory.__name__ = f"torchao_{name}"
    return factory


def register_torchao() -> None:
    BASELINE_OPTIMIZERS.setdefault("torchao_adamw8bit", _torchao("AdamW8bit"))
    BASELINE_OPTIMIZERS.setdefault("torchao_adamw4bit", _torchao("AdamW4bit"))


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    patch_state_bytes()
    patch_scheduler()
    register_torchao()
    from experiments.results import compare

    if "--out" not in argv:  # never overwrite compare's default (results/cpu_tiny)
        argv += ["--out", str(DEFAULT_OUT)]
    compare.main(argv)
    out = Path(argv[argv.index("--out") + 1])
    results = out / "results.md"
    if results.is_file():
        text = results.read_text(encoding="utf-8").replace(
            "Command: `python -m experiments.results.compare",
            "Command: `python -m experiments.bench.lowbit_compare", 1)
        results.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
