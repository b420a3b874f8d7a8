"""SST and SLTrain models through save_pretrained / from_pretrained, both ways, on a tiny random LLaMA."""
import functools
import json

import pytest
import torch

from lowrank_optim import SLTrainLinear, SSTLinear, convert_to_sltrain, convert_to_sst

transformers = pytest.importorskip("transformers")

from lowrank_optim.integrations.transformers import (  # noqa: E402
    from_pretrained_converted,
    merged_state_dict,
    save_pretrained_merged,
)

CONVERSIONS = {
    "sst": functools.partial(convert_to_sst, rank=4),
    "sltrain": functools.partial(convert_to_sltrain, rank=4, density=0.1, alpha=8.0),
}
TOKENS = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))


def tiny_llama(tie_word_embeddings=False):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32,
                                      tie_word_embeddings=tie_word_embeddings)
    return transformers.LlamaForCausalLM(config)


def converted_llama(method, **kwargs):
    """A converted model moved away from its initialisation (SLTrain starts with B = 0, SST with the
    SVD of the dense weights), as after some training."""
    model = CONVERSIONS[method](tiny_llama(**kwargs))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return model.eval()


def logits(model):
    with torch.no_grad():
        return model(input_ids=TOKENS).logits


@pytest.mark.parametrize("method", list(CONVERSIONS))
def test_merged_checkpoint_is_a_plain_llama(tmp_path, method):
    model = converted_llama(method)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    save_pretrained_merged(model, tmp_path)
    assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())    # model untouched
    dense, info = transformers.LlamaForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info[kind] for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert set(dense.state_dict()) == set(tiny_llama().state_dict())
    # fp32 logits of order 1; the merged product rounds differently from the factored forward pass.
    torch.testing.assert_close(logits(dense), logits(model), rtol=1e-5, atol=1e-5)
    assert merged_state_dict(model).keys() == dense.state_dict().keys()


@pytest.mark.parametrize("method", list(CONVERSIONS))
def test_converted_checkpoint_loads_exactly_with_from_pretrained_converted(tmp_path, method):
    model = converted_llama(method)
    model.save_pretrained(tmp_path)
    loaded = from_pretrained_converted(transformers.LlamaForCausalLM, tmp_path, CONVERSIONS[method])
    assert not loaded.training
    layer_type = SSTLinear if method == "sst" else SLTrainLinear
    assert isinstance(loaded.model.layers[1].mlp.down_proj, layer_type)
    expected = model.state_dict()
    assert loaded.state_dict().keys() == expected.keys()
    assert all(torch.equal(value, expected[key]) for key, value in loaded.state_dict().items())
    assert torch.equal(logits(loaded), logits(model))
    wide = from_pretrained_converted(transformers.LlamaForCausalLM, tmp_path, CONVERSIONS[method], dtype=torch.float64)
    assert {p.dtype for p in wide.parameters()} == {torch.float64}
    assert all(torch.equal(value, expected[key].to(value.dtype)) for key, value in wide.state_dict().items())


@pytest.mark.parametrize("method", list(CONVERSIONS))
def test_naive_from_pretrained_of_a_converted_checkpoint_reinitialises_the_layers(tmp_path, method):
    """What the integration exists for: from_pretrained loads without error, reports the keys, and
    the converted layers come back freshly initialised."""
    model = converted_llama(method)
    model.save_pretrained(tmp_path)
    naive, info = transformers.LlamaForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert "model.layers.0.self_attn.q_proj.weight" in info["missing_keys"]
    own_key = "model.layers.0.self_attn.q_proj." + ("U" if method == "sst" else "sparse_values")
    assert own_key in info["unexpected_keys"]
    assert (logits(naive) - logits(model)).abs().max() > 1e-2


def test_tied_embeddings_and_sharded_checkpoints(tmp_path):
    model = converted_llama("sst", tie_word_embeddings=True)
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and "lm_head.weight" not in index["weight_map"]
    loaded = from_pretrained_converted(transformers.LlamaForCausalLM, tmp_path, CONVERSIONS["sst"])
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(logits(loaded), logits(model))


def test_mismatched_conversions_are_refused_before_loading(tmp_path):
    model = converted_llama("sst")
    model.save_pretrained(tmp_path / "sst")
    with pytest.raises(ValueError, match=r"Invalid pretrained_path: .* does not match the converted LlamaForCausalLM "
                                         r"\(of another shape: model.layers.0.mlp.down_proj.U_active \(32, 4\) "
                                         r"!= \(32, 2\), .* \(42\)\)"):
        from_pretrained_converted(transformers.LlamaForCausalLM, tmp_path / "sst",
                                  functools.partial(convert_to_sst, rank=2))
    with pytest.raises(ValueError, match=r"unexpected: model.layers.0.mlp.down_proj.U, .* \(84\); missing: "
                                         r"model.layers.0.self_attn.q_proj.weight, .* \(14\)"):
        from_pretrained_converted(transformers.LlamaForCausalLM, tmp_path / "sst", lambda m: m)
    save_pretrained_merged(model, tmp_path / "dense")
    with pytest.raises(ValueError, match=r"loads with LlamaForCausalLM.from_pretrained"):
        from_pretrained_converted(transformers.LlamaForCausalLM, tmp_path / "dense", CONVERSIONS["sst"])
    with pytest.raises(ValueError, match=r"Invalid pretrained_path: .* \(no model.safetensors or "
                                         r"model.safetensors.index.json in it\)"):
        (tmp_path / "dense" / "model.safetensors").unlink()
        from_pretrained_converted(transformers.LlamaForCausalLM, tmp_path / "dense", CONVERSIONS["sst"])
    with pytest.raises(ValueError, match="Invalid kwargs: 'state_dict'"):
        save_pretrained_merged(model, tmp_path / "other", state_dict={})
