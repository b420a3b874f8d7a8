"""FSDP2 (``fully_shard``, 2 gloo processes, half the batch each) against unsharded runs.

``DCTProjAdam`` on sharded weights selects from partial scores summed by one all-reduce; the test
checks that the selected indices equal the unsharded run's at every step and that parameters and
moments agree (float64: rounding only, < 1e-10). ``GaLoreAdamW`` gathers the gradient for its SVD.
The moments are DTensors sharded like their parameters; distributed checkpoints resume exactly,
also in one unsharded process. The HSDP run uses a replicate × shard mesh of 1 × 2.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed.checkpoint as dcp
from support.distributed_harness import WORLD_SIZE, half, make_tall_wide, regression_loss, run_and_collect
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from lowrank_optim import APOLLOAdamW, DCTProjAdam, GaLoreAdamW, SSTAdamW
from lowrank_optim.sharding import Sharding, projection_shard_placement

STEPS = 6
TOLERANCE = 1e-10
PROJECTED = ("tall.weight", "mid.weight", "wide.weight")


def _dct(model, **keys):
    """Every weight projected: a group with its own rank (the default rule would keep this toy
    net's first and last weight, which look like vocabulary matrices, in full AdamW)."""
    return DCTProjAdam([{"params": list(model.named_parameters()), "rank": 0.5}], lr=1e-2, update_proj_gap=2,
                       weight_decay=0.1, **keys)


def _dct_wide_right(model):
    """The unsharded twin of FSDP2's default layout: the row-sharded wide weight goes right."""
    wide = [model.wide.weight]
    rest = [p for p in model.parameters() if p is not model.wide.weight]
    return DCTProjAdam([{"params": wide, "proj_side": "right", "rank": 0.5}, {"params": rest, "rank": 0.5}],
                       lr=1e-2, update_proj_gap=2, weight_decay=0.1)


def _galore(model):
    weights = [model.tall.weight, model.mid.weight, model.wide.weight]
    rest = [p for p in model.parameters() if all(p is not w for w in weights)]
    return GaLoreAdamW([{"params": weights, "rank": 3, "update_proj_gap": 2, "scale": 0.5}, {"params": rest}],
                       lr=1e-2, weight_decay=0.1)


def _apollo(model, **keys):
    """Every weight projected (as :func:`_dct`); channel factors and the limiter reduce over shards."""
    return APOLLOAdamW([{"params": list(model.named_parameters()), "rank": 0.5}], lr=1e-2, update_proj_gap=2,
                       weight_decay=0.1, **keys)


def _apollo_tensor(model):
    return _apollo(model, scale_type="tensor", scale=128.0)


OPTIMIZERS = {"dct": _dct, "dct_wide_right": _dct_wide_right, "galore": _galore, "apollo": _apollo,
              "apollo_tensor": _apollo_tensor}
# Each sharded run: its optimizer, whether shards follow projection_shard_placement (else FSDP2's
# default, rows), and whether the mesh is HSDP's (replicate × shard, here 1 × 2) instead of 1-D.
SHARDED_RUNS = {"dct": ("dct", True, False), "dct_default_layout": ("dct", False, False),
                "galore": ("galore", True, False), "dct_hsdp": ("dct", True, True),
                "apollo": ("apollo", True, False), "apollo_tensor": ("apollo_tensor", True, False)}
UNSHARDED_TWIN = {"dct": "dct", "dct_default_layout": "dct_wide_right", "galore": "galore", "dct_hsdp": "dct",
                  "apollo": "apollo", "apollo_tensor": "apollo_tensor"}


def _shard(model, placement: bool, hsdp: bool = False):
    kwargs = {"shard_placement_fn": projection_shard_placement(WORLD_SIZE)} if placement else {}
    if hsdp:
        kwargs["mesh"] = init_device_mesh("cpu", (1, WORLD_SIZE), mesh_dim_names=("replicate", "shard"))
    for layer in (model.tall, model.mid, model.wide):
        fully_shard(layer, **kwargs)
    return fully_shard(model, **kwargs)


def _full(tensor):
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _full_params(model) -> dict:
    """Every parameter, whole (gathered from the shards), detached copies."""
    return {name: _full(param.detach()).clone() for name, param in model.named_parameters()}


def _close(got, expected) -> bool:
    return bool((got - expected).abs().max() <= TOLERANCE * expected.abs().max())


def _train(model, optimizer, part=slice(None), steps=range(STEPS), record=None):
    for step in steps:
        optimizer.zero_grad(set_to_none=True)
        regression_loss(model, step, part).backward()
        optimizer.step()
        if record is not None:
            record.append({name: state["proj_indices"].clone() for name, state in _named_state(model, optimizer)
                           if "proj_indices" in state})


def _named_state(model, optimizer):
    names = {param: name for name, param in model.named_parameters()}
    return [(names[param], state) for param, state in optimizer.state.items()]


def _fsdp_worker(rank: int, out_dir: str) -> None:
    for run, (optimizer_name, placement, hsdp) in SHARDED_RUNS.items():
        model = _shard(make_tall_wide().double(), placement, hsdp)
        optimizer = OPTIMIZERS[optimizer_name](model)
        indices = []
        _train(model, optimizer, half(rank), record=indices)
        moments = {}
        for name, state in _named_state(model, optimizer):
            param = dict(model.named_parameters())[name]
            moments[name] = {
                "exp_avg": _full(state["exp_avg"]),
                "sharded_like_param": isinstance(state["exp_avg"], DTensor)
                and state["exp_avg"].placements == param.placements,
            }
        result = {"params": _full_params(model), "indices": indices,
                  "moments": moments, "placements": {n: p.placements for n, p in model.named_parameters()}}
        torch.save(result, f"{out_dir}/{run}-{rank}.pt")


@pytest.fixture(scope="module")
def fsdp_results(tmp_path_factory):
    return run_and_collect(_fsdp_worker, tmp_path_factory.mktemp("fsdp"), SHARDED_RUNS, weights_only=False)


def _unsharded(run: str):
    model = make_tall_wide().double()
    optimizer = OPTIMIZERS[UNSHARDED_TWIN[run]](model)
    indices = []
    _train(model, optimizer, record=indices)
    return model, optimizer, indices


def test_projection_placement_shards_wide_weights_by_columns(fsdp_results):
    placements = fsdp_results["dct"][0]["placements"]
    assert placements["wide.weight"] == (Shard(1),)
    assert placements["tall.weight"] == placements["mid.weight"] == placements["wide.bias"] == (Shard(0),)
    assert fsdp_results["dct_default_layout"][0]["placements"]["wide.weight"] == (Shard(0),)
    assert fsdp_results["dct_hsdp"][0]["placements"]["wide.weight"] == (Replicate(), Shard(1))


@pytest.mark.parametrize("run", ["dct", "dct_default_layout", "dct_hsdp"])
def test_sharded_dct_selects_the_unsharded_indices_every_step(fsdp_results, run):
    _, _, expected = _unsharded(run)
    for rank in range(WORLD_SIZE):
        got = fsdp_results[run][rank]["indices"]
        assert len(got) == STEPS
        for step_got, step_expected in zip(got, expected):
            assert step_got.keys() == step_expected.keys() == set(PROJECTED)
            for name in PROJECTED:
                assert torch.equal(step_got[name], step_expected[name]), (run, rank, name)


@pytest.mark.parametrize("run", SHARDED_RUNS)
def test_sharded_run_matches_unsharded_parameters_and_moments(fsdp_results, run):
    model, optimizer, _ = _unsharded(run)
    result = fsdp_results[run][0]
    for name, param in model.named_parameters():
        got = result["params"][name]
        assert _close(got, param.detach()), name
    for name, state in _named_state(model, optimizer):
        got = result["moments"][name]
        assert got["sharded_like_param"], name
        assert got["exp_avg"].shape == state["exp_avg"].shape, name
        assert _close(got["exp_avg"], state["exp_avg"]), name


def test_default_layout_projects_the_row_sharded_wide_weight_on_the_right(fsdp_results):
    assert fsdp_results["dct"][0]["moments"]["wide.weight"]["exp_avg"].shape == (3, 16)             # left
    assert fsdp_results["dct_default_layout"][0]["moments"]["wide.weight"]["exp_avg"].shape == (6, 3)  # right


def _explicit_side_worker(rank: int, out_dir: str) -> None:
    model = _shard(make_tall_wide().double(), placement=False)
    before = _full_params(model)
    optimizer = None
    try:                    # refused when the optimizer resolves the parameter's side: at construction
        optimizer = _dct(model, proj_side="left")
        regression_loss(model, 0, half(rank)).backward()
        optimizer.step()
        message = None
    except ValueError as error:
        message = str(error)
    after = _full_params(model)
    unchanged = all(torch.equal(after[n], before[n]) for n in before)
    try:
        SSTAdamW(model.named_parameters())
        sst_message = None
    except ValueError as error:
        sst_message = str(error)
    mesh = init_device_mesh("cpu", (1, WORLD_SIZE))
    two_shards = distribute_tensor(torch.zeros(4, 4), mesh, [Shard(0), Shard(1)])
    try:
        Sharding.of(two_shards, "parameter tp.weight")
        layout_message = None
    except ValueError as error:
        layout_message = str(error)
    torch.save({"message": message, "unchanged": unchanged, "state": 0 if optimizer is None else len(optimizer.state),
                "sst_message": sst_message, "layout_message": layout_message}, f"{out_dir}/explicit-{rank}.pt")


def test_unsupported_sides_optimizers_and_layouts_are_errors(tmp_path):
    for result in run_and_collect(_explicit_side_worker, tmp_path, ["explicit"])["explicit"]:
        assert "tall.weight" in result["message"] and "'left'" in result["message"]
        assert "Shard(dim=0)" in result["message"]
        assert result["unchanged"] and result["state"] == 0
        assert "parameter tall.weight is sharded" in result["sst_message"]
        assert "parameter tp.weight: placements (Shard(dim=0), Shard(dim=1)) are not supported" in \
            result["layout_message"]


def _checkpoint_worker(rank: int, out_dir: str) -> None:
    model = _shard(make_tall_wide().double(), placement=True)
    optimizer = _dct(model)
    _train(model, optimizer, half(rank), steps=range(3))
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=f"{out_dir}/checkpoint")
    _train(model, optimizer, half(rank), steps=range(3, STEPS))
    uninterrupted = _full_params(model)

    resumed = _shard(make_tall_wide(seed=1).double(), placement=True)
    resumed_optimizer = _dct(resumed)
    model_state, optimizer_state = get_state_dict(resumed, resumed_optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=f"{out_dir}/checkpoint")
    set_state_dict(resumed, resumed_optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    dtypes = {name: {key: value.dtype for key, value in s.items() if isinstance(value, torch.Tensor)}
              for name, s in _named_state(resumed, resumed_optimizer)}
    steps = {name: s["step"] for name, s in _named_state(resumed, resumed_optimizer)}
    _train(resumed, resumed_optimizer, half(rank), steps=range(3, STEPS))
    torch.save({"uninterrupted": uninterrupted, "dtypes": dtypes, "steps": steps,
                "resumed": _full_params(resumed)},
               f"{out_dir}/resume-{rank}.pt")


@pytest.fixture(scope="module")
def checkpoint_run(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("checkpoint")
    return out_dir, run_and_collect(_checkpoint_worker, out_dir, ["resume"])["resume"]


def test_distributed_checkpoint_resume_equals_uninterrupted(checkpoint_run):
    for rank, result in enumerate(checkpoint_run[1]):
        for name, expected in result["uninterrupted"].items():
            assert torch.equal(result["resumed"][name], expected), (rank, name)
        assert set(result["steps"].values()) == {3}
        for name in PROJECTED:
            assert result["dtypes"][name]["proj_indices"] == torch.int64
            assert result["dtypes"][name]["exp_avg"] == torch.float64


def test_a_sharded_checkpoint_resumes_in_one_unsharded_process(checkpoint_run):
    """DCP reshards: the 2-rank checkpoint loads into a plain model and optimizer (no process group)."""
    out_dir, results = checkpoint_run
    model = make_tall_wide(seed=1).double()
    optimizer = _dct(model)
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=out_dir / "checkpoint")
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    _train(model, optimizer, steps=range(3, STEPS))
    expected = results[0]["uninterrupted"]
    for name, param in model.named_parameters():
        assert _close(param.detach(), expected[name]), name


def _nonfinite_worker(rank: int, out_dir: str) -> None:
    outcomes = {}
    for skip in (False, True):
        model = _shard(make_tall_wide().double(), placement=True)
        optimizer = DCTProjAdam([{"params": list(model.parameters()), "rank": 0.5}], skip_nonfinite=skip)
        before = _full_params(model)
        regression_loss(model, 0, half(rank)).backward()
        if rank == 1:      # only this rank's shard of one weight is non-finite
            model.tall.weight.grad.to_local()[0, 0] = float("inf")
        try:
            optimizer.step()
            outcome = "skipped" if optimizer.skipped_steps == 1 else "stepped"
        except FloatingPointError:
            outcome = "raised"
        after = _full_params(model)
        unchanged = all(torch.equal(after[n], before[n]) for n in before)
        outcomes[skip] = (outcome, unchanged, len(optimizer.state))
    torch.save(outcomes, f"{out_dir}/nonfinite-{rank}.pt")


def test_a_non_finite_shard_stops_every_rank(tmp_path):
    for rank, outcomes in enumerate(run_and_collect(_nonfinite_worker, tmp_path, ["nonfinite"])["nonfinite"]):
        assert outcomes == {False: ("raised", True, 0), True: ("skipped", True, 0)}, rank
