"""``experiments.results.compare`` with torchao's low-bit AdamW registered and countable.

    python -m experiments.bench.lowbit_compare [compare's flags]      # e.g. --methods adamw torchao_adamw8bit

What this wrapper adds, only for the process it runs in: ``torchao_adamw8bit`` /
``torchao_adamw4bit`` (``torchao.optim.AdamW8bit`` / ``AdamW4bit``, peer baselines) in
:data:`experiments.methods.BASELINE_OPTIMIZERS`. They are not registered there permanently: the
training tests run every registered method and would fail on the next point. (torchao's state is a
tensor subclass, which ``lowrank_optim.optimizer_state_bytes`` counts by its inner tensors, and its
tensor ``lr`` is logged as a float by the training script.)

After ``compare`` has written ``results.md``, its ``Command:`` line is rewritten to name this
module, so that the table says how it was made. ``--out`` defaults to ``experiments/results/lowbit_cpu``
(not compare's ``cpu_tiny``).
"""
from __future__ import annotations

import sys
from pathlib import Path

from experiments.methods import BASELINE_OPTIMIZERS

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "results" / "lowbit_cpu"


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
