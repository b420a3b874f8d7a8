"""Peer implementations used as oracles: galore_torch, ista-daslab-optimizers' DCTAdamW, apollo-torch's
APOLLOAdamW and pytorch-optimizer's APOLLO."""
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


def _package_shell(package: str, reason: str) -> None:
    """An empty module in place of ``package``'s ``__init__``, so that only the submodules asked for load."""
    if package in sys.modules:
        return
    spec = importlib.util.find_spec(package)
    if spec is None:
        pytest.skip(reason)
    shell = types.ModuleType(package)
    shell.__path__ = list(spec.submodule_search_locations)
    sys.modules.setdefault(package, shell)


def apollo_torch_adamw():
    """``APOLLOAdamW`` of apollo-torch 1.0.3 (CC-BY-NC: a test-only oracle, never vendored).

    Its package ``__init__`` imports the 8-bit and quantized variants, which pull bitsandbytes (seconds of
    import and kernel-loading noise); an empty package module stands in for it so only ``apollo_torch.apollo``
    and its two projectors load (they import ``transformers.utils.versions`` and torch).
    """
    _package_shell("apollo_torch", "apollo-torch is not installed (test-only oracle under a non-commercial "
                                   "licence: pip install --no-deps apollo-torch==1.0.3)")
    return importlib.import_module("apollo_torch.apollo").AdamW


def apollo_torch_projector():
    """apollo-torch's ``random_projector`` module (``GradientProjector``, ``stable_randn``, ``next_seed``)."""
    apollo_torch_adamw()
    return importlib.import_module("apollo_torch.random_projector")


def pytorch_optimizer_apollo():
    """``APOLLO`` of pytorch-optimizer (Apache-2.0, in the test extra)."""
    module = pytest.importorskip("pytorch_optimizer.optimizer.apollo",
                                 reason="pytorch-optimizer is not installed (pip install pytorch-optimizer)")
    return module.APOLLO


def pytorch_optimizer_galore_projector():
    """pytorch-optimizer's ``GaLoreProjector``, which its APOLLO uses with ``from_random_matrix=True``."""
    module = pytest.importorskip("pytorch_optimizer.optimizer.utils.galore",
                                 reason="pytorch-optimizer is not installed (pip install pytorch-optimizer)")
    return module.GaLoreProjector
