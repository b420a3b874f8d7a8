"""Every public optimizer in its main configurations, each in the modes it allows: the builds the
contract tests (``tests/optimizers/test_contract.py``) run, like torch's ``optim_db``.

A build makes its own model (a :class:`support.toy.ToyLM` sized so that 8- and 4-bit moments really are
quantized: the projected ``256×16`` / ``16×256`` moments and the plain embedding hold ≥ 4096
values) and its optimizer, with ``update_proj_gap`` 3 so that a few steps cross a refresh. An
``int8`` build stores every 2-D weight of the model in int8 first (:mod:`lowrank_optim.weights`:
the projected ``up``/``down`` and the plain embedding and head; for SST, whose ``up``/``down`` are
SST factors, the embedding and head)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from lowrank_optim import APOLLOAdamW, APOLLOMini, DCTProjAdam, GaLoreAdamW, GaLoreAdamW8bit, SSTAdamW, convert_to_sst
from lowrank_optim.weights import quantize_model_weights
from support.toy import make_model, projected_groups

RANK = 16
GAP = 3
MODES = {"standard": {}, "backward_projection": {"backward_projection": True},
         "step_in_backward": {"step_in_backward": True}}


def contract_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    return make_model(seed=seed, dtype=dtype, d=64, hidden=256)


@dataclass(frozen=True)
class Build:
    """``make(model, **keywords)`` builds the optimizer; ``sst``: the model is converted first;
    ``modes``: the in-backward modes it allows; ``torch_keywords``: it takes torch's common
    keywords (``foreach``, ``maximize``, ...) and has ``projection_summary()``; ``int8``: the
    model's 2-D weights are stored in int8 (module doc)."""

    make: Callable[..., torch.optim.Optimizer]
    modes: tuple[str, ...] = ("standard", "backward_projection", "step_in_backward")
    sst: bool = False
    torch_keywords: bool = True
    int8: bool = False

    def model(self, seed: int = 0) -> torch.nn.Module:
        model = contract_model(seed)
        if self.sst:
            model = convert_to_sst(model, rank=4, target_modules=("up", "down"))
        if self.int8:
            quantize_model_weights(model, None if self.sst else "all-linear", include_head=True,
                                   include_embeddings=True)
        return model


def _dct(**config):
    return lambda model, **kw: DCTProjAdam(model.named_parameters(), lr=3e-3, rank=RANK, update_proj_gap=GAP,
                                           weight_decay=0.01, **config, **kw)


def _galore(cls=GaLoreAdamW, **config):
    return lambda model, **kw: cls(projected_groups(model, RANK, update_proj_gap=GAP, scale=0.5, **config),
                                   lr=3e-3, weight_decay=0.01, **kw)


def _apollo(cls=APOLLOAdamW, **config):
    return lambda model, **kw: cls(model.named_parameters(), lr=3e-3, update_proj_gap=GAP, weight_decay=0.01,
                                   **{"rank": RANK, **config}, **kw)


APOLLO_MODES = ("standard", "step_in_backward")      # its update scales the full gradient: no backward projection


def _sst(model, **kw):
    return SSTAdamW(model.parameters(), lr=3e-3, weight_decay=0.01, update_interval=GAP, **kw)


BUILDS: dict[str, Build] = {
    # DCTProjAdam's defaults: the scaled residual needs each step's full gradient (no backward projection)
    "dct_defaults": Build(_dct(), modes=("standard", "step_in_backward")),
    "dct_paper": Build(_dct(residual="none")),          # the paper's DCT-Adam: no residual
    "dct_8bit": Build(_dct(residual="none", moment_bits=8)),
    "dct_4bit": Build(_dct(residual="none", moment_bits=4)),
    "dct_generated_basis": Build(_dct(residual="none", basis="generated")),
    # the model itself as params: its nn.Embedding known as a table (DCTProjAdam(model))
    "dct_given_the_model": Build(lambda model, **kw: DCTProjAdam(model, lr=3e-3, rank=RANK, update_proj_gap=GAP,
                                                                 weight_decay=0.01, residual="none", **kw)),
    "galore": Build(_galore()),
    "galore_randomized_svd": Build(_galore(projector="randomized_svd")),
    "galore_8bit": Build(_galore(GaLoreAdamW8bit)),
    "galore_adam_atan2": Build(_galore(update_rule="adam_atan2")),      # a second update rule (lowrank_optim.rules)
    "apollo": Build(_apollo(), modes=APOLLO_MODES),
    "apollo_mini": Build(_apollo(APOLLOMini, rank=1), modes=APOLLO_MODES),
    "apollo_dct_tensor": Build(_apollo(proj="dct", scale_type="tensor", moments="transport"), modes=APOLLO_MODES),
    "apollo_8bit": Build(_apollo(moment_bits=8), modes=APOLLO_MODES),
    "sst": Build(_sst, modes=("standard",), sst=True, torch_keywords=False),
    # int8 weights (issue #23): every optimizer writes W ← SR(a·Ŵ − b·ΔW) through its plan
    "dct_defaults_int8": Build(_dct(), modes=("standard", "step_in_backward"), int8=True),     # Fira residual
    "dct_8bit_int8": Build(_dct(residual="none", moment_bits=8), int8=True),
    "galore_int8": Build(_galore(), int8=True),
    "apollo_int8": Build(_apollo(), modes=APOLLO_MODES, int8=True),
    "apollo_mini_int8": Build(_apollo(APOLLOMini, rank=1), modes=APOLLO_MODES, int8=True),
    "sst_int8": Build(_sst, modes=("standard",), sst=True, torch_keywords=False, int8=True),
}

CASES = [(name, mode) for name, build in BUILDS.items() for mode in build.modes]
TORCH_KEYWORD_CASES = [(name, mode) for name, mode in CASES if BUILDS[name].torch_keywords]


def case_ids(cases: list[tuple[str, str]]) -> list[str]:
    return [f"{name}-{mode}" for name, mode in cases]
