"""How ``experiments.methods`` turns a config into an optimizer, and the memory/logging helpers."""

from __future__ import annotations

import pytest
import torch

import lowrank_optim.registry  # noqa: E402
from experiments.config import TrainConfig  # noqa: E402
from experiments.errors import UsageError  # noqa: E402
from experiments.logging_utils import projection_health  # noqa: E402
from experiments.memory import optimizer_state_bytes  # noqa: E402
from experiments.methods import (  # noqa: E402
    apply_parameterization,
    available_methods,
    build_optimizer,
    optimizer_kwargs,
    optimizer_params,
)
from experiments.model import Llama, LlamaConfig  # noqa: E402
from experiments.pretrain import plot_title  # noqa: E402
from experiments.schedulers import build_scheduler  # noqa: E402
from lowrank_optim.validation import InvalidHyperparameter  # noqa: E402

SMALL = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)


def test_a_newly_registered_optimizer_needs_no_code_change(monkeypatch):
    monkeypatch.setitem(lowrank_optim.registry._REGISTRY, "sgd_for_test", torch.optim.SGD)
    config = TrainConfig(optimizer="sgd_for_test", lr=0.5, weight_decay=0.1, optimizer_kwargs={"momentum": 0.9})
    optimizer = build_optimizer(Llama(SMALL), config)
    assert isinstance(optimizer, torch.optim.SGD)
    group = optimizer.param_groups[0]
    assert (group["lr"], group["weight_decay"], group["momentum"]) == (0.5, 0.1, 0.9)


def test_unknown_names_are_rejected_with_the_known_ones():
    with pytest.raises(ValueError, match="--optimizer: unknown optimizer: expected one of adamw, .* got 'adam_w'"):
        build_optimizer(Llama(SMALL), TrainConfig(optimizer="adam_w"))
    with pytest.raises(ValueError, match="--parameterization: unknown parameterization: .* got 'lora'"):
        apply_parameterization(Llama(SMALL), TrainConfig(parameterization="lora"))


def test_unset_hyperparameters_keep_the_optimizer_defaults():
    assert optimizer_kwargs(TrainConfig(optimizer="adamw", lr=0.1)) == {"lr": 0.1, "weight_decay": 0.0}
    kwargs = optimizer_kwargs(TrainConfig(optimizer="adamw", betas=[0.9, 0.95], eps=1e-6))
    assert kwargs["betas"] == (0.9, 0.95) and kwargs["eps"] == 1e-6


@pytest.mark.parametrize("optimizer", ["galore_adamw", "dct_adamw", "galore_torch_adamw"])
def test_projected_optimizers_get_galore_param_groups(optimizer):
    if optimizer not in available_methods():
        pytest.skip(f"optimizer {optimizer!r} is not registered in lowrank_optim yet")
    model = Llama(SMALL)
    groups = optimizer_params(model, TrainConfig(optimizer=optimizer, rank=8, update_proj_gap=50, scale=0.5))
    projected_names = sorted(name for name, _ in groups[0]["params"])
    assert projected_names == sorted(
        f"{name}.weight"
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and (".attn." in name or ".mlp." in name)
    )
    assert (groups[0]["rank"], groups[0]["update_proj_gap"], groups[0]["scale"]) == (8, 50, 0.5)
    # plain: rank=None for the library's (whose default rule would project a group without rank), none for the peer
    assert groups[1]["rank"] is None if optimizer != "galore_torch_adamw" else "rank" not in groups[1]
    assert "score" not in groups[0]  # unset (None) fields are left to the optimizer


def test_sst_optimizer_gets_its_parameterization_and_interval():
    if "sst_adamw" not in available_methods():
        pytest.skip("optimizer 'sst_adamw' is not registered in lowrank_optim yet")
    config = TrainConfig(optimizer="sst_adamw", rank=4, sst_interval=7)
    model = apply_parameterization(Llama(SMALL), config)
    assert any("SST" in type(module).__name__ for module in model.modules())
    assert optimizer_kwargs(config)["update_interval"] == 7


def test_state_bytes_follow_objects_held_in_the_state():
    galore_torch = pytest.importorskip("galore_torch")
    weight = torch.nn.Parameter(torch.randn(16, 8))
    optimizer = galore_torch.GaLoreAdamW(
        [{"params": [weight], "rank": 2, "update_proj_gap": 10, "scale": 1.0, "proj_type": "std"}],
        no_deprecation_warning=True,
    )
    weight.grad = torch.randn(16, 8)
    optimizer.step()
    moments = 2 * 16 * 2 * 4  # exp_avg and exp_avg_sq of the 16x2 projected gradient, fp32
    # galore_torch's projector object keeps P = Vh[:2] as a view, which holds all of the 8x8 Vh alive:
    # storages are counted, i.e. the memory actually retained.
    projector = 8 * 8 * 4
    assert optimizer_state_bytes(optimizer) == moments + projector


def test_projection_health_averages_refresh_stats():
    class Refreshing:
        refresh_stats = {
            "a": {"captured": torch.tensor(0.5), "overlap": 1.0},
            "b": {"captured": torch.tensor(0.7), "overlap": 0.0},
        }

    health = projection_health(Refreshing())  # 0-d tensors: reading them back is the caller's sync
    assert {key: float(value) for key, value in health.items()} == pytest.approx(
        {"proj/captured": 0.6, "proj/overlap": 0.5}
    )
    Refreshing.refresh_stats = {}
    assert projection_health(Refreshing()) == {}
    assert projection_health(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)) == {}


def test_a_library_error_names_the_flag_of_its_key_whatever_its_message(monkeypatch):
    def refuses(params, **kwargs):
        raise InvalidHyperparameter("update_proj_gap", 0, "a message that names no key")

    monkeypatch.setitem(lowrank_optim.registry._REGISTRY, "refuses_for_test", refuses)
    with pytest.raises(UsageError) as error:
        build_optimizer(Llama(SMALL), TrainConfig(optimizer="refuses_for_test"))
    assert (error.value.source, error.value.message) == ("--update_proj_gap", "a message that names no key")
    with pytest.raises(UsageError) as error:     # a key the user set in --optimizer_kwargs
        build_optimizer(Llama(SMALL), TrainConfig(optimizer="refuses_for_test",
                                                  optimizer_kwargs={"update_proj_gap": 0}))
    assert error.value.source == "--optimizer_kwargs"


def test_the_plain_low_bit_adamw_is_reached_by_name():
    optimizer = build_optimizer(Llama(SMALL), TrainConfig(optimizer="adamw8bit"))
    assert optimizer.param_groups[0]["moment_bits"] == 8
    assert not any(row.projected for row in optimizer.projection_summary())
    old_name = build_optimizer(Llama(SMALL), TrainConfig(optimizer="lowrank_plain_adamw",
                                                         optimizer_kwargs={"moment_bits": 4}))
    assert old_name.param_groups[0]["moment_bits"] == 4
    assert {"adamw8bit", "adamw4bit", "galore_adamw8bit", "lowrank_plain_adamw"} <= set(available_methods())


def test_galore_flags_reach_apollo_but_not_galore_scale():
    """--rank/--update_proj_gap/--proj_type/--moments go onto APOLLO's projected group; --scale (GaLore's
    0.25 by default) does not: APOLLO keeps its own alpha (1; APOLLO-Mini 128), the paper's."""
    config = TrainConfig(optimizer="apollo_adamw", rank=8, update_proj_gap=50, proj_type="reverse_std",
                         moments="reset", scale=0.5)
    optimizer = build_optimizer(Llama(SMALL), config)
    projected, plain = optimizer.param_groups
    assert (projected["rank"], projected["update_proj_gap"], projected["proj_type"], projected["moments"]) == (
        8, 50, "reverse_std", "reset")
    assert (projected["scale"], projected["scale_type"], projected["proj"]) == (1.0, "channel", "random")
    assert sum(row.projected for row in optimizer.projection_summary()) == 7  # q, k, v, o, gate, up, down


def test_apollo_mini_gets_galores_named_groups_at_rank_1():
    """APOLLO-Mini gets GaLore's two groups of named parameters like APOLLO: the --target_modules linears at
    rank 1 whatever --rank says, with --update_proj_gap/--proj_type/--moments; its own scale (128) and tensor
    scaling, not --scale; --optimizer_kwargs still reach it."""
    config = TrainConfig(optimizer="apollo_mini", rank=8, update_proj_gap=50, proj_type="reverse_std",
                         moments="reset", scale=0.25, target_modules=["mlp"], optimizer_kwargs={"moment_bits": 8})
    assert "rank" not in optimizer_kwargs(config)
    optimizer = build_optimizer(Llama(SMALL), config)
    projected, plain = optimizer.param_groups
    assert (projected["rank"], projected["update_proj_gap"], projected["proj_type"], projected["moments"]) == (
        1, 50, "reverse_std", "reset")
    assert (projected["scale_type"], projected["scale"], projected["moment_bits"]) == ("tensor", 128.0, 8)
    assert plain["rank"] is None            # plain, not the class's default rule (which would take the attn linears)
    rows = [row for row in optimizer.projection_summary() if row.projected]
    assert sorted(row.name.split(".")[-2] for row in rows) == ["down_proj", "gate_proj", "up_proj"]   # named, mlp
    assert all(row.rank == 1 for row in rows)
    assert plot_title(config).endswith("rank 1")


@pytest.mark.parametrize("name", ["dct_adamw", "apollo_adamw", "apollo_mini", "galore_adamw"])
def test_only_the_target_modules_are_projected(name):
    optimizer = build_optimizer(Llama(SMALL), TrainConfig(optimizer=name, rank=8, target_modules=["attn"]))
    projected = [row.name for row in optimizer.projection_summary() if row.projected]
    assert len(projected) == 4 and all(".attn." in row_name for row_name in projected)


def test_step_in_backward_reaches_apollo_with_the_accumulation():
    config = TrainConfig(optimizer="apollo_mini", step_in_backward=True, grad_clipping=0.0, gradient_accumulation=2)
    optimizer = build_optimizer(Llama(SMALL), config)
    assert (optimizer.step_in_backward, optimizer.accumulation_steps) == (True, 2)
    optimizer.stop_backward_projection()


@pytest.mark.parametrize(("name", "rank", "scale_type", "scale"), [("apollo_torch_adamw", 8, "channel", 1.0),
                                                                  ("apollo_torch_mini", 1, "tensor", 128.0)])
def test_apollo_torch_peers_get_their_published_group_keys(name, rank, scale_type, scale):
    """apollo-torch's APOLLO and APOLLO-Mini (benchmark baselines) on the attn/mlp weights, with their own
    scale (not --scale) and, for Mini, rank 1 whatever --rank says."""
    pytest.importorskip("apollo_torch")
    optimizer = build_optimizer(Llama(SMALL), TrainConfig(optimizer=name, rank=8, update_proj_gap=50, scale=0.25))
    assert type(optimizer).__module__ == "apollo_torch.apollo"
    projected = optimizer.param_groups[0]
    assert (projected["rank"], projected["update_proj_gap"], projected["proj"]) == (rank, 50, "random")
    assert (projected["scale_type"], projected["scale"]) == (scale_type, scale)
    assert "rank" not in optimizer.param_groups[1]


def test_reference_apollo_takes_the_projected_group_and_the_references_keywords():
    """``reference_apollo`` (a diagnostic): the float64 reference's rule in the training loop, GaLore's groups,
    its own keywords through --optimizer_kwargs (here the exact-factor projection)."""
    from lowrank_optim.reference import ReferenceAPOLLOAdamW

    config = TrainConfig(optimizer="reference_apollo", rank=4, update_proj_gap=50,
                         optimizer_kwargs={"proj": "identity", "scale_type": "tensor"})
    optimizer = build_optimizer(Llama(SMALL), config)
    assert type(optimizer) is ReferenceAPOLLOAdamW
    projected, plain = optimizer.param_groups
    assert (projected["rank"], projected["update_proj_gap"], projected["proj"]) == (4, 50, "identity")
    assert projected["scale_type"] == "tensor" and "rank" not in plain


PLAIN_GROUP_OPTIMIZERS = ["galore_adamw", "dct_adamw", "apollo_adamw", "apollo_mini", "galore_torch_adamw",
                          "apollo_torch_mini"]


@pytest.mark.parametrize("name", PLAIN_GROUP_OPTIMIZERS)
def test_plain_lr_reaches_the_plain_group_only(name):
    """--plain_lr is the lr of GaLore's plain group (embedding, norms, head), the projected group keeps --lr;
    unset, both groups run at --lr."""
    if name == "galore_torch_adamw":
        pytest.importorskip("galore_torch")
    if name == "apollo_torch_mini":
        pytest.importorskip("apollo_torch")
    model = Llama(SMALL)
    projected, plain = build_optimizer(model, TrainConfig(optimizer=name, rank=8, lr=1e-2, plain_lr=1e-3)).param_groups
    assert (projected["lr"], plain["lr"]) == (1e-2, 1e-3)
    assert {id(p) for p in plain["params"]} == {id(p) for n, p in model.named_parameters()
                                                if ".attn." not in n and ".mlp." not in n}
    default = build_optimizer(model, TrainConfig(optimizer=name, rank=8, lr=1e-2)).param_groups
    assert [group["lr"] for group in default] == [1e-2, 1e-2]


def test_the_schedule_keeps_the_ratio_of_plain_lr_to_lr():
    """The scheduler multiplies each group's own initial lr: warmup and cosine move both groups together."""
    config = TrainConfig(optimizer="apollo_mini", lr=1e-2, plain_lr=1e-3)
    optimizer = build_optimizer(Llama(SMALL), config)
    scheduler = build_scheduler(optimizer, "cosine", warmup_steps=3, total_steps=10, min_lr_ratio=0.1)
    for step in range(10):
        projected, plain = optimizer.param_groups
        assert plain["lr"] == pytest.approx(projected["lr"] / 10), step
        assert projected["lr"] == pytest.approx(1e-2 * scheduler.lr_lambdas[0](step)), step
        optimizer.step()
        scheduler.step()
    assert [group["initial_lr"] for group in optimizer.param_groups] == [1e-2, 1e-3]
    assert plot_title(config).endswith("lr 0.01 (plain 0.001), rank 1")
