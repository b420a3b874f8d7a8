"""``step_in_backward=True`` under FSDP2 (``fully_shard``, 2 gloo processes, half the batch each)
against the standard loop under FSDP2.

FSDP2 runs a sharded parameter's post-accumulate-grad hooks right after its reduce-scatter, with
``.grad`` the reduced shard, so each hook steps that shard exactly as ``step()`` would. The
optimizers (DCTProjAdam with its scaled residual and refreshes every 2 steps, GaLoreAdamW,
APOLLO-Mini, DCTProjAdam with 8-bit moments) agree with the standard loop to float64 rounding:
TOLERANCE = 1e-12 relative, because a plain parameter's step in its hook is a single-tensor AdamW
while ``step()`` runs the group's multi-tensor one (the same math, possibly another operation
order). The refresh collectives (score all-reduces, GaLore's gather and broadcast, APOLLO's norm
all-reduces) run inside the hooks, in the same order on every rank. Also checked: the reduced
gradients' storage is freed in the hooks (``.grad`` holds storage-less stand-ins placed like the
parameter, ``None`` after ``step()``); the global gradient norm is still readable, clipping is
refused; accumulation through ``set_requires_gradient_sync(False)``; a DCP checkpoint resumes bit
for bit; and the refused combinations.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from support.distributed_harness import WORLD_SIZE, half, make_tall_wide, regression_loss, run_and_collect
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.multiprocessing.reductions import StorageWeakRef

from lowrank_optim import APOLLOMini, DCTProjAdam, GaLoreAdamW, clip_grad_norm_
from lowrank_optim.gradient_stand_ins import SteppedGradient
from lowrank_optim.sharding import projection_shard_placement

STEPS = 6
RESUME_AT = 3
TOLERANCE = 1e-12


def _dct(model, **keys):
    return DCTProjAdam([{"params": list(model.named_parameters()), "rank": 0.5}], lr=1e-2, update_proj_gap=2,
                       weight_decay=0.1, **keys)


def _galore(model, **keys):
    weights = [model.tall.weight, model.mid.weight, model.wide.weight]
    rest = [p for p in model.parameters() if all(p is not w for w in weights)]
    return GaLoreAdamW([{"params": weights, "rank": 3, "update_proj_gap": 2, "scale": 0.5}, {"params": rest}],
                       lr=1e-2, weight_decay=0.1, **keys)


def _apollo_mini(model, **keys):
    return APOLLOMini([{"params": list(model.named_parameters()), "rank": 1}], lr=1e-2, update_proj_gap=2,
                      weight_decay=0.1, **keys)


class LowBitNet(nn.Module):
    """``tall`` 1024×16 projected on the right (an ``m×r`` 8-bit moment of 1024 rows, 512 per rank:
    whole blocks) and ``plain`` 256×18 in a plain group (flat 8-bit moments, 2304 values per rank)."""

    def __init__(self) -> None:
        super().__init__()
        self.tall, self.plain = nn.Linear(16, 1024), nn.Linear(18, 256)

    def forward(self, step: int, part: slice) -> torch.Tensor:
        generator = torch.Generator().manual_seed(900 + step)
        loss = 0.0
        for layer in (self.tall, self.plain):
            x = torch.randn(8, layer.in_features, generator=generator, dtype=torch.float64)
            target = torch.randn(8, layer.out_features, generator=generator, dtype=torch.float64)
            loss = loss + nn.functional.mse_loss(layer(x[part]), target[part])
        return loss


def _dct_8bit(model, **keys):
    rest = [p for name, p in model.named_parameters() if name != "tall.weight"]
    return DCTProjAdam([{"params": [model.tall.weight], "rank": 8}, {"params": rest, "rank": None}], lr=1e-2,
                       update_proj_gap=2, weight_decay=0.1, moment_bits=8, **keys)


# name: (model factory, optimizer factory)
RUNS = {"dct": (make_tall_wide, _dct), "galore": (make_tall_wide, _galore),
        "apollo_mini": (make_tall_wide, _apollo_mini), "dct_8bit": (LowBitNet, _dct_8bit)}


def _sharded(factory, seed: int = 0):
    torch.manual_seed(seed)
    model = factory().double() if factory is LowBitNet else factory(seed).double()
    placement = projection_shard_placement(WORLD_SIZE)
    for module in model.children():
        fully_shard(module, shard_placement_fn=placement)
    return fully_shard(model, shard_placement_fn=placement)


def _loss(model, step: int, rank: int):
    return model(step, half(rank)) if isinstance(model, LowBitNet) else regression_loss(model, step, half(rank))


def _full_params(model) -> dict:
    return {name: param.detach().full_tensor().clone() for name, param in model.named_parameters()}


def _train(model, optimizer, rank: int, steps, micro_batches: int = 1, after_backward=None) -> None:
    """Each step: ``micro_batches`` backward passes, FSDP2's gradient sync only on the last."""
    for step in steps:
        for micro in range(micro_batches):
            model.set_requires_gradient_sync(micro == micro_batches - 1)
            _loss(model, step * micro_batches + micro, rank).backward()
        if after_backward is not None:
            after_backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def _track_storages(model) -> list:
    """Weak references to every reduced gradient's storage, taken by a hook registered before the
    optimizer's (so it sees ``.grad`` as FSDP2 produced it)."""
    seen = []
    for param in model.parameters():
        param.register_post_accumulate_grad_hook(
            lambda p: seen.append(StorageWeakRef(p.grad.to_local().untyped_storage())))
    return seen


def _run_pair(name: str, rank: int, micro_batches: int = 1) -> dict:
    factory, build = RUNS[name]
    standard = _sharded(factory)
    _train(standard, build(standard), rank, range(STEPS), micro_batches)
    model = _sharded(factory)
    storages = _track_storages(model)
    optimizer = build(model, step_in_backward=True)
    checks = []

    def after_backward():
        grads = [p.grad for p in model.parameters()]
        checks.append({"stand_ins": all(isinstance(g, DTensor) and isinstance(g._local_tensor, SteppedGradient)
                                        and g.placements == p.placements for g, p in zip(grads, model.parameters())),
                       "freed": bool(storages) and all(s.expired() for s in storages)})
        storages.clear()

    _train(model, optimizer, rank, range(STEPS), micro_batches, after_backward)
    return {"standard": _full_params(standard), "in_backward": _full_params(model), "checks": checks,
            "grads_after_step": [p.grad for p in model.parameters()],
            "steps": sorted({int(s["step"]) for s in optimizer.state.values()})}


def _norm_and_clipping(rank: int) -> dict:
    """After a backward pass: the global gradient norm from the stand-ins (``get_total_norm``, as
    torch's clipping reads it) against the standard loop's; then clipping and a second backward
    before ``step()``, both refused."""
    standard = _sharded(make_tall_wide)
    _loss(standard, 0, rank).backward()
    expected = torch.nn.utils.get_total_norm([p.grad for p in standard.parameters()]).full_tensor()
    model = _sharded(make_tall_wide)
    optimizer = _dct(model, step_in_backward=True)
    _loss(model, 0, rank).backward()
    got = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]).full_tensor()
    errors = {}
    for case, action in {"clip": lambda: torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0),
                         "library_clip": lambda: clip_grad_norm_(optimizer, 1.0),
                         "second_backward": lambda: _loss(model, 1, rank).backward()}.items():
        try:
            action()
            errors[case] = None
        except RuntimeError as error:
            errors[case] = str(error)
    return {"norm": got, "expected_norm": expected, "errors": errors}


def _refusals() -> dict:
    messages = {}
    for case, keys in {"backward_projection": dict(backward_projection=True),
                       "accumulation": dict(step_in_backward=True, accumulation_steps=2),
                       "process_group": dict(step_in_backward=True, process_group=torch.distributed.group.WORLD)
                       }.items():
        model = _sharded(make_tall_wide)
        try:
            _dct(model, residual="none", **keys)
            messages[case] = None
        except ValueError as error:
            messages[case] = str(error)
        messages[case + "_hooks_left"] = any(getattr(p, "_post_accumulate_grad_hooks", None)
                                             for p in model.parameters())
    return messages


def _checkpoint(rank: int, out_dir: Path) -> dict:
    model = _sharded(make_tall_wide)
    optimizer = _dct(model, step_in_backward=True)
    _train(model, optimizer, rank, range(RESUME_AT))
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=out_dir / "checkpoint")
    _train(model, optimizer, rank, range(RESUME_AT, STEPS))
    resumed = _sharded(make_tall_wide, seed=1)
    resumed_optimizer = _dct(resumed, step_in_backward=True)
    model_state, optimizer_state = get_state_dict(resumed, resumed_optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=out_dir / "checkpoint")
    set_state_dict(resumed, resumed_optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    _train(resumed, resumed_optimizer, rank, range(RESUME_AT, STEPS))
    return {"uninterrupted": _full_params(model), "resumed": _full_params(resumed)}


def _worker(rank: int, out_dir: str) -> None:
    results = {name: _run_pair(name, rank) for name in RUNS}
    results["dct_accumulated"] = _run_pair("dct", rank, micro_batches=2)
    results["norm"] = _norm_and_clipping(rank)
    results["refusals"] = _refusals()
    results["checkpoint"] = _checkpoint(rank, Path(out_dir))
    torch.save(results, f"{out_dir}/sib-{rank}.pt")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_and_collect(_worker, tmp_path_factory.mktemp("sib_fsdp"), ["sib"], weights_only=False)["sib"]


def _max_rel_diff(got: dict, expected: dict) -> float:
    return max(float((got[n] - expected[n]).abs().max() / expected[n].abs().max()) for n in expected)


@pytest.mark.parametrize("run", [*RUNS, "dct_accumulated"])
def test_steps_in_the_hooks_equal_the_standard_loop_under_fsdp2(results, run):
    for rank, result in enumerate(results):
        assert result[run]["steps"] == [STEPS], (run, rank)
        assert _max_rel_diff(result[run]["in_backward"], result[run]["standard"]) < TOLERANCE, (run, rank)


@pytest.mark.parametrize("run", [*RUNS, "dct_accumulated"])
def test_reduced_gradients_are_freed_in_the_hooks(results, run):
    for result in results:
        assert result[run]["checks"] == [{"stand_ins": True, "freed": True}] * STEPS
        assert all(grad is None for grad in result[run]["grads_after_step"])


def test_the_global_norm_is_readable_and_clipping_is_refused(results):
    for result in results:
        norm = result["norm"]
        assert torch.allclose(norm["norm"], norm["expected_norm"], rtol=1e-14, atol=0)
        assert "already took its step inside the backward pass" in norm["errors"]["clip"]
        assert "scaling (gradient clipping) is not available" in norm["errors"]["clip"]
        assert "(step_in_backward=True), before the global gradient norm exists" in norm["errors"]["library_clip"]
        assert "a backward pass after this parameter took its step" in norm["errors"]["second_backward"]


def test_refused_combinations_name_the_reason(results):
    for result in results:
        messages = result["refusals"]
        assert "backward_projection=True without step_in_backward is not supported with FSDP2" in \
            messages["backward_projection"]
        assert "reduce-scatters the full unsharded gradient before any hook sees it" in \
            messages["backward_projection"]
        assert "Invalid accumulation_steps: 2 with FSDP2-sharded parameters" in messages["accumulation"]
        assert "set_requires_gradient_sync(False)" in messages["accumulation"]
        assert "Invalid process_group" in messages["process_group"]
        assert not any(messages[f"{case}_hooks_left"] for case in ("backward_projection", "accumulation",
                                                                   "process_group"))


def test_a_distributed_checkpoint_resumes_bit_for_bit(results):
    for rank, result in enumerate(results):
        for name, expected in result["checkpoint"]["uninterrupted"].items():
            assert torch.equal(result["checkpoint"]["resumed"][name], expected), (rank, name)
