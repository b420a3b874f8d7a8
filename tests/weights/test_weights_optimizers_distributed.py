"""The optimizers on int8 weights with two gloo ranks (half the batch each): the replicas stay bit
for bit equal (codes, scales, every other parameter and the optimizer state), because each
rank rounds with the same noise (the parameter's rounding generator: its name and step) on the
same all-reduced gradient. The weights do move. Under DDP (``init_sync=False``: its initial
broadcast would concatenate int8 and float parameters) for the standard loop, and with
``process_group`` for ``backward_projection`` and ``step_in_backward`` (the optimizer all-reduces
and broadcasts the first rank's weights, an int8 weight as its codes and scales, at
construction). FSDP2-sharded int8 weights are refused by name.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from support.distributed_harness import assert_identical, half, make_tall_wide, run_and_collect
from support.toy import batch, make_model, next_token_loss, projected_groups
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

from lowrank_optim import APOLLOMini, DCTProjAdam, GaLoreAdamW, SSTAdamW, convert_to_sst
from lowrank_optim.weights import quantize_model_weights

STEPS = 4


def _dct(model, **kw):
    return DCTProjAdam(model.named_parameters(), lr=3e-3, rank=16, update_proj_gap=3, weight_decay=0.01, **kw)


def _dct_lean(model, **kw):
    return DCTProjAdam(model.named_parameters(), lr=3e-3, rank=16, update_proj_gap=3, residual="none",
                       moment_bits=8, **kw)


def _galore(model, **kw):
    return GaLoreAdamW(projected_groups(model, 16, update_proj_gap=3, scale=0.5), lr=3e-3, weight_decay=0.01, **kw)


def _apollo_mini(model, **kw):
    return APOLLOMini(model.named_parameters(), lr=3e-3, update_proj_gap=3, **kw)


def _sst(model, **kw):
    return SSTAdamW(model.parameters(), lr=3e-3, update_interval=3, **kw)


# name: (optimizer, mode keywords, SST model); "ddp" when DDP all-reduces, else the optimizer's process_group
SETUPS = {
    "dct_ddp": (_dct, None, False),
    "galore_ddp": (_galore, None, False),
    "apollo_mini_ddp": (_apollo_mini, None, False),
    "sst_ddp": (_sst, None, True),
    "galore_backward_projection": (_galore, {"backward_projection": True}, False),
    "dct_8bit_step_in_backward": (_dct_lean, {"step_in_backward": True}, False),
    "apollo_mini_step_in_backward": (_apollo_mini, {"step_in_backward": True}, False),
}


def _model(setup: str, seed: int):
    model = make_model(seed=seed, d=64, hidden=256)
    if SETUPS[setup][2]:
        model = convert_to_sst(model, rank=4, target_modules=("up", "down"))
        quantize_model_weights(model, None, include_head=True, include_embeddings=True)
    else:
        quantize_model_weights(model, include_head=True, include_embeddings=True)
    return model


def _worker(rank: int, out_dir: str) -> None:
    states = {}
    for name, (make, mode, _) in SETUPS.items():
        if mode is None:
            model = _model(name, seed=0)           # every rank converts the same weights
            optimizer, wrapped = make(model), DistributedDataParallel(model, init_sync=False)
        else:
            model = _model(name, seed=rank)        # different: the optimizer broadcasts rank 0's
            optimizer, wrapped = make(model, process_group=dist.group.WORLD, **mode), model
        for step in range(STEPS):
            next_token_loss(wrapped, batch(step)[half(rank, rows=6)]).backward()
            optimizer.step()
            optimizer.zero_grad()
        states[name] = {"model": model.state_dict(), "optimizer": optimizer.state_dict()["state"]}
    torch.save(states, f"{out_dir}/states-{rank}.pt")


@pytest.fixture(scope="module")
def states(tmp_path_factory):
    return run_and_collect(_worker, tmp_path_factory.mktemp("int8_ddp"), ["states"])["states"]


@pytest.mark.parametrize("name", list(SETUPS))
def test_replicas_stay_bit_identical_and_the_int8_weights_move(states, name):
    first, second = states[0][name], states[1][name]
    assert_identical(first, second)
    start = _model(name, seed=0).state_dict()
    codes = [key for key in first["model"] if key.endswith(".int8_codes")]
    assert "head.weight.int8_codes" in codes and "embed.weight.int8_codes" in codes
    assert all(not torch.equal(first["model"][key], start[key]) for key in codes)


def _fsdp_worker(rank: int, out_dir: str) -> None:
    model = make_tall_wide()
    quantize_model_weights(model, include_head=True)
    fully_shard(model)
    try:
        DCTProjAdam(model.named_parameters(), lr=1e-2, rank=4)
    except ValueError as error:
        torch.save({"message": str(error)}, f"{out_dir}/error-{rank}.pt")


def test_fsdp2_sharded_int8_weights_are_refused_by_name(tmp_path):
    errors = run_and_collect(_fsdp_worker, tmp_path, ["error"])["error"]
    for error in errors:
        assert error["message"].startswith("parameter tall.weight (shape (15, 8)): an FSDP2-sharded int8 weight "
                                           "is not supported")
