"""A tiny Hugging Face LlamaForCausalLM (random config, no download) trains with both optimizers."""
import pytest
import torch

from lowrank_optim import DCTProjAdam, GaLoreAdamW, lowrank_param_groups

transformers = pytest.importorskip("transformers")


def _tiny_llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=4, max_position_embeddings=32)
    return transformers.LlamaForCausalLM(config)


@pytest.mark.parametrize("build", [
    lambda m: DCTProjAdam(m.named_parameters(), lr=3e-3, update_proj_gap=10),
    lambda m: GaLoreAdamW(lowrank_param_groups(m, rank=8, update_proj_gap=10, scale=0.25), lr=1e-2),
], ids=["dct", "galore"])
def test_tiny_llama_trains(build):
    model = _tiny_llama()
    optimizer = build(model)
    tokens = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(40):
        optimizer.zero_grad()
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    projected = [n for n, p in model.named_parameters() if any(k.startswith("proj_") for k in optimizer.state[p])]
    assert "model.layers.0.self_attn.q_proj.weight" in projected
    assert "model.layers.1.mlp.down_proj.weight" in projected
    assert not any("embed" in n or "lm_head" in n or "norm" in n for n in projected)
