"""Pretraining experiments for ``lowrank_optim``: the training script, configs, sweeps and results.

Entry points (run from the repository root): ``python -m experiments.pretrain``,
``python -m experiments.sweep``, ``python -m experiments.results.compare``. See ``experiments/README.md``.
"""
