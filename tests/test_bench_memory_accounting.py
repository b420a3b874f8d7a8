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
