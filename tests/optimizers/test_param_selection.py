"""Which parameters DCTProjAdam projects; GaLore's lowrank_param_groups; the registry."""
import re
import warnings

import pytest
import torch
from support.toy import make_model, train
from torch import nn

import lowrank_optim
from lowrank_optim import DCTProjAdam, GaLoreAdamW, lowrank_param_groups, register_optimizer, registry
from lowrank_optim.registry import OptimizerInfo, optimizer_info


def _projected_names(model, optimizer):
    train(model, optimizer, 1)
    return sorted(name for name, p in model.named_parameters() if "proj_indices" in optimizer.state[p])


def test_default_rule_with_names_projects_matrices_but_not_embeddings():
    model = make_model(vocab=40, d=12, hidden=40)         # embed/head 40x12: not excluded by shape
    names = _projected_names(model, DCTProjAdam(model.named_parameters()))
    assert names == ["down.weight", "head.weight", "up.weight"]     # "head" is no embedding name


def test_default_rule_by_name_excludes_lm_head_and_embeddings():
    model = nn.ModuleDict({"embed_tokens": nn.Embedding(40, 12), "lm_head": nn.Linear(12, 40),
                           "mlp": nn.Linear(12, 40)})
    optimizer = DCTProjAdam(model.named_parameters())
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    projected = {n for n, p in model.named_parameters() if "proj_indices" in optimizer.state[p]}
    assert projected == {"mlp.weight"}


def test_default_rule_by_shape_without_names():
    model = make_model(vocab=200, d=12, hidden=40)        # embed/head 200x12: aspect ratio > 8
    optimizer = DCTProjAdam(model.parameters())
    train(model, optimizer, 1)
    projected = [p for p in model.parameters() if "proj_indices" in optimizer.state[p]]
    assert {id(p) for p in projected} == {id(model.up.weight), id(model.down.weight)}
    assert optimizer.state[model.up.weight]["exp_avg"].shape == (40, 3)     # rank 0.25 of 12
    assert optimizer.state[model.down.weight]["exp_avg"].shape == (3, 40)   # left side


def test_rank_not_below_the_smaller_side_is_not_projected_by_default():
    model = make_model(vocab=200, d=12, hidden=40)
    names = _projected_names(model, DCTProjAdam(model.named_parameters(), rank=12))
    assert names == []


def test_a_group_with_its_own_rank_projects_every_matrix_it_compresses():
    model = make_model(vocab=200, d=12, hidden=40)
    optimizer = DCTProjAdam([{"params": list(model.parameters()), "rank": 4}])
    train(model, optimizer, 1)
    for p in model.parameters():
        assert ("proj_indices" in optimizer.state[p]) == (p.ndim == 2)


def test_a_rank_that_would_not_compress_keeps_the_weight_plain_and_says_why():
    """Rank 100 (clamped to 12 = the smaller side) spans every matrix: nothing is projected, one
    warning each, a note in the summary. Below the smaller side, a rank whose projected state
    (GaLore: moments and the fp32 ``n×r`` projection) outweighs AdamW's float moments stays plain too."""
    model = make_model(vocab=200, d=12, hidden=40)
    with pytest.warns(UserWarning) as caught:
        optimizer = DCTProjAdam([{"params": list(model.named_parameters()), "rank": 100}])
    matrices = [name for name, p in model.named_parameters() if p.ndim == 2]
    messages = [str(w.message) for w in caught]
    assert len(messages) == len(matrices)
    for name, message in zip(matrices, messages):
        assert re.search(rf"parameter {re.escape(name)} \(shape .*\) stays plain AdamW: rank 12 spans its smaller "
                         r"side: nothing to compress", message), message
    train(model, optimizer, 1)
    assert not any("proj_indices" in s for s in optimizer.state.values())
    summary = optimizer.projection_summary()
    assert [row.name for row in summary if row.note] == matrices
    assert "nothing to compress" in str(summary)
    square = torch.nn.Parameter(torch.zeros(128, 128))                  # 2·128·r·4 + 128·r·4 >= 2·128·128·4 at r = 86
    with pytest.warns(UserWarning, match=r"rank 86 would not compress it: projected state 132,096 B >= AdamW's "
                                         r"131,072 B"):
        assert not GaLoreAdamW([{"params": [square], "rank": 86}]).projection_summary()[0].projected
    assert GaLoreAdamW([{"params": [square], "rank": 85}]).projection_summary()[0].projected


def test_a_group_with_rank_none_is_never_projected():
    model = make_model()
    optimizer = DCTProjAdam([{"params": list(model.parameters()), "rank": None}])
    train(model, optimizer, 1)
    assert not any("proj_indices" in s for s in optimizer.state.values())


class HFStyleBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attn = nn.ModuleDict({n: nn.Linear(8, 8, bias=False) for n in ("q_proj", "o_proj")})
        self.mlp = nn.ModuleDict({"up_proj": nn.Linear(8, 16), "down_proj": nn.Linear(16, 8)})
        self.input_layernorm = nn.LayerNorm(8)


def test_lowrank_param_groups_selects_hf_llama_attention_and_mlp():
    model = nn.ModuleDict({"embed_tokens": nn.Embedding(30, 8), "layers": nn.ModuleList([HFStyleBlock()]),
                           "lm_head": nn.Linear(8, 30, bias=False)})
    groups = lowrank_param_groups(model, rank=4, update_proj_gap=50, scale=0.25)
    projected = [name for name, _ in groups[0]["params"]]
    assert projected == ["layers.0.self_attn.q_proj.weight", "layers.0.self_attn.o_proj.weight",
                         "layers.0.mlp.up_proj.weight", "layers.0.mlp.down_proj.weight"]
    assert groups[0]["rank"] == 4 and groups[0]["update_proj_gap"] == 50 and groups[0]["scale"] == 0.25
    rest = {name for name, _ in groups[1]["params"]}
    assert "rank" not in groups[1]
    assert rest == {n for n, _ in model.named_parameters()} - set(projected)
    GaLoreAdamW(groups)                      # accepted as is
    with pytest.raises(ValueError, match="matches no nn.Linear"):
        lowrank_param_groups(model, target_modules=("conv",))
    # A single string is a regular expression matched against whole names (lowrank_optim.modules).
    with pytest.raises(ValueError, match="Invalid target_modules: 'attn' matches no nn.Linear"):
        lowrank_param_groups(model, target_modules="attn")
    regex = lowrank_param_groups(model, target_modules=r".*_attn\..*", rank=4)
    assert [name for name, _ in regex[0]["params"]] == projected[:2]


def test_registry():
    names = lowrank_optim.available_optimizers()
    assert {"adamw", "dct_adamw", "galore_adamw"} <= set(names)
    model = make_model()
    assert isinstance(lowrank_optim.create_optimizer("dct_adamw", model.parameters()), DCTProjAdam)
    with pytest.raises(ValueError, match=r"unknown optimizer 'adam'; known optimizers: adamw, "):
        lowrank_optim.create_optimizer("adam", model.parameters())
    assert lowrank_optim.DCTAdamW is DCTProjAdam


def test_registry_names_the_plain_low_bit_adamw_and_describes_every_name():
    assert {"galore_adamw8bit", "adamw8bit", "adamw4bit"} <= set(lowrank_optim.available_optimizers())
    model = make_model()
    with warnings.catch_warnings():
        warnings.simplefilter("error")      # the plain path's "no parameter is projected" is not shown
        optimizer = lowrank_optim.create_optimizer("adamw8bit", model.parameters(), lr=1e-3)
    assert isinstance(optimizer, DCTProjAdam)
    assert optimizer.param_groups[0]["moment_bits"] == 8 and optimizer.param_groups[0]["rank"] is None
    assert not any(row.projected for row in optimizer.projection_summary())
    four = lowrank_optim.create_optimizer("adamw4bit", model.parameters(), moment_bits=None)   # kwargs win
    assert four.param_groups[0]["moment_bits"] is None
    for name in lowrank_optim.available_optimizers():
        assert optimizer_info(name).label != name, f"{name} has no entry in the registry's table"
    assert optimizer_info("galore_adamw").projection_keys[0] == "rank"
    assert optimizer_info("sst_adamw").parameterization == "sst"


def test_a_registration_can_describe_itself():
    info = OptimizerInfo("SGD for a test", fsdp=True)
    register_optimizer("sgd_for_registry_test", torch.optim.SGD, info)
    try:
        assert optimizer_info("sgd_for_registry_test") is info
    finally:
        registry._REGISTRY.pop("sgd_for_registry_test")
        registry._INFO.pop("sgd_for_registry_test")
    assert optimizer_info("not_registered") == OptimizerInfo("not_registered")
