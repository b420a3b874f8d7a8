"""Peer implementations used as oracles: galore_torch and ista-daslab-optimizers' DCTAdamW."""
from __future__ import annotations

import importlib
import importlib.util
import sys
import types
import warnings

import pytest


def galore_torch_adamw():
    galore_torch = pytest.importorskip("galore_torch")
    warnings.filterwarnings("ignore", category=FutureWarning)
    return galore_torch.GaLoreAdamW


def ista_dct_adamw():
    """``DCTAdamW`` of ista-daslab-optimizers 1.1.15 (installed with --no-deps).

    Its package ``__init__`` imports every optimizer, which needs CUDA extensions and GPU tools;
    an empty package module stands in for it so only ``fft_low_rank.dct_adamw`` and its pure-torch
    helpers load.
    """
    module = "ista_daslab_optimizers.fft_low_rank.dct_adamw"
    if module not in sys.modules:
        spec = importlib.util.find_spec("ista_daslab_optimizers")
        if spec is None:
            pytest.skip("ista-daslab-optimizers is not installed "
                        "(pip install --no-deps ista-daslab-optimizers==1.1.15)")
        shell = types.ModuleType("ista_daslab_optimizers")
        shell.__path__ = list(spec.submodule_search_locations)
        sys.modules.setdefault("ista_daslab_optimizers", shell)
    return importlib.import_module(module).DCTAdamW
