"""convert_to_sltrain / merge_sltrain on a tiny Hugging Face LLaMA and on plain modules."""

import io
import re

import pytest
import torch
from torch import nn

from lowrank_optim.sltrain import SLTrainLinear, convert_to_sltrain, merge_sltrain

transformers = pytest.importorskip("transformers")

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def llama_config(hidden, intermediate, layers, heads, vocab):
    return transformers.LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        vocab_size=vocab,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(llama_config(32, 64, 2, 4, 64)).eval()


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def llama_parameter_counts(hidden, intermediate, layers, vocab, rank, density_percent):
    """(full-rank, SLTrain) parameter counts, written out independently of the library.

    Per layer: q, k, v, o are h×h, gate and up are i×h, down is h×i; two RMSNorms (h each);
    untied embedding and head (V×h each) and the final norm stay dense.
    """
    h, i = hidden, intermediate
    dense_rest = 2 * vocab * h + layers * 2 * h + h
    full = dense_rest + layers * (4 * h * h + 3 * h * i)
    attention = 4 * (rank * 2 * h + density_percent * h * h // 100)
    mlp = 3 * (rank * (h + i) + density_percent * h * i // 100)
    return full, dense_rest + layers * (attention + mlp)


def test_converts_exactly_the_attention_and_mlp_projections():
    model = convert_to_sltrain(tiny_llama(), rank=4, alpha=8.0)
    converted = {name for name, m in model.named_modules() if isinstance(m, SLTrainLinear)}
    expected = {f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ATTENTION_PROJECTIONS}
    expected |= {f"model.layers.{i}.mlp.{p}" for i in range(2) for p in MLP_PROJECTIONS}
    assert converted == expected
    assert type(model.lm_head) is nn.Linear
    assert isinstance(model.model.embed_tokens, nn.Embedding)
    assert model.model.layers[1].mlp.up_proj.support_name == "model.layers.1.mlp.up_proj"
    q0, q1 = model.model.layers[0].self_attn.q_proj, model.model.layers[1].self_attn.q_proj
    assert not torch.equal(q0.sparse_support, q1.sparse_support)  # the name enters the support


def test_tiny_llama_parameter_count_matches_formula():
    full, sltrain = llama_parameter_counts(32, 64, 2, vocab=64, rank=4, density_percent=3)
    model = tiny_llama()
    assert parameter_count(model) == full
    assert parameter_count(convert_to_sltrain(model, rank=4)) == sltrain


def test_llama_60m_parameter_count_on_meta_device():
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(llama_config(512, 1376, 8, 8, 32000))
    full, sltrain = llama_parameter_counts(512, 1376, 8, vocab=32000, rank=128, density_percent=3)
    assert parameter_count(model) == full
    assert parameter_count(convert_to_sltrain(model, rank=128, alpha=32.0)) == sltrain


def train_on_fixed_batch(model, parameters, steps=30):
    input_ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(parameters, lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=input_ids, labels=input_ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_converted_tiny_llama_trains_with_adamw():
    model = convert_to_sltrain(tiny_llama(), rank=4, alpha=8.0).train()
    supports = {n: b.clone() for n, b in model.named_buffers() if n.endswith("sparse_support")}
    losses = train_on_fixed_batch(model, model.parameters())
    assert losses[-1] < 0.5 * losses[0], losses  # measured: 4.16 -> 0.04
    for name, layer in model.named_modules():
        if isinstance(layer, SLTrainLinear):
            assert torch.count_nonzero(layer.B) > 0, name  # the low-rank part learned
            assert torch.equal(layer.sparse_support, supports[f"{name}.sparse_support"]), name


def test_sltrain_parameters_alone_reduce_the_loss():
    # Embeddings and head alone could memorise the batch; training only B, A, S-values and the
    # norms frozen shows the gradients through SLTrainLinear are useful on their own.
    model = convert_to_sltrain(tiny_llama(), rank=4, alpha=8.0).train()
    sltrain_parameters = [p for m in model.modules() if isinstance(m, SLTrainLinear) for p in m.parameters()]
    losses = train_on_fixed_batch(model, sltrain_parameters)
    assert losses[-1] < losses[0] - 0.3, losses  # measured: 4.16 -> 3.69


def test_state_dict_round_trip_restores_supports_and_outputs():
    source = convert_to_sltrain(tiny_llama(seed=0), rank=4, alpha=8.0, seed=0)
    buffer = io.BytesIO()
    torch.save(source.state_dict(), buffer)
    buffer.seek(0)
    target = convert_to_sltrain(tiny_llama(seed=1), rank=4, alpha=8.0, seed=1)
    target.load_state_dict(torch.load(buffer, weights_only=True))
    for (name, a), (_, b) in zip(source.named_buffers(), target.named_buffers(), strict=True):
        if name.endswith("sparse_support"):
            assert torch.equal(a, b), name
    input_ids = torch.arange(12).view(1, 12)
    torch.testing.assert_close(target(input_ids).logits, source(input_ids).logits, rtol=0, atol=0)


def test_same_seed_gives_same_supports_in_separately_built_models():
    first = convert_to_sltrain(tiny_llama(seed=0), rank=4, seed=3)
    second = convert_to_sltrain(tiny_llama(seed=5), rank=4, seed=3)
    for (name, a), (_, b) in zip(first.named_buffers(), second.named_buffers(), strict=True):
        if name.endswith("sparse_support"):
            assert torch.equal(a, b), name


def test_merge_round_trip_gives_the_same_outputs():
    model = convert_to_sltrain(tiny_llama(), rank=4, alpha=8.0)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, SLTrainLinear):
                layer.B.normal_(std=0.1)  # a trained-looking low-rank part
    input_ids = torch.arange(20).view(2, 10)
    with torch.no_grad():
        before = model(input_ids).logits
        merged = merge_sltrain(model)
        after = merged(input_ids).logits
    assert not any(isinstance(m, SLTrainLinear) for m in merged.modules())
    assert isinstance(merged.model.layers[0].self_attn.q_proj, nn.Linear)
    # The same W, composed by the same code; only the linear's matmul is shared: bitwise identical.
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_bias_is_copied_and_merge_of_a_single_layer():
    torch.manual_seed(0)
    model = nn.ModuleDict({"mlp": nn.Linear(12, 9), "head": nn.Linear(9, 3)})
    dense_bias = model["mlp"].bias.detach().clone()
    convert_to_sltrain(model, rank=2, density=0.25, alpha=4.0)
    layer = model["mlp"]
    assert isinstance(layer, SLTrainLinear) and type(model["head"]) is nn.Linear
    torch.testing.assert_close(layer.bias.detach(), dense_bias)
    merged = merge_sltrain(layer)
    assert type(merged) is nn.Linear
    torch.testing.assert_close(merged.weight, layer.merged_weight())
    x = torch.randn(4, 12)
    torch.testing.assert_close(merged(x), layer(x))


@pytest.mark.parametrize(
    "kwargs, argument, value",
    [
        ({"rank": 0}, "rank", 0),
        ({"density": 0.0}, "density", 0.0),
        ({"density": 2}, "density", 2),
        ({"alpha": 0}, "alpha", 0),
        ({"alpha": -1.0}, "alpha", -1.0),
        ({"seed": 0.5}, "seed", 0.5),
        ({"target_modules": "attn"}, "target_modules", "attn"),  # a regex: no whole name is "attn"
        ({"target_modules": ()}, "target_modules", ()),
        ({"target_modules": ("attn", "")}, "target_modules", ("attn", "")),
        ({"target_modules": ("nothing_matches",)}, "target_modules", ("nothing_matches",)),
    ],
)
def test_bad_arguments_are_named_and_leave_the_model_untouched(kwargs, argument, value):
    model = tiny_llama()
    arguments = {"rank": 4, **kwargs}
    with pytest.raises(ValueError, match=re.escape(f"Invalid {argument}: {value!r}")):
        convert_to_sltrain(model, **arguments)
    assert not any(isinstance(m, SLTrainLinear) for m in model.modules())
