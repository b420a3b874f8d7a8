"""Every optimizer of the library under DDP (2 gloo processes, half the batch each).

Two ranks with half a batch each must reach the parameters of one process with the whole batch,
and every rank
must hold bitwise the same optimizer state: projections are functions of the all-reduced
gradient, SST draws from identically seeded generators, SLTrain supports are seeded by name.

The models run in float64: the all-reduced mean of two half-batch gradients differs from the
whole-batch gradient by rounding only, and Adam's division by √v amplifies the rounding of tiny
gradient entries (in fp32 SST's singular vectors drift 5e-5 apart after 6 steps in one process
that averages two half-batch gradients exactly as DDP does). In float64 that is < 1e-10.
"""
from __future__ import annotations

import copy

import pytest
import torch
from support.distributed_harness import assert_identical, half, run_and_collect
from support.toy import batch, make_model, max_rel_diff, projected_groups
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lowrank_optim import (
    APOLLOAdamW,
    APOLLOMini,
    DCTProjAdam,
    GaLoreAdamW,
    GaLoreAdamW8bit,
    SSTAdamW,
    available_optimizers,
    convert_to_sltrain,
    convert_to_sst,
    create_optimizer,
)

STEPS = 6
TOLERANCE = 1e-10


def _adamw(model):
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


def _galore(model):
    return model, GaLoreAdamW(projected_groups(model, rank=4, update_proj_gap=2, scale=0.5), lr=1e-2,
                              weight_decay=0.1)


def _dct(model):
    return model, DCTProjAdam(model.named_parameters(), lr=1e-2, update_proj_gap=2, weight_decay=0.1)


def _sst(model):
    model = convert_to_sst(model, rank=4, target_modules=("up", "down"))
    return model, SSTAdamW(model.parameters(), lr=1e-2, update_interval=2, resvd_interval=1)


def _sltrain(model):
    model = convert_to_sltrain(model, rank=4, density=0.2, target_modules=("up", "down"))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def _galore8bit(model):
    return model, GaLoreAdamW8bit(projected_groups(model, rank=4, update_proj_gap=2, scale=0.5), lr=1e-2)


def _dct4bit(model):
    return model, DCTProjAdam(model.named_parameters(), lr=1e-2, update_proj_gap=2, rank=4, moment_bits=4)


def _apollo(model):
    return model, APOLLOAdamW(model.named_parameters(), lr=1e-2, rank=4, update_proj_gap=2, weight_decay=0.1)


def _apollo_mini(model):
    return model, APOLLOMini(model.named_parameters(), lr=1e-3, update_proj_gap=2, weight_decay=0.1)


def _registered(name):
    return lambda model: (model, create_optimizer(name, model.parameters(), lr=1e-2, weight_decay=0.1))


# The library's plain AdamW path: no projected weight. A tuple: every rank must train the setups in
# the same order (DDP pairs collectives by order; a set's order changes with each process's hash seed).
PLAIN_LOW_BIT = ("adamw8bit", "adamw4bit")
SETUPS = {"adamw": _adamw, "galore_adamw": _galore, "dct_adamw": _dct, "sst_adamw": _sst, "sltrain": _sltrain,
          "galore_adamw8bit": _galore8bit, "dct_adamw_4bit": _dct4bit, "apollo_adamw": _apollo,
          "apollo_mini": _apollo_mini, **{n: _registered(n) for n in PLAIN_LOW_BIT}}
# Quantized moments: wide enough that the embedding, head and projected moments (1100×4, 4×1100)
# reach the 4096 values below which moments stay in float.
LOW_BIT = {"galore_adamw8bit", "dct_adamw_4bit", *PLAIN_LOW_BIT}
LOW_BIT_MODEL = dict(vocab=300, d=16, hidden=1100)
# A code that rounds the other way after the rank-averaged gradient's last-bit difference moves a
# moment by one quantization step, so the half-batch twin agrees to the step's size, not to 1e-10.
LOW_BIT_TOLERANCE = 1e-3


def _model(name):
    return make_model(seed=3, dtype=torch.float64, **(LOW_BIT_MODEL if name in LOW_BIT else {}))


def _loss(model: nn.Module, step: int, part: slice = slice(None)) -> torch.Tensor:
    tokens = batch(step)[part]
    logits = model(tokens[:, :-1])
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, part: slice = slice(None)) -> None:
    for step in range(STEPS):
        optimizer.zero_grad(set_to_none=True)
        _loss(model, step, part).backward()
        optimizer.step()


def _ddp_worker(rank: int, out_dir: str) -> None:
    for name, setup in SETUPS.items():
        model, optimizer = setup(_model(name))
        _train(DistributedDataParallel(model), optimizer, half(rank, rows=6))
        torch.save({"params": model.state_dict(), "optimizer": optimizer.state_dict()}, f"{out_dir}/{name}-{rank}.pt")


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    return run_and_collect(_ddp_worker, tmp_path_factory.mktemp("ddp"), SETUPS)


def test_setups_cover_every_registered_optimizer():
    assert set(available_optimizers()) <= set(SETUPS)


@pytest.mark.parametrize("name", SETUPS)
def test_two_ranks_with_half_batches_match_one_process(ddp_results, name):
    model, optimizer = SETUPS[name](_model(name))
    _train(model, optimizer)
    distributed = copy.deepcopy(model)
    distributed.load_state_dict(ddp_results[name][0]["params"])
    assert max_rel_diff(distributed, model) < (LOW_BIT_TOLERANCE if name in LOW_BIT else TOLERANCE)


@pytest.mark.parametrize("name", sorted(LOW_BIT))
def test_low_bit_setups_really_hold_quantized_moments(ddp_results, name):
    state = ddp_results[name][0]["optimizer"]["state"]
    assert any("exp_avg_codes" in entry and "proj_indices" not in entry and "proj_matrix" not in entry
               for entry in state.values())                                   # plain (embedding, head)
    if name in PLAIN_LOW_BIT:
        assert not any("proj_indices" in entry or "proj_matrix" in entry for entry in state.values())
        return
    assert any("exp_avg_codes" in entry and ("proj_indices" in entry or "proj_matrix" in entry)
               for entry in state.values())                                   # projected


@pytest.mark.parametrize("name", SETUPS)
def test_every_rank_holds_the_same_state(ddp_results, name):
    first, second = ddp_results[name]
    assert_identical(first, second)
