"""The shared target_modules rule (select_linear_modules) and replace_submodule."""
import re

import pytest
import torch
from torch import nn

from lowrank_optim import convert_to_sltrain, convert_to_sst, lowrank_param_groups
from lowrank_optim.modules import replace_submodule, select_linear_modules

transformers = pytest.importorskip("transformers")

PROJECTIONS = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}
LLAMA_LINEARS = [f"model.layers.{i}.{block}.{p}" for i in range(2) for block, ps in PROJECTIONS.items() for p in ps]


def tiny_llama(**overrides):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32,
                                      **overrides)
    return transformers.LlamaForCausalLM(config)


class Plain(nn.Module):
    """No get_output_embeddings: "all-linear" leaves out the last nn.Linear (``out``)."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 1)      # out_proj: a subclass of nn.Linear
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))])
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        return self.out(self.blocks[0](x))


def names(selection):
    return [name for name, _ in selection]


def test_collection_selects_by_substring():
    model = tiny_llama()
    assert names(select_linear_modules(model, ("attn", "mlp"))) == LLAMA_LINEARS
    assert names(select_linear_modules(model, ["q_proj"])) == ["model.layers.0.self_attn.q_proj",
                                                             "model.layers.1.self_attn.q_proj"]
    assert names(select_linear_modules(model, {"lm_head"})) == ["lm_head"]


def test_single_string_is_a_full_match_regular_expression():
    model = tiny_llama()
    assert names(select_linear_modules(model, r".*\.(q|v)_proj")) == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    assert names(select_linear_modules(model, r"model\.layers\.1\.mlp\.down_proj")) == ["model.layers.1.mlp.down_proj"]
    with pytest.raises(ValueError, match=r"Invalid target_modules: 'q_proj' matches no nn.Linear .*regular expression"):
        select_linear_modules(model, "q_proj")          # a substring, but not the whole name


def test_all_linear_leaves_out_the_output_head():
    assert names(select_linear_modules(tiny_llama(), "all-linear")) == LLAMA_LINEARS
    tied = tiny_llama(tie_word_embeddings=True)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    assert names(select_linear_modules(tied, "all-linear")) == LLAMA_LINEARS
    # A Hugging Face model without a head (get_output_embeddings() is None): nothing is left out.
    assert names(select_linear_modules(tiny_llama().model, "all-linear")) == [n.removeprefix("model.")
                                                                              for n in LLAMA_LINEARS]
    # Any other model: the last nn.Linear is the head; subclasses of nn.Linear are passed over.
    assert names(select_linear_modules(Plain(), "all-linear")) == ["blocks.0.0", "blocks.0.2"]


def test_only_plain_linear_submodules_are_candidates():
    model = Plain()
    assert names(select_linear_modules(model, ("blocks",))) == ["blocks.0.0", "blocks.0.2"]   # ReLU passed over
    with pytest.raises(ValueError, match=re.escape(
            "Invalid target_modules: ('attn',) matches 'attn.out_proj', a NonDynamicallyQuantizableLinear")):
        select_linear_modules(model, ("attn",))
    with pytest.raises(ValueError, match="matches no nn.Linear"):
        select_linear_modules(nn.Linear(3, 3), ".*")    # the root module is never selected


@pytest.mark.parametrize("value, message", [
    ((), r"Invalid target_modules: \(\) \(expected non-empty strings\)"),
    (("attn", ""), r"Invalid target_modules: \('attn', ''\) \(expected non-empty strings\)"),
    ((1,), r"Invalid target_modules: \(1,\) \(expected non-empty strings\)"),
    (3, r"Invalid target_modules: 3 \(expected a collection of name parts, a regular expression or 'all-linear'\)"),
    ("(q", r"Invalid target_modules: '\(q' \(a single string is a regular expression: missing \)"),
    (("conv",), r"Invalid target_modules: \('conv',\) matches no nn.Linear of the model \(a module is selected when "
                r"its qualified name contains one of them\); its nn.Linear modules: \[model.layers.0.self_attn.q_proj, "
                r"model.layers.0.self_attn.k_proj, .*, \.\.\.\] \(15 in all\)"),
])
def test_bad_values_are_named(value, message):
    with pytest.raises(ValueError, match=message):
        select_linear_modules(tiny_llama(), value)


def test_the_three_users_share_the_rule():
    selected = names(select_linear_modules(tiny_llama(), r".*\.mlp\..*"))
    groups = lowrank_param_groups(tiny_llama(), target_modules=r".*\.mlp\..*", rank=4)
    assert [name for name, _ in groups[0]["params"]] == [f"{n}.weight" for n in selected]
    sst = convert_to_sst(tiny_llama(), rank=4, target_modules=r".*\.mlp\..*")
    sltrain = convert_to_sltrain(tiny_llama(), rank=4, target_modules=r".*\.mlp\..*")
    for converted in (sst, sltrain):
        kept = [name for name, m in converted.named_modules() if type(m) is nn.Linear]
        assert set(selected).isdisjoint(kept) and "model.layers.0.self_attn.q_proj" in kept
    for convert in (lambda m: convert_to_sst(m, rank=4, target_modules="all-linear"),
                    lambda m: convert_to_sltrain(m, rank=4, target_modules="all-linear")):
        assert [n for n, m in convert(tiny_llama()).named_modules() if type(m) is nn.Linear] == ["lm_head"]


def test_frozen_selection_is_refused():
    model = tiny_llama()
    for _, module in select_linear_modules(model, ("mlp",)):
        module.weight.requires_grad_(False)
    with pytest.raises(ValueError, match=r"Invalid target_modules: \('mlp',\) selects only .* frozen"):
        lowrank_param_groups(model, target_modules=("mlp",))


def test_replace_submodule():
    model = tiny_llama()
    new = nn.Identity()
    replace_submodule(model, "model.layers.1.mlp", new)
    assert model.model.layers[1].mlp is new
    replace_submodule(model, "lm_head", new)                     # a top-level child
    assert model.lm_head is new
    with pytest.raises(ValueError, match=r"Invalid qualified_name: '' \(the model itself cannot be replaced"):
        replace_submodule(model, "", new)
    with pytest.raises(AttributeError, match="no attribute `nothing`"):
        replace_submodule(model, "model.nothing.q_proj", new)
