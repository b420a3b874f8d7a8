"""experiments/bench/state_memory.py: the meta-device count of a small LLaMA equals the state a real
one holds after a step (lowrank_optim.optimizer_state_bytes), for every method of the table."""

from __future__ import annotations

import pytest
import torch

from experiments.bench.state_memory import METHODS, build_model, build_optimizer, meta_model, state_bytes
from lowrank_optim import optimizer_state_bytes

# Width 128 at rank 32: a 128×32 projected moment has exactly 4096 values (quantized), norms stay
# float; vocab 300 gives a 38,400-value embedding and head (flat blocks with a short last block).
VALUES = dict(hidden_size=128, intermediate_size=352, num_hidden_layers=1, num_attention_heads=4, vocab_size=300,
              max_position_embeddings=64, hidden_act="silu", rms_norm_eps=1e-6, tie_word_embeddings=False)
RANK = 32


@pytest.mark.parametrize("key", list(METHODS))
def test_meta_count_equals_the_state_after_a_real_step(key):
    impl = "native"  # the repo's LLaMA (same parameter names and shapes as HF's; importing transformers takes seconds)
    expected = state_bytes(meta_model("", torch.float32, impl, values=VALUES), key, RANK)  # checks analytic == library
    assert expected.total > 0

    torch.manual_seed(0)
    model = build_model(VALUES, impl)
    optimizer = build_optimizer(model, key, RANK)
    for param in model.parameters():
        param.grad = torch.randn_like(param)
    optimizer.step()
    assert optimizer_state_bytes(optimizer) == expected.total
    assert optimizer.projection_summary().state_bytes == expected.total


def test_cached_dct_bytes_are_the_matrices_a_step_builds():
    """state_memory's count of the cached DCT matrices (the 7B table of bench/memory) against the cache
    two real steps of bf16 weights with 8-bit moments fill: C in bf16 (the projection of the second
    step; the first, a refresh, has R from the selection's FFT) and fp32 (the weight update)."""
    from experiments.bench.state_memory import cached_dct_bytes
    from lowrank_optim import DCTProjAdam
    from lowrank_optim.projectors.dct_basis import dct_matrix

    torch.manual_seed(0)
    model = build_model(VALUES, "native").to(torch.bfloat16)
    optimizer = DCTProjAdam(model.named_parameters(), rank=RANK, moment_bits=8)
    for param in model.parameters():
        param.grad = torch.randn_like(param)
    dct_matrix.cache_clear()
    optimizer.step()
    optimizer.step()
    built = dct_matrix.cache_info().currsize
    expected = {(128, torch.bfloat16), (128, torch.float32)}         # every projected weight compresses 128
    for size, dtype in expected:
        dct_matrix(size, dtype, torch.device("cpu"))
    assert dct_matrix.cache_info().currsize == built == len(expected)  # each was built by the step
    assert cached_dct_bytes(optimizer, optimizer.projection_summary()) == 128 * 128 * (2 + 4)
    generated = DCTProjAdam(build_model(VALUES, "native").named_parameters(), rank=RANK, basis="generated")
    assert cached_dct_bytes(generated, generated.projection_summary()) == 0


def test_seven_b_table_moments_agree_across_projectors_and_the_totals_add_up():
    from experiments.bench.state_memory import seven_b_table

    rows = seven_b_table()["rows"]
    for row in rows:
        assert row["total"] == row["weights"] + row["gradients"] + row["state"] + row["projection"]
    galore, cached, generated = (next(row for row in rows if row["label"].startswith(prefix)) for prefix in (
        "8-bit GaLore, step in backward", "DCTProjAdam 8-bit, step in backward (residual scaled)",
        "DCTProjAdam 8-bit, step in backward (residual scaled), basis='generated'"))
    # same shapes, same 8-bit moments; DCTProjAdam's residual scale adds 4 B per projected weight
    assert 0 <= cached["state"] - galore["state"] <= 4 * 224
    assert generated["state"] == cached["state"]
    assert cached["projection"] - generated["projection"] == 4096 * 4096 * (2 + 4)
    # APOLLO-Mini: its 224 rank-1 weights, seeds and cached P are small against the plain embedding and
    # head (2 × 32000·4096 values each, 8-bit: 1 byte + a 4-byte scale per 256); P is k×1 bf16 per weight
    mini = next(row for row in rows if row["label"] == "APOLLO-Mini, 8-bit moments, step in backward")
    plain = 2 * 2 * 32000 * 4096 * (1 + 4 / 256)
    assert plain < mini["state"] < plain + 4 * 10**6
    assert mini["projection"] - 224 * (8 + 4) == 32 * 2 * (4 * 4096 + 3 * 4096)  # one P column of k = 4096 each
    assert round(mini["total"] / mini["parameters"], 3) == 2.119
    # the head at rank 1 too (docs/apollo.md's recipe for the issue's ≤ 2.10): its plain 8-bit moments
    # become two 8-bit moments of 32000 values; a seed, a limiter norm and a k×1 bf16 P are added
    head = next(row for row in rows if row["label"] == "APOLLO-Mini, 8-bit moments, step in backward, head at rank 1")
    assert mini["state"] - head["state"] == 2 * (32000 * 4096 - 32000) * (1 + 4 / 256)
    assert head["projection"] - mini["projection"] == 8 + 4 + 4096 * 2
    assert round(head["total"] / head["parameters"], 3) == 2.079
    # int8 weights (--weight_bits 8): the 224 decoder linears as 1-byte codes + a bf16 scale per row,
    # the embedding and head (2 × 32000·4096) and the norms in bf16; nothing else changes
    lean = next(row for row in rows if row["label"] == "int8 weights + APOLLO-Mini, 8-bit moments, step in backward")
    linear_values = mini["parameters"] - 2 * 32000 * 4096 - (2 * 32 + 1) * 4096
    linear_rows = 32 * (4 * 4096 + 2 * 11008 + 4096)       # q, k, v, o; gate, up; down (rows = out_features)
    assert lean["weights"] == linear_values + 2 * linear_rows + 2 * (mini["parameters"] - linear_values)
    assert (lean["gradients"], lean["state"], lean["projection"]) == (mini["gradients"], mini["state"],
                                                                       mini["projection"])
    assert round(lean["weights"] / lean["parameters"], 3) == 1.039


def test_checkpointed_activations_of_7b_and_the_totals_with_them():
    """The activation estimate of a 1×2048 LLaMA-7B step with checkpointing (state_memory's docstring
    formula, spelled out here) and the 7B rows it is added to."""
    from experiments.bench.state_memory import checkpointed_activation_bytes, seven_b_table
    from experiments.model_factory import read_model_config

    t, d, f, vocab, layers, heads = 2048, 4096, 11008, 32000, 32, 32
    acts = checkpointed_activation_bytes(read_model_config("llama_7b"), seq=2048)
    assert acts["checkpoints"] == 2 * layers * t * d
    assert acts["logits"] == t * (12 * vocab + 8 * d)
    assert acts["layer"] == t * (30 * d + 14 * f + 4 * heads) + 4 * d * f
    assert acts["peak"] == acts["checkpoints"] + max(acts["logits"], acts["layer"])
    bf16 = checkpointed_activation_bytes(read_model_config("llama_7b"), seq=2048, int8_weights=False)
    assert acts["peak"] - bf16["peak"] <= 4 * d * f and bf16["step"] == 0

    table = seven_b_table()
    rows = {row["label"]: row for row in table["with_activations"]["rows"]}
    for label in ("int8 weights + APOLLO-Mini, 8-bit moments, step in backward",
                  "int8 weights + APOLLO-Mini, 4-bit moments, step in backward",
                  "APOLLO-Mini, 8-bit moments, step in backward",
                  "APOLLO-Mini, 8-bit moments, step in backward, head at rank 1"):
        state = next(row for row in table["rows"] if row["label"] == label)
        assert rows[label]["total"] == state["total"] + rows[label]["activations"]
    assert rows["int8 weights + APOLLO-Mini, 4-bit moments, step in backward"]["total"] < 10 * 10**9
