"""8- and 4-bit moments under FSDP2 (2 gloo processes) against one unsharded process.

The model (:class:`LowBitNet`) has one weight per storage layout, each large enough to be quantized
(4096 values or more): ``tall`` 1023×16 projected on the right (an ``m×r`` moment of 1023 rows
split **unevenly** 512/511 over the ranks), ``wide`` 8×1024 projected on the left (``r×n``, columns
split 512/512 by :func:`~lowrank_optim.sharding.projection_shard_placement`) and ``plain`` 256×18
in a plain group (AdamW, ``"flat"``, rows 128/128: 2304 values per rank, 9 blocks of 256). Every
rank computes the loss of the whole batch, so the gradient each rank's shard receives is bit for
bit the unsharded gradient (two equal halves summed and halved: exact), and every difference would
come from the optimizer.

Tolerances: none. The blocks are the unsharded blocks (shard boundaries at rows 512 fall on blocks
of 256 and 128), so the codes and scales, gathered, equal the unsharded ones byte for byte, and so
do the weights, at both bit widths, for DCTProjAdam, GaLoreAdamW, APOLLOAdamW and the plain AdamW
path, on a 1-D and (DCT, 4 bits) an HSDP mesh, and through a DCP checkpoint resumed on 2 ranks,
on 1 process (2 → 1), and from 1 process on 2 ranks (1 → 2). Two settings keep every reduction
out of the update so that exact equality can be asked: the DCT runs use ``residual="none"`` and
APOLLO ``norm_growth_limit=None``, because the scaled residual's norm and the limiter's norm are
sums over the shards (all-reduced, in another order than one process adds them: equal up to
rounding, as tests/modes/test_fsdp.py measures for float moments).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from support.distributed_harness import WORLD_SIZE, run_and_collect
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard

from lowrank_optim import APOLLOAdamW, DCTProjAdam, GaLoreAdamW
from lowrank_optim.moments import QUANTIZED_KEYS
from lowrank_optim.sharding import projection_shard_placement

STEPS = 6
RESUME_AT = 3
BITS = (8, 4)
LAYERS = {"tall": (16, 1023), "wide": (1024, 8), "plain": (18, 256)}     # nn.Linear(in, out)
QUANTIZED = ("tall.weight", "wide.weight", "plain.weight")


class LowBitNet(nn.Module):
    """Three independent linear maps, each regressed on its own inputs (module doc)."""

    def __init__(self) -> None:
        super().__init__()
        for name, (fan_in, fan_out) in LAYERS.items():
            setattr(self, name, nn.Linear(fan_in, fan_out))

    def forward(self, inputs: dict) -> torch.Tensor:
        return sum(nn.functional.mse_loss(getattr(self, name)(x), target) for name, (x, target) in inputs.items())


def make_net(seed: int = 0) -> LowBitNet:
    torch.manual_seed(seed)
    return LowBitNet().double()


def batch(step: int) -> dict:
    generator = torch.Generator().manual_seed(700 + step)
    return {name: (torch.randn(4, fan_in, generator=generator, dtype=torch.float64),
                   torch.randn(4, fan_out, generator=generator, dtype=torch.float64))
            for name, (fan_in, fan_out) in LAYERS.items()}


def _groups(model: LowBitNet) -> list[dict]:
    rest = [p for name, p in model.named_parameters() if name not in ("tall.weight", "wide.weight")]
    return [{"params": [model.tall.weight], "rank": 8}, {"params": [model.wide.weight], "rank": 4},
            {"params": rest, "rank": None}]


OPTIMIZERS = {
    "dct": lambda model, bits: DCTProjAdam(_groups(model), lr=1e-2, update_proj_gap=2, weight_decay=0.1,
                                           residual="none", moment_bits=bits),
    "galore": lambda model, bits: GaLoreAdamW(_groups(model), lr=1e-2, update_proj_gap=2, weight_decay=0.1,
                                              moment_bits=bits),
    "apollo": lambda model, bits: APOLLOAdamW(_groups(model), lr=1e-2, update_proj_gap=2, weight_decay=0.1,
                                              norm_growth_limit=None, moment_bits=bits),
}
RUNS = [f"{name}-{bits}" for name in OPTIMIZERS for bits in BITS]
HSDP_RUN = "dct-4"          # also run on an HSDP mesh (replicate × shard, 1 × 2)


def _build(run: str, model: LowBitNet):
    name, bits = run.rsplit("-", 1)
    return OPTIMIZERS[name](model, int(bits))


def _shard(model: LowBitNet, mesh=None) -> LowBitNet:
    for name in LAYERS:
        fully_shard(getattr(model, name), shard_placement_fn=projection_shard_placement(WORLD_SIZE), mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _train(model, optimizer, steps) -> None:
    for step in steps:
        optimizer.zero_grad(set_to_none=True)
        model(batch(step)).backward()
        optimizer.step()


def _full(value):
    return value.full_tensor() if isinstance(value, DTensor) else value


def _snapshot(model, optimizer) -> dict:
    """Every parameter and state tensor, whole, by parameter name; and whether each quantized
    state tensor is a DTensor placed like its parameter."""
    names = {param: name for name, param in model.named_parameters()}
    state = {names[param]: {key: _full(value).clone() if isinstance(value, torch.Tensor) else value
                            for key, value in entry.items()} for param, entry in optimizer.state.items()}
    placed = {names[param]: all(isinstance(entry[key], DTensor) and entry[key].placements == param.placements
                                for key in QUANTIZED_KEYS)
              for param, entry in optimizer.state.items() if names[param] in QUANTIZED}
    params = {name: _full(param.detach()).clone() for name, param in model.named_parameters()}
    return {"params": params, "state": state, "placed": placed}


def _load(model, optimizer, checkpoint: Path) -> None:
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=checkpoint)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def _save(model, optimizer, checkpoint: Path) -> None:
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=checkpoint)


def _worker(rank: int, out_dir: str) -> None:
    """Per run: train sharded with a checkpoint at RESUME_AT; resume it on 2 ranks; resume the
    unsharded checkpoint the test wrote (1 → 2)."""
    out = Path(out_dir)
    results = {}
    for run in RUNS:
        model = _shard(make_net())
        optimizer = _build(run, model)
        _train(model, optimizer, range(RESUME_AT))
        _save(model, optimizer, out / f"sharded-{run}")
        _train(model, optimizer, range(RESUME_AT, STEPS))
        resumed = _shard(make_net(seed=1))
        resumed_optimizer = _build(run, resumed)
        _load(resumed, resumed_optimizer, out / f"sharded-{run}")
        _train(resumed, resumed_optimizer, range(RESUME_AT, STEPS))
        from_one = _shard(make_net(seed=1))
        from_one_optimizer = _build(run, from_one)
        _load(from_one, from_one_optimizer, out / f"unsharded-{run}")
        _train(from_one, from_one_optimizer, range(RESUME_AT, STEPS))
        results[run] = {"uninterrupted": _snapshot(model, optimizer), "resumed": _snapshot(resumed, resumed_optimizer),
                        "from_one": _snapshot(from_one, from_one_optimizer)}
    hsdp = _shard(make_net(), init_device_mesh("cpu", (1, WORLD_SIZE), mesh_dim_names=("replicate", "shard")))
    hsdp_optimizer = _build(HSDP_RUN, hsdp)
    _train(hsdp, hsdp_optimizer, range(STEPS))
    results["hsdp"] = _snapshot(hsdp, hsdp_optimizer)
    results["refusals"] = _refusals()
    torch.save(results, f"{out_dir}/lowbit-{rank}.pt")


# Layouts whose shards would cut the unsharded blocks, on FSDP2's default rows: (module, its group).
REFUSED = {
    "rows_per_rank": (lambda: nn.Linear(16, 1000), {"rank": 8}),      # 500 rows per rank, blocks of 256
    "uneven_flat": (lambda: nn.Linear(256, 17), {"rank": None}),      # rows 9/8 of 256 values each
    "flat_by_columns": (lambda: nn.Linear(256, 16), {"rank": None}),  # Shard(1) below
}


def _by_columns(param: torch.Tensor) -> Shard:
    return Shard(1 if param.ndim == 2 else 0)


def _refusals() -> dict:
    """The error each refused layout raises at construction (None: built), and whether a
    ``moment_block_size`` dividing the rows per rank, or float moments, are accepted instead."""
    messages = {}
    for case, (build, group) in REFUSED.items():
        torch.manual_seed(0)
        layer = build()
        fully_shard(layer, shard_placement_fn=_by_columns if case == "flat_by_columns" else None)
        try:
            DCTProjAdam([{"params": [layer.weight], **group}], moment_bits=8)
            messages[case] = None
        except ValueError as error:
            messages[case] = str(error)
        DCTProjAdam([{"params": [layer.weight], **group}])                         # float moments: built
    divisible = fully_shard(nn.Linear(16, 1008))                                   # 504 rows per rank
    DCTProjAdam([{"params": [divisible.weight], "rank": 8}], moment_bits=8, moment_block_size=8)
    return messages


def _unsharded(run: str, steps=range(STEPS), checkpoint: Path | None = None, load: Path | None = None):
    model = make_net() if load is None else make_net(seed=1)
    optimizer = _build(run, model)
    if load is not None:
        _load(model, optimizer, load)
    for step in steps:
        _train(model, optimizer, [step])
        if checkpoint is not None and step == RESUME_AT - 1:
            _save(model, optimizer, checkpoint)
    return model, optimizer


@pytest.fixture(scope="module")
def lowbit_run(tmp_path_factory):
    """The unsharded checkpoints (one process, no process group) first, then the two ranks."""
    out_dir = tmp_path_factory.mktemp("fsdp_lowbit")
    expected = {}
    for run in RUNS:
        expected[run] = _snapshot(*_unsharded(run, checkpoint=out_dir / f"unsharded-{run}"))
    results = run_and_collect(_worker, out_dir, ["lowbit"], weights_only=False)["lowbit"]
    return out_dir, expected, results


def _assert_equal(got: dict, expected: dict, what: str) -> None:
    assert got["params"].keys() == expected["params"].keys()
    for name, value in expected["params"].items():
        assert torch.equal(got["params"][name], value), (what, name)
    assert got["state"].keys() == expected["state"].keys()
    for name, entry in expected["state"].items():
        assert got["state"][name].keys() == entry.keys(), (what, name)
        for key, value in entry.items():
            same = torch.equal(got["state"][name][key], value) if isinstance(value, torch.Tensor) else \
                got["state"][name][key] == value
            assert same, (what, name, key)


@pytest.mark.parametrize("run", RUNS)
def test_sharded_low_bit_run_equals_the_unsharded_run_byte_for_byte(lowbit_run, run):
    """Parameters, and codes and scales gathered from the shards, equal one process's (the
    precision does not depend on the mesh)."""
    _, expected, results = lowbit_run
    for name in QUANTIZED:
        assert {"exp_avg_codes", "exp_avg_sq_scales"} <= expected[run]["state"][name].keys(), name
    for rank in range(WORLD_SIZE):
        got = results[rank][run]["uninterrupted"]
        assert got["placed"] == dict.fromkeys(QUANTIZED, True), rank
        _assert_equal(got, expected[run], f"rank {rank}")


def test_an_hsdp_mesh_stores_the_unsharded_bytes(lowbit_run):
    _, expected, results = lowbit_run
    for rank in range(WORLD_SIZE):
        got = results[rank]["hsdp"]
        assert got["placed"] == dict.fromkeys(QUANTIZED, True), rank
        _assert_equal(got, expected[HSDP_RUN], f"rank {rank}")


@pytest.mark.parametrize("run", RUNS)
def test_a_sharded_checkpoint_resumes_bit_identically_on_two_ranks(lowbit_run, run):
    _, _, results = lowbit_run
    for rank in range(WORLD_SIZE):
        got = results[rank][run]["resumed"]
        assert got["placed"] == dict.fromkeys(QUANTIZED, True), rank
        _assert_equal(got, results[rank][run]["uninterrupted"], f"rank {rank}")


@pytest.mark.parametrize("run", RUNS)
def test_an_unsharded_checkpoint_resumes_bit_identically_on_two_ranks(lowbit_run, run):
    """1 → 2: DCP splits the one process's codes and scales along the parameters' shards."""
    _, expected, results = lowbit_run
    for rank in range(WORLD_SIZE):
        got = results[rank][run]["from_one"]
        assert got["placed"] == dict.fromkeys(QUANTIZED, True), rank
        _assert_equal(got, expected[run], f"rank {rank}")


def test_shard_layouts_that_would_cut_blocks_are_refused_by_name(lowbit_run):
    """Refused at construction, naming the parameter, bits, placement and the numbers; no block
    size is adapted to the mesh. A moment_block_size that divides the rows per rank is built."""
    _, _, results = lowbit_run
    for rank in range(WORLD_SIZE):
        messages = results[rank]["refusals"]
        assert messages["rows_per_rank"].startswith("parameter param_groups[0]['params'][0] (shape (1000, 16)): "
                                                    "moment_bits=8 with placements (Shard(dim=0),) over 2 ranks: "
                                                    "500 rows per rank (500 values of a slot) are not a multiple "
                                                    "of moment_block_size=256")
        assert "(shape (17, 256))" in messages["uneven_flat"]
        assert "its rows split [9, 8] over 2 ranks, but its codes of shape (4352,) would split [2176, 2176]" in \
            messages["uneven_flat"]
        assert "(shape (16, 256)): moment_bits=8 with placements (Shard(dim=1),)" in messages["flat_by_columns"]
        assert "'flat' moment of shape (16, 256) is sharded along dim 1" in messages["flat_by_columns"]


@pytest.mark.parametrize("run", RUNS)
def test_a_sharded_checkpoint_resumes_bit_identically_in_one_process(lowbit_run, run):
    """2 → 1: DCP joins the shards' codes and scales; the dtypes come back as saved."""
    out_dir, expected, _ = lowbit_run
    model, optimizer = _unsharded(run, steps=range(RESUME_AT, STEPS), load=out_dir / f"sharded-{run}")
    assert optimizer.state[model.tall.weight]["exp_avg_codes"].dtype == torch.uint8
    assert optimizer.state[model.tall.weight]["exp_avg_scales"].dtype == torch.float32
    _assert_equal(_snapshot(model, optimizer), expected[run], "2 -> 1")
