"""SST on a Hugging Face LLaMA: conversion by name, training, merging; trainable-parameter counts."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lowrank_optim.sst import SSTAdamW, convert_to_sst, merge_sst, sst_layers  # noqa: E402

LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]  # fmt: skip


def _tiny_llama():
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()  # eval: no dropout (there is none by default)


def test_tiny_llama_converts_trains_and_merges():
    model = _tiny_llama()
    input_ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense_logits = model(input_ids).logits
    convert_to_sst(model, rank=8)
    assert [name for name, _ in sst_layers(model)] == [f"model.layers.{i}.{n}" for i in range(2) for n in LINEARS]
    assert type(model.lm_head) is torch.nn.Linear
    with torch.no_grad():
        # fp32 SVD rounding (~1e-6 per weight entry) through 2 layers and the head: logits O(0.1-1).
        torch.testing.assert_close(model(input_ids).logits, dense_logits, rtol=0, atol=1e-4)

    # k = 32 and r = 8 everywhere: a round is 4 resamples, so 30 steps cross 6 resamples and a re-SVD.
    optimizer = SSTAdamW(model.parameters(), lr=1e-2, update_interval=5)
    initial_weights = {name: layer.merged_weight() for name, layer in sst_layers(model)}
    losses = []
    for _ in range(30):
        optimizer.zero_grad()
        loss = model(input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.15 * losses[0], losses  # ln(64) ≈ 4.16 at the start; memorising a fixed batch
    for name, layer in sst_layers(model):  # every SST layer trained (beyond rounding)
        assert (layer.merged_weight() - initial_weights[name]).abs().max() > 1e-3, name

    with torch.no_grad():
        sst_logits = model(input_ids).logits
        merge_sst(model)
        assert not sst_layers(model)
        torch.testing.assert_close(model(input_ids).logits, sst_logits, rtol=0, atol=1e-4)


def sst_parameter_counts(hidden, intermediate, layers, vocab, rank):
    """(dense total, SST trainable) for a LLaMA with untied embedding and head, attn+mlp converted.

    Each m×n linear becomes k + (m + n)·r trainable values (k = min(m, n)); norms, embedding and head
    stay trainable as they are.
    """
    shapes = [(hidden, hidden)] * 4 + [(intermediate, hidden)] * 2 + [(hidden, intermediate)]
    dense_linears = layers * sum(m * n for m, n in shapes)
    sst_linears = layers * sum(min(m, n) + (m + n) * rank for m, n in shapes)
    rest = 2 * vocab * hidden + (2 * layers + 1) * hidden  # embedding, head, RMSNorm weights
    return dense_linears + rest, sst_linears + rest


@pytest.mark.parametrize(
    "hidden,intermediate,layers,heads,rank",
    [(32, 64, 2, 4, 8), (512, 1376, 8, 8, 64), (2048, 5461, 24, 32, 128)],
    ids=["tiny", "60M-r64", "1B-r128"],
)
def test_trainable_counts_match_the_formula(hidden, intermediate, layers, heads, rank):
    config = transformers.LlamaConfig(
        vocab_size=32000 if hidden > 32 else 64,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        tie_word_embeddings=False,
    )
    with torch.device("meta"):  # shapes only: SVD and copies run as shape functions
        model = transformers.LlamaForCausalLM(config)
    dense = sum(p.numel() for p in model.parameters())
    convert_to_sst(model, rank)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert (dense, trainable) == sst_parameter_counts(hidden, intermediate, layers, config.vocab_size, rank)


def test_paper_trainable_share_for_llama_1b():
    """SST paper: LLaMA-1.3B (hidden 2048, 24 layers) at r = 128 trains 18.7% of the parameters."""
    dense, trainable = sst_parameter_counts(2048, 5461, 24, 32000, 128)
    assert round(100 * trainable / dense, 1) == 18.7
