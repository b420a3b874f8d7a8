"""torchtitan's ``OptimizersContainer`` with the library's optimizers
(:mod:`lowrank_optim.integrations.torchtitan`), without torchtitan's trainer (which needs CUDA).

Two gloo processes (spawned once for the module) train FSDP2-sharded nets (half the batch each)
through the container, save with ``torch.distributed.checkpoint`` as torchtitan's checkpointer does
(the container is a ``Stateful`` in the saved dict), load into a fresh model and container and
continue: bit-identical to the uninterrupted run. The runs (:data:`SHARDED_RUNS`): on the tall/wide
net, DCTProjAdam over every parameter, and GaLoreAdamW and APOLLOMini on the weights beside torch's
AdamW on the biases; on :class:`LowBitNet`, 8- and 4-bit moments (DCTProjAdam's projected moments
and the plain AdamW path, ``adamw8bit``/``adamw4bit``), whose codes and scales are DTensors sharded
like their parameters. The container's zero-gradient step (its ``state_dict()`` before any step)
moves nothing, creates every state key (codes and scales included), and leaves the run as if it had
not been called. Each rank gets its own state back: its DTensor shards differ from the other
rank's, its plain entries are the same on both (what makes DCP's one saved copy right for both: a
plain entry changed on one rank before the save was seen to come back with the other rank's value).
"""
from __future__ import annotations

import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from support.distributed_harness import (
    WORLD_SIZE,
    assert_identical,
    half,
    make_tall_wide,
    regression_loss,
    run_and_collect,
)
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from lowrank_optim import convert_to_sst
from lowrank_optim.moments.quantized_moments import QUANTIZED_KEYS
from lowrank_optim.sharding import projection_shard_placement

pytest.importorskip("torchtitan", reason="torchtitan is not installed (.ci/lib.sh installs it with --no-deps)")

from torchtitan.components.optimizer import OptimizersContainer, ParamGroupConfig  # noqa: E402
from torchtitan.config import Configurable  # noqa: E402
from torchtitan.config.override import OverrideConfig, apply_overrides, parse_cli_imports  # noqa: E402

from lowrank_optim.integrations import torchtitan_api  # noqa: E402
from lowrank_optim.integrations.torchtitan import (  # noqa: E402
    CLASS_NAMES,
    LowRankOptimizersContainer,
    optimizer_names,
)
from lowrank_optim.integrations.torchtitan_api import check_torchtitan_api  # noqa: E402

OVERRIDE = "lowrank_optim.integrations.torchtitan.lowrank_optimizers"
DOCS = Path(__file__).parents[2] / "docs" / "torchtitan.md"
SAVE_AT, STEPS = 3, 6           # gap 2: refreshes before and after the checkpoint
PROJECTED = {"lr": 1e-2, "update_proj_gap": 2, "weight_decay": 0.1}
ADAMW_BIASES = ParamGroupConfig(pattern=r"bias$", optimizer_name="AdamW", optimizer_kwargs={"lr": 1e-2})


class LowBitNet(nn.Module):
    """Weights whose moments are quantized on 2 ranks with the unsharded blocks
    (:mod:`lowrank_optim.quantization.sharded`): ``tall`` 1024×16 (right side, rank 8: a 1024×8
    moment, rows 512/512), ``wide`` 18×1024 (left side, rank 9: 9×1024, columns 512/512) and
    ``plain`` 256×18 (the plain AdamW path, flat: rows 128/128, 2304 values per rank). Each holds
    4096 values or more, and each rank's share is a multiple of the blocks (256 at 8 bits, 128 at
    4); the biases (fewer values) keep float moments."""

    def __init__(self) -> None:
        super().__init__()
        self.tall = nn.Linear(16, 1024)
        self.wide = nn.Linear(1024, 18)
        self.plain = nn.Linear(18, 256)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.plain(torch.tanh(self.wide(torch.tanh(self.tall(x)))))


def make_low_bit_net(seed: int = 0) -> LowBitNet:
    torch.manual_seed(seed)
    return LowBitNet()


def low_bit_loss(model: nn.Module, step: int, part: slice = slice(None)) -> torch.Tensor:
    generator = torch.Generator().manual_seed(900 + step)
    x = torch.randn(8, 16, generator=generator, dtype=torch.float64)
    target = torch.randn(8, 256, generator=generator, dtype=torch.float64)
    return nn.functional.mse_loss(model(x[part]), target[part])


@dataclass(frozen=True)
class ShardedRun:
    """The container's ``param_groups`` on the net ``make(seed)``, trained on ``loss(model, step, part)``;
    ``quantized``: the parameters whose moments are codes and scales."""

    param_groups: list[ParamGroupConfig]
    make: Callable[[int], nn.Module] = make_tall_wide
    loss: Callable[..., torch.Tensor] = regression_loss
    quantized: tuple[str, ...] = ()


def _low_bit(bits: int) -> ShardedRun:
    groups = [ParamGroupConfig(pattern=r"^plain\.weight$", optimizer_name=f"adamw{bits}bit",
                               optimizer_kwargs={"lr": 1e-2, "weight_decay": 0.1}),
              ParamGroupConfig(pattern=".*", optimizer_name="DCTProjAdam",
                               optimizer_kwargs={**PROJECTED, "rank": 0.5, "moment_bits": bits})]
    return ShardedRun(groups, make_low_bit_net, low_bit_loss, quantized=("tall.weight", "wide.weight", "plain.weight"))


SHARDED_RUNS = {
    "DCTProjAdam": ShardedRun([ParamGroupConfig(pattern=".*", optimizer_name="DCTProjAdam",
                                                optimizer_kwargs={**PROJECTED, "rank": 0.5})]),
    "GaLoreAdamW": ShardedRun([ParamGroupConfig(pattern=r"weight$", optimizer_name="GaLoreAdamW",
                                                optimizer_kwargs={**PROJECTED, "rank": 3, "scale": 0.5}),
                               ADAMW_BIASES]),
    "APOLLOMini": ShardedRun([ParamGroupConfig(pattern=r"weight$", optimizer_name="APOLLOMini",
                                               optimizer_kwargs={**PROJECTED, "rank": 1}), ADAMW_BIASES]),
    "8-bit": _low_bit(8),
    "4-bit": _low_bit(4),
}


def _container(model: nn.Module, param_groups, implementation="for-loop", **fields) -> LowRankOptimizersContainer:
    config = LowRankOptimizersContainer.Config(param_groups=param_groups, implementation=implementation, **fields)
    return config.build(model_parts=[model])


def _train(model, container, loss, steps, part=slice(None)):
    for step in steps:
        container.zero_grad()
        loss(model, step, part).backward()
        container.step()


def _local(value):
    """A rank's own copy of a state entry: a DTensor's shard, a tensor's clone, a value as it is."""
    if isinstance(value, DTensor):
        return value.to_local().clone()
    return value.clone() if isinstance(value, torch.Tensor) else value


def _local_state(container) -> dict:
    return {key: _local(value) for key, value in container.state_dict().items() if key.startswith("state.")}


def _params(model) -> dict:
    return {name: _local(param.detach()) for name, param in model.named_parameters()}


def _shard(model):
    for layer in model.children():
        fully_shard(layer, shard_placement_fn=projection_shard_placement(WORLD_SIZE))
    return fully_shard(model, shard_placement_fn=projection_shard_placement(WORLD_SIZE))


def _quantized_entries(model, container) -> dict:
    """Each codes/scales entry of the container's flat state: ``(is a DTensor, dtype, placed like
    its parameter)``."""
    params = dict(model.named_parameters())
    entries = {}
    for key, value in container.state_dict().items():
        fqn, _, name = key.removeprefix("state.").rpartition(".")
        if name in QUANTIZED_KEYS:
            entries[key] = (isinstance(value, DTensor), value.dtype,
                            isinstance(value, DTensor) and value.placements == params[fqn].placements)
    return entries


def _sharded_run(rank: int, out_dir: str, name: str, run: ShardedRun) -> dict:
    part = half(rank)
    never_saved = _shard(run.make(0).double())
    _train(never_saved, _container(never_saved, run.param_groups), run.loss, range(STEPS), part)

    model = _shard(run.make(0).double())
    container = _container(model, run.param_groups)
    before = _params(model)
    created = sorted(container.state_dict())             # torchtitan's zero-gradient step, as at a step-0 save
    moved = [n for n, p in _params(model).items() if not torch.equal(p, before[n])]
    _train(model, container, run.loss, range(SAVE_AT), part)
    trained = sorted(container.state_dict())
    saved = _local_state(container)
    dcp.save({"model": get_model_state_dict(model), "optimizer": container}, checkpoint_id=f"{out_dir}/{name}")
    _train(model, container, run.loss, range(SAVE_AT, STEPS), part)

    resumed = _shard(run.make(1).double())
    resumed_container = _container(resumed, run.param_groups)
    state = {"model": get_model_state_dict(resumed), "optimizer": resumed_container}
    dcp.load(state, checkpoint_id=f"{out_dir}/{name}")
    set_model_state_dict(resumed, state["model"])
    loaded = _local_state(resumed_container)
    quantized = _quantized_entries(resumed, resumed_container)
    _train(resumed, resumed_container, run.loss, range(SAVE_AT, STEPS), part)
    return {"created": created, "trained": trained, "moved": moved, "saved": saved, "loaded": loaded,
            "quantized": quantized,
            "dtensors": sorted(k for k, v in resumed_container.state_dict().items() if isinstance(v, DTensor)),
            "never_saved": _params(never_saved), "uninterrupted": _params(model), "resumed": _params(resumed)}


def _fsdp_worker(rank: int, out_dir: str) -> None:
    results = {name: _sharded_run(rank, out_dir, name, run) for name, run in SHARDED_RUNS.items()}
    torch.save(results, f"{out_dir}/titan-{rank}.pt")


@pytest.fixture(scope="module")
def fsdp_results(tmp_path_factory):
    return run_and_collect(_fsdp_worker, tmp_path_factory.mktemp("titan"), ["titan"], weights_only=False)["titan"]


@pytest.mark.parametrize("name", SHARDED_RUNS)
def test_sharded_resume_through_the_container_equals_uninterrupted(fsdp_results, name):
    for rank in range(WORLD_SIZE):
        run = fsdp_results[rank][name]
        assert_identical(run["resumed"], run["uninterrupted"], f"rank {rank}")


@pytest.mark.parametrize("name", SHARDED_RUNS)
def test_the_zero_gradient_step_moves_nothing_creates_every_key_and_changes_no_step(fsdp_results, name):
    for rank in range(WORLD_SIZE):
        run = fsdp_results[rank][name]
        assert run["moved"] == []
        assert run["created"] == run["trained"]
        assert any(key.endswith(".exp_avg") for key in run["created"])
        assert_identical(run["uninterrupted"], run["never_saved"], f"rank {rank}")   # as if never called


@pytest.mark.parametrize("name", SHARDED_RUNS)
def test_each_rank_loads_its_own_state(fsdp_results, name):
    runs = [fsdp_results[rank][name] for rank in range(WORLD_SIZE)]
    for rank, run in enumerate(runs):
        assert_identical(run["loaded"], run["saved"], f"rank {rank}")
    shards = [key for key in runs[0]["saved"] if key in runs[0]["dtensors"]]
    plain = [key for key, value in runs[0]["saved"].items()
             if key not in runs[0]["dtensors"] and isinstance(value, torch.Tensor)]
    # a mix-up would show: the ranks' shards differ ...
    comparable = [key for key in shards if runs[0]["saved"][key].shape == runs[1]["saved"][key].shape]
    assert comparable and all(not torch.equal(runs[0]["saved"][k], runs[1]["saved"][k]) for k in comparable)
    # ... and every other entry (steps, indices, P, seeds, norms) is the same on both ranks
    assert plain
    for key, value in runs[0]["saved"].items():
        if key not in runs[0]["dtensors"]:
            assert_identical(value, runs[1]["saved"][key], key)


@pytest.mark.parametrize("name", [name for name, run in SHARDED_RUNS.items() if run.quantized])
def test_quantized_moments_of_sharded_parameters_are_uint8_dtensors_placed_like_their_parameters(fsdp_results, name):
    """8- and 4-bit moments under FSDP2 through the container (their resume and zero-gradient step:
    the tests above): after the load, every quantized weight's codes (uint8) and scales (float32)
    are DTensors placed like the weight, and the zero-gradient step had created them all."""
    expected = {f"state.{fqn}.{key}": (True, torch.uint8 if key.endswith("_codes") else torch.float32, True)
                for fqn in SHARDED_RUNS[name].quantized for key in QUANTIZED_KEYS}
    floats = {f"state.{fqn}.{key}" for fqn in SHARDED_RUNS[name].quantized for key in ("exp_avg", "exp_avg_sq")}
    for rank in range(WORLD_SIZE):
        run = fsdp_results[rank][name]
        assert run["quantized"] == expected, f"rank {rank}"
        assert set(expected) <= set(run["created"]) and not floats & set(run["created"])


def _mlp(seed=0, sizes=(8, 12, 6)):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(sizes[0], sizes[1]), nn.Tanh(), nn.Linear(sizes[1], sizes[2]))


def _mlp_train(model, container, steps):
    for step in steps:
        generator = torch.Generator().manual_seed(step)
        container.zero_grad()
        model(torch.randn(4, model[0].in_features, generator=generator)).square().mean().backward()
        container.step()


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")      # one process, as intended
def test_quantized_moments_resume_through_the_container_unsharded(tmp_path):
    """8-bit moments (codes and scales) through torchtitan's flat state dict and DCP, one process;
    the first weight's projected moments (128×32) are just large enough to be quantized."""
    groups = [ParamGroupConfig(pattern=r"^0\.weight$", optimizer_name="dct_adamw",
                               optimizer_kwargs={"lr": 1e-2, "rank": 32, "update_proj_gap": 2, "moment_bits": 8}),
              ParamGroupConfig(pattern=".*", optimizer_name="AdamW", optimizer_kwargs={"lr": 1e-2})]
    model = _mlp(sizes=(64, 128, 6))
    container = _container(model, groups)
    _mlp_train(model, container, range(3))
    dcp.save({"optimizer": container, "model": model.state_dict()}, checkpoint_id=tmp_path)
    _mlp_train(model, container, range(3, 6))

    resumed = _mlp(seed=1, sizes=(64, 128, 6))
    resumed_container = _container(resumed, groups)
    state = {"optimizer": resumed_container, "model": resumed.state_dict()}
    dcp.load(state, checkpoint_id=tmp_path)
    assert any(value.dtype == torch.uint8 for value in resumed_container.state_dict().values()
               if isinstance(value, torch.Tensor))
    _mlp_train(resumed, resumed_container, range(3, 6))
    assert_identical(dict(resumed.named_parameters()), dict(model.named_parameters()))


@pytest.mark.parametrize("name", sorted(optimizer_names()))
def test_every_registered_and_class_name_builds_its_optimizer(name):
    registry_name = optimizer_names()[name]
    model = convert_to_sst(_mlp(), rank=2, target_modules="all-linear") if registry_name == "sst_adamw" else _mlp()
    keys = {} if registry_name in ("adamw", "adamw8bit", "adamw4bit", "sst_adamw") else {"rank": 2}
    container = _container(model, [ParamGroupConfig(pattern=".*", optimizer_name=name,
                                                    optimizer_kwargs={"lr": 1e-3, **keys})])
    (optimizer,) = container.optimizers
    if name in CLASS_NAMES:
        assert type(optimizer).__name__ == name
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    container.state_dict()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    _mlp_train(model, container, range(1))


def test_optimizer_level_options_go_through_the_factory_keywords():
    container = _container(_mlp(), [ParamGroupConfig(pattern=".*", optimizer_name="DCTProjAdam",
                                                     optimizer_kwargs={"lr": 1e-3, "rank": 2})],
                           optimizer_factory_kwargs_by_name={"DCTProjAdam": {"skip_nonfinite": True}})
    assert container.optimizers[0].skip_nonfinite is True
    with pytest.raises(ValueError, match=r"Invalid step_in_backward: True in optimizer_factory_kwargs_by_name"):
        _container(_mlp(), [ParamGroupConfig(pattern=".*", optimizer_name="DCTProjAdam",
                                             optimizer_kwargs={"lr": 1e-3})],
                   optimizer_factory_kwargs_by_name={"DCTProjAdam": {"step_in_backward": True}})


def test_a_group_key_of_the_library_is_checked_by_name():
    with pytest.raises(ValueError, match="update_proj_gapp"):
        _container(_mlp(), [ParamGroupConfig(pattern=".*", optimizer_name="GaLoreAdamW",
                                             optimizer_kwargs={"lr": 1e-3, "update_proj_gapp": 5})])


def test_the_default_fused_implementation_is_refused_by_pattern():
    groups = [ParamGroupConfig(pattern=r"weight$", optimizer_name="APOLLOMini", optimizer_kwargs={"lr": 1e-3}),
              ParamGroupConfig(pattern=".*", optimizer_name="AdamW", optimizer_kwargs={"lr": 1e-3})]
    with pytest.raises(ValueError, match=r"Invalid fused: True for param_groups pattern 'weight\$' \(APOLLOMini"):
        _container(_mlp(), groups, implementation="fused")
    groups[0].optimizer_kwargs["fused"] = False        # per entry, as torchtitan documents
    _container(_mlp(), groups, implementation="fused")


def test_an_unknown_name_lists_the_library_names():
    with pytest.raises(NotImplementedError, match=r"DCTProjAdamm not added. \(lowrank_optim adds: .*DCTProjAdam"):
        _container(_mlp(), [ParamGroupConfig(pattern=".*", optimizer_name="DCTProjAdamm",
                                             optimizer_kwargs={"lr": 1e-3})])


def _root_config(optimizer: OptimizersContainer.Config):
    """A config tree holding ``optimizer`` as the trainer's does (its field ``optimizer``)."""

    @dataclass(kw_only=True, slots=True)
    class Root(Configurable.Config):
        optimizer: OptimizersContainer.Config = field(default_factory=OptimizersContainer.Config)

    return Root(optimizer=optimizer)


def test_the_documented_override_line_swaps_the_trainer_optimizer_config():
    assert f"--override.imports {OVERRIDE}" in DOCS.read_text()
    groups = [ParamGroupConfig(pattern=".*", optimizer_name="DCTProjAdam", optimizer_kwargs={"lr": 1e-3})]
    root = _root_config(OptimizersContainer.Config(param_groups=groups, implementation="foreach"))
    apply_overrides(OverrideConfig(imports=parse_cli_imports([OVERRIDE])), root)
    assert type(root.optimizer) is LowRankOptimizersContainer.Config
    assert root.optimizer.param_groups == groups and root.optimizer.implementation == "foreach"
    assert isinstance(root.optimizer.build(model_parts=[_mlp()]), LowRankOptimizersContainer)


def test_the_documented_json_override_sets_param_groups():
    (token,) = re.findall(r"--override\.imports '(" + re.escape(OVERRIDE) + r"=[^']*)'", DOCS.read_text())
    root = _root_config(OptimizersContainer.Config())
    apply_overrides(OverrideConfig(imports=parse_cli_imports([token])), root)
    assert root.optimizer.implementation == "foreach"
    assert [entry.optimizer_name for entry in root.optimizer.param_groups] == ["APOLLOMini", "AdamW"]
    model = nn.Module()
    model.layers = nn.ModuleList([nn.Sequential(nn.Linear(8, 8))])
    model.output = nn.Linear(8, 4)
    container = root.optimizer.build(model_parts=[model])
    assert [(type(o).__name__, o.param_groups[0]["param_names"]) for o in container.optimizers] == [
        ("APOLLOMini", ["layers.0.0.weight"]), ("AdamW", ["layers.0.0.bias", "output.weight", "output.bias"])]


def test_a_torchtitan_without_the_container_api_is_one_clear_error(monkeypatch):
    check_torchtitan_api()
    monkeypatch.delattr(OptimizersContainer, "_resolve_optimizer_factory")
    monkeypatch.delitem(ParamGroupConfig.__dataclass_fields__, "optimizer_kwargs")
    with pytest.raises(ImportError, match=r"Invalid torchtitan version: '0\.3\.0' lacks "
                                          r"OptimizersContainer\._resolve_optimizer_factory, "
                                          r"ParamGroupConfig\.optimizer_kwargs \(.*install torchtitan==0\.3\.0\)"):
        check_torchtitan_api()


def test_a_torchtitan_module_gone_or_not_importing_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchtitan.config", None)         # as if the module were gone
    with pytest.raises(ImportError, match=r"Invalid torchtitan version: '0\.3\.0' lacks torchtitan\.config \("):
        check_torchtitan_api()

    def without_tyro(name):
        raise ModuleNotFoundError("No module named 'tyro'", name="tyro")

    monkeypatch.setattr(torchtitan_api.importlib, "import_module", without_tyro)
    with pytest.raises(ImportError, match=r"Invalid torchtitan installation: torchtitan\.components\.optimizer "
                                          r"\(torchtitan 0\.3\.0\) does not import: No module named 'tyro'"):
        check_torchtitan_api()
