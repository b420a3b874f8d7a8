"""Int8 weights through checkpoints and exports: codes and scales as plain tensors that
``torch.load(weights_only=True)`` reads, a resume bit-identical to the uninterrupted run, a dense
checkpoint loaded into an int8 model, and export to an ordinary model (Hugging Face
``save_pretrained`` / ``from_pretrained``) and back.

Tolerances: the fp32 export is exact (``s·q`` of a bf16 or fp32 scale and a 7-bit code fits fp32);
re-quantizing it moves a value by at most half a step of the new scale (which is finer where a
row's largest code was 126, not 127). A bf16 export adds its own rounding, ``2⁻⁹`` of a value,
at most ``127·2⁻⁹ < 1/4`` step: a value then moves by less than one step.
"""
import pytest
import torch
import transformers
from support.toy import loss_of, make_model

from lowrank_optim.rounding import rounding_generator
from lowrank_optim.weights import (
    dequantize_model_weights,
    dequantize_weight,
    int8_storage,
    int8_update_,
    is_int8_weight,
    quantize_model_weights,
)


def _train(model, steps, start=0):
    """Plain SGD through int8_update_ with each parameter's rounding generator."""
    for step in range(start, start + steps):
        model.zero_grad()
        loss_of(model, step).backward()
        with torch.no_grad():
            for name, param in model.named_parameters():
                if is_int8_weight(param):
                    int8_update_(param, param.grad, a=0.999, b=0.05,
                                 generator=rounding_generator(name, step, param.device))
                else:
                    param.sub_(0.05 * param.grad)


def _int8_model(seed=0, dtype=torch.bfloat16):
    model = make_model(seed=seed, dtype=dtype)
    quantize_model_weights(model, include_embeddings=True, include_head=True)
    return model


def _identical(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_a_weights_only_checkpoint_resumes_bit_identically(tmp_path):
    model = _int8_model()
    _train(model, 3)
    state = model.state_dict()
    assert "up.weight.int8_codes" in state and "up.weight" not in state
    assert all(type(value) is torch.Tensor for value in state.values())
    assert state["up.weight.int8_codes"].dtype == torch.int8 and state["up.weight.int8_scales"].dtype == torch.bfloat16
    torch.save(state, tmp_path / "checkpoint.pt")
    resumed = _int8_model(seed=1)
    resumed.load_state_dict(torch.load(tmp_path / "checkpoint.pt", weights_only=True))
    assert _identical(model, resumed)
    _train(model, 3, start=3)
    _train(resumed, 3, start=3)
    assert _identical(model, resumed)


def test_a_dense_checkpoint_loads_into_an_int8_model_rounded_to_nearest():
    dense = make_model(dtype=torch.bfloat16)
    model = _int8_model(seed=1)
    model.load_state_dict(dense.state_dict())
    expected = _int8_model(seed=0)                       # the dense model converted
    assert _identical(model, expected)


@pytest.mark.parametrize("dtype, steps", [(torch.float32, 0.5 * (1 + 1e-5)), (torch.bfloat16, 1.0)])
def test_export_and_back(dtype, steps):
    model = _int8_model()
    _train(model, 2)
    before = {name: dequantize_weight(p, torch.float64) for name, p in model.named_parameters() if is_int8_weight(p)}
    assert dequantize_model_weights(model, dtype) == ["embed.weight", "up.weight", "down.weight", "head.weight"]
    assert not any(is_int8_weight(p) for p in model.parameters())
    assert "up.weight" in model.state_dict() and "up.weight.int8_codes" not in model.state_dict()
    if dtype == torch.float32:
        assert all(torch.equal(model.get_parameter(name).double(), value) for name, value in before.items())
    quantize_model_weights(model, include_embeddings=True, include_head=True)
    for name, value in before.items():
        scales = int8_storage(model.get_parameter(name))[1].double()[:, None]
        assert ((dequantize_weight(model.get_parameter(name), torch.float64) - value).abs() <= steps * scales).all()


def _tiny_llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32)
    return transformers.LlamaForCausalLM(config).to(torch.bfloat16)


def test_save_pretrained_of_the_exported_model_and_back(tmp_path):
    model = _tiny_llama()
    converted = quantize_model_weights(model, include_embeddings=True, include_head=True)
    assert len(converted) == 2 * 7 + 2
    before = {name: int8_storage(p)[0].clone() for name, p in model.named_parameters() if is_int8_weight(p)}
    tokens = torch.tensor([[1, 5, 9, 13, 2]])
    with torch.no_grad():
        logits = model(tokens).logits.float()
    dequantize_model_weights(model)
    model.save_pretrained(tmp_path)
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert set(loaded.state_dict()) == set(_tiny_llama().state_dict())
    quantize_model_weights(loaded, include_embeddings=True, include_head=True)
    for name, param in loaded.named_parameters():
        if is_int8_weight(param):
            # less than a step of the new scale, which is at most 127/126 finer: codes within 2
            assert (int8_storage(param)[0].int() - before[name].int()).abs().max() <= 2, name
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens).logits.float(), logits, rtol=0.05, atol=0.05)
