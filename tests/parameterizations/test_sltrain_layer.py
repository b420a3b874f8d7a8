"""SLTrainLinear and its autograd Function against the dense formula W = (α/r)·B·A + S."""

import io
import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowrank_optim.sltrain import SLTrainLinear, SLTrainLinearFunction, support_size


def dense_reference_weight(layer: SLTrainLinear) -> torch.Tensor:
    """W = (α/r)·B·A + S by plain autograd ops (scatter, not the layer's index_add_)."""
    m, n = layer.out_features, layer.in_features
    sparse = torch.zeros(m * n, dtype=layer.sparse_values.dtype).scatter(
        0, layer.sparse_support.long(), layer.sparse_values
    )
    return layer.scale * layer.B @ layer.A + sparse.view(m, n)


def randomized_layer(in_features, out_features, rank, *, dtype=torch.float32, bias=True, density=0.2):
    """A layer with B != 0, so the low-rank path is exercised."""
    layer = SLTrainLinear(in_features, out_features, rank, density=density, alpha=3.0, bias=bias, dtype=dtype)
    with torch.no_grad():
        layer.B.normal_()
    return layer


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("in_features, out_features, rank, density", [(23, 37, 4, 0.03), (64, 16, 8, 0.5)])
def test_parameter_count(in_features, out_features, rank, density, bias):
    layer = SLTrainLinear(in_features, out_features, rank, density=density, bias=bias)
    expected = rank * (in_features + out_features) + math.floor(density * in_features * out_features)
    expected += out_features if bias else 0
    assert sum(p.numel() for p in layer.parameters()) == expected
    assert [name for name, _ in layer.named_buffers()] == ["sparse_support"]


def test_initialisation_follows_the_paper():
    torch.manual_seed(0)
    layer = SLTrainLinear(100, 80, 16, density=0.1)
    bound = 1 / math.sqrt(100)
    assert torch.count_nonzero(layer.B) == 0
    assert layer.A.abs().max() <= bound and layer.A.std() > bound / 2  # Kaiming-uniform, a=√5
    assert layer.sparse_values.abs().max() <= bound and layer.sparse_values.std() > bound / 2
    x = torch.randn(5, 100)
    # With B = 0 the layer starts as its sparse part alone.
    torch.testing.assert_close(layer(x), F.linear(x, dense_reference_weight(layer), layer.bias))


def test_gradcheck_float64():
    torch.manual_seed(0)
    layer = randomized_layer(5, 7, 3, dtype=torch.float64, density=0.3)
    x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    inputs = (x, layer.B, layer.A, layer.sparse_values, layer.sparse_support, layer.bias, layer.scale)
    assert torch.autograd.gradcheck(SLTrainLinearFunction.apply, inputs)


# float64: both sides are exact up to summation order. float32: the Function computes dB = (dYᵀX)Aᵀ
# while autograd computes (dYᵀ(XAᵀ))-like products in a different order; errors are a few ulps of
# sums over ~100 terms of O(1) values, so rtol 1e-5 / atol 1e-5.
TOLERANCES = {torch.float64: {"rtol": 1e-12, "atol": 1e-12}, torch.float32: {"rtol": 1e-5, "atol": 1e-5}}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_autograd_through_dense_weight(dtype, bias):
    torch.manual_seed(1)
    layer = randomized_layer(29, 41, 6, dtype=dtype, bias=bias)
    x = torch.randn(4, 7, 29, dtype=dtype)
    grad_output = torch.randn(4, 7, 41, dtype=dtype)
    params = [p for p in layer.parameters()]

    def outputs_and_grads(forward):
        x_leaf = x.clone().requires_grad_()
        y = forward(x_leaf)
        grads = torch.autograd.grad(y, [x_leaf, *params], grad_output)
        return y, grads

    y, grads = outputs_and_grads(layer)
    y_ref, grads_ref = outputs_and_grads(lambda t: F.linear(t, dense_reference_weight(layer), layer.bias))
    torch.testing.assert_close(y, y_ref, **TOLERANCES[dtype])
    for grad, grad_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(grad, grad_ref, **TOLERANCES[dtype])


def test_sparse_gradient_is_dense_gradient_at_support():
    torch.manual_seed(2)
    layer = randomized_layer(11, 13, 2)
    x, grad_output = torch.randn(6, 11), torch.randn(6, 13)
    layer(x).backward(grad_output)
    dense_grad = grad_output.t() @ x
    torch.testing.assert_close(layer.sparse_values.grad, dense_grad.flatten()[layer.sparse_support.long()])


def test_input_without_grad_and_one_dimensional_input():
    layer = randomized_layer(8, 6, 2)
    x = torch.randn(8)
    y = layer(x)
    assert y.shape == (6,)
    y.sum().backward()
    torch.testing.assert_close(layer.bias.grad, torch.ones(6))
    assert layer.B.grad is not None and layer.sparse_values.grad is not None


def test_autocast_computes_in_autocast_dtype_and_keeps_float32_grads():
    torch.manual_seed(3)
    layer = randomized_layer(32, 24, 4)
    x = torch.randn(16, 32)
    y32 = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16 = layer(x)
    assert y16.dtype == torch.bfloat16
    # bf16 has an 8-bit mantissa: relative error ~2⁻⁸ per product, sums of 32 terms.
    torch.testing.assert_close(y16.float(), y32, rtol=3e-2, atol=3e-2)
    y16.float().sum().backward()
    assert all(p.grad.dtype == torch.float32 for p in layer.parameters())


def saved_tensor_bytes(model: nn.Module, x: torch.Tensor) -> tuple[int, int, list[torch.Size]]:
    """Bytes saved for backward by one forward: (held by the model's parameters/buffers, other), shapes."""
    model_pointers = {t.data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        model(x)
    nbytes = [(t.data_ptr() in model_pointers, t.numel() * t.element_size()) for t in saved]
    own = sum(size for is_model_tensor, size in nbytes if is_model_tensor)
    other = sum(size for is_model_tensor, size in nbytes if not is_model_tensor)
    return own, other, [t.shape for t in saved]


class DenseFormulaLinear(nn.Module):
    """The naive implementation: autograd through an explicit dense W (saves W, m·n floats)."""

    def __init__(self, layer: SLTrainLinear):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return F.linear(x, dense_reference_weight(self.layer), self.layer.bias)


@pytest.mark.parametrize("width", [64, 256])
def test_saved_bytes_scale_with_inputs_and_factors_not_with_weight(width):
    depth, tokens, rank, density = 3, 8, 4, 0.03
    layers = [SLTrainLinear(width, width, rank, density=density, name=f"{i}") for i in range(depth)]
    x = torch.randn(tokens, width, requires_grad=True)  # as after an embedding: every layer needs dX
    own, other, shapes = saved_tensor_bytes(nn.Sequential(*layers), x)

    nnz = support_size(width, width, density)
    inputs_bytes = depth * tokens * width * 4
    factor_bytes = depth * ((2 * width * rank + nnz) * 4 + nnz * 4)  # B, A, values fp32; support int32
    assert other == inputs_bytes  # only activations: independent of m·n
    assert own == factor_bytes  # the parameters themselves, no copies
    assert (width, width) not in shapes

    _, naive_other, naive_shapes = saved_tensor_bytes(nn.Sequential(*map(DenseFormulaLinear, layers)), x)
    assert (width, width) in naive_shapes
    assert naive_other >= inputs_bytes + depth * width * width * 4


def test_state_dict_round_trip_restores_support():
    torch.manual_seed(4)
    layer = randomized_layer(30, 20, 3)
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    other = SLTrainLinear(30, 20, 3, density=0.2, alpha=3.0, seed=99, name="another")
    assert not torch.equal(other.sparse_support, layer.sparse_support)
    other.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(other.sparse_support, layer.sparse_support)
    assert other.sparse_support.dtype == torch.int32
    x = torch.randn(3, 30)
    torch.testing.assert_close(other(x), layer(x), rtol=0, atol=0)


def test_meta_device_then_reset_parameters_samples_the_same_support():
    on_cpu = SLTrainLinear(30, 20, 3, density=0.2, seed=5, name="m")
    on_meta = SLTrainLinear(30, 20, 3, density=0.2, seed=5, name="m", device="meta")
    on_meta.to_empty(device="cpu")
    on_meta.reset_parameters()
    assert torch.equal(on_meta.sparse_support, on_cpu.sparse_support)


def test_index_dtype_is_int64_when_flat_indices_exceed_int32():
    layer = SLTrainLinear(65536, 32769, 1, density=1e-6, device="meta")
    assert layer.sparse_support.dtype == torch.int64


@pytest.mark.parametrize(
    "kwargs, argument, value",
    [
        ({"rank": 0}, "rank", 0),
        ({"rank": -3}, "rank", -3),
        ({"rank": 2.5}, "rank", 2.5),
        ({"density": 0.0}, "density", 0.0),
        ({"density": 1.01}, "density", 1.01),
        ({"alpha": 0.0}, "alpha", 0.0),
        ({"alpha": -8}, "alpha", -8),
        ({"alpha": float("nan")}, "alpha", float("nan")),
        ({"name": 3}, "name", 3),
    ],
)
def test_bad_arguments_are_named(kwargs, argument, value):
    arguments = {"rank": 2, **kwargs}
    rank = arguments.pop("rank")
    with pytest.raises(ValueError, match=re.escape(f"Invalid {argument}: {value!r}")):
        SLTrainLinear(8, 8, rank, **arguments)
