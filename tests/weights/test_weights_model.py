"""Converting a model: what is selected and reported, the forward and gradients of the converted
model against its dequantized twin, embeddings, tied weights, and the arguments refused.

Tolerances: the int8 model computes ``(x @ q.T) * s`` (torchao's linear) where the twin computes
``x @ (s·q).T``: the same products in another order, fp32 rounding apart (``1e-5`` relative).
"""
import copy

import pytest
import torch
import transformers
from support.toy import loss_of, make_model
from torch import nn

from lowrank_optim.weights import (
    dequantize_model_weights,
    dequantize_weight,
    int8_storage,
    is_int8_weight,
    quantize_model_weights,
)


def _dense_twin(model: nn.Module) -> nn.Module:
    twin = copy.deepcopy(model)
    dequantize_model_weights(twin, torch.float32)
    return twin


def test_the_selection_and_the_report():
    model = make_model()
    assert quantize_model_weights(model) == ["up.weight", "down.weight"]        # all-linear: no head
    assert quantize_model_weights(model, include_head=True, include_embeddings=True) == ["head.weight",
                                                                                        "embed.weight"]
    assert quantize_model_weights(model, include_head=True) == []              # already int8
    model = make_model()
    assert quantize_model_weights(model, ("up",)) == ["up.weight"]
    assert quantize_model_weights(model, None, include_embeddings=True) == ["embed.weight"]
    assert not is_int8_weight(model.down.weight) and not is_int8_weight(model.up.bias)


def test_forward_and_gradients_are_those_of_the_dequantized_weights():
    model = make_model()
    quantize_model_weights(model, include_head=True, include_embeddings=True)
    twin = _dense_twin(model)
    loss, twin_loss = loss_of(model, 0), loss_of(twin, 0)
    torch.testing.assert_close(loss, twin_loss, rtol=1e-5, atol=0)
    loss.backward()
    twin_loss.backward()
    for (name, param), twin_param in zip(model.named_parameters(), twin.parameters()):
        assert type(param.grad) is torch.Tensor and param.grad.shape == param.shape, name
        torch.testing.assert_close(param.grad, twin_param.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_the_forward_keeps_no_dequantized_weight_for_backward():
    """What autograd saves for backward is the input activations and the int8 weights themselves:
    no tensor of a converted weight's shape in a float dtype."""
    model = make_model(dtype=torch.bfloat16)
    quantize_model_weights(model, include_head=True, include_embeddings=True)
    weight_shapes = {tuple(p.shape) for p in model.parameters() if is_int8_weight(p)}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss_of(model, 0).backward()
    dense = [t for t in saved if not is_int8_weight(t) and t.is_floating_point() and tuple(t.shape) in weight_shapes]
    assert any(is_int8_weight(t) for t in saved) and not dense
    assert all(int8_storage(p)[0].dtype == torch.int8 for p in model.parameters() if is_int8_weight(p))


def test_bf16_models_run_in_bf16_and_give_bf16_gradients():
    model = make_model(dtype=torch.bfloat16)
    quantize_model_weights(model, include_embeddings=True)
    loss = loss_of(model, 0)
    loss.backward()
    assert model.up.weight.dtype == torch.bfloat16 and model.up.weight.grad.dtype == torch.bfloat16
    assert model.embed.weight.grad.dtype == torch.bfloat16


def test_embedding_gradient_skips_padding_and_refuses_max_norm():
    torch.manual_seed(0)
    embedding = nn.Embedding(11, 5, padding_idx=-2)
    quantize_model_weights(nn.Sequential(embedding), None, include_embeddings=True)
    dense = nn.Embedding(11, 5, padding_idx=9, _weight=dequantize_weight(embedding.weight, torch.float32))
    tokens = torch.tensor([[1, 9, 3], [3, 10, 9]])
    out, dense_out = embedding(tokens), dense(tokens)
    assert torch.equal(out, dense_out)
    (out * dense_out.detach()).sum().backward()
    (dense_out * dense_out.detach()).sum().backward()
    assert torch.equal(embedding.weight.grad, dense.weight.grad) and not embedding.weight.grad[9].any()
    with pytest.raises(NotImplementedError, match="does not take max_norm=1.0"):
        torch.nn.functional.embedding(tokens, embedding.weight, max_norm=1.0)


def test_tied_weights_are_converted_once_for_every_owner():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(config)
    names = quantize_model_weights(model, None, include_embeddings=True)
    assert names == ["model.embed_tokens.weight", "lm_head.weight"]
    assert model.lm_head.weight is model.model.embed_tokens.weight and is_int8_weight(model.lm_head.weight)
    model(torch.tensor([[1, 2, 3]])).logits.sum().backward()
    assert model.lm_head.weight.grad.shape == (64, 32)


def test_the_arguments_refused_are_named():
    with pytest.raises(ValueError, match="Invalid include_head: 'yes'"):
        quantize_model_weights(make_model(), include_head="yes")
    with pytest.raises(ValueError, match="Invalid include_embeddings: 1"):
        quantize_model_weights(make_model(), include_embeddings=1)
    with pytest.raises(ValueError, match="Invalid target_modules: .*'attn'"):
        quantize_model_weights(make_model(), ("attn",))
    with pytest.raises(ValueError, match="Invalid target_modules: None selects nothing"):
        quantize_model_weights(make_model(), None)
    with pytest.raises(ValueError, match="Invalid include_embeddings: True \\(the model has no nn.Embedding\\)"):
        quantize_model_weights(nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)), include_embeddings=True)
    with pytest.raises(ValueError, match="Cannot store up.weight in int8: Invalid scale_dtype: torch.float16"):
        quantize_model_weights(make_model(dtype=torch.float16), ("up",))
    with pytest.raises(ValueError, match="Invalid dtype: torch.int8"):
        dequantize_model_weights(make_model(), torch.int8)
