"""SST layers: zero-distortion conversion, merging back, the enhanced-gradient backward, bookkeeping."""

import copy

import pytest
import torch
from support.sst_helpers import TinyBlock
from torch import nn

from lowrank_optim.sst import SSTLinear, convert_to_sst, merge_sst, sst_layers
from lowrank_optim.sst.enhanced_gradient import spectral_linear
from lowrank_optim.sst.parameter_owners import sst_owner

# fp32 SVD reconstructs W to about k·ε_fp32·‖W‖ ≈ 16·1.2e-7·1 per entry; outputs here are O(1), so 2e-6
# leaves a few times headroom while any real distortion (a wrong factor, a lost column) is ≥ 1e-2.
ZERO_DISTORTION_ATOL = 2e-6


def _converted_pair(rank=4):
    torch.manual_seed(0)
    dense = TinyBlock()
    return dense, convert_to_sst(copy.deepcopy(dense), rank)


def _perturbed_layer(dtype=torch.float32, bias=True):
    """A layer whose active set is not the initial one and whose active vectors have drifted, so that
    the stale columns of the U/V buffers differ from the trained ones."""
    torch.manual_seed(1)
    layer = SSTLinear(12, 7, rank=3, bias=bias, dtype=dtype)
    layer.set_active_indices_(torch.tensor([5, 0, 3]))
    with torch.no_grad():
        layer.U_active.add_(0.3 * torch.randn_like(layer.U_active))
        layer.V_active.add_(0.3 * torch.randn_like(layer.V_active))
        layer.s.mul_(torch.rand_like(layer.s) + 0.5)
    return layer


def test_conversion_has_zero_distortion_and_touches_only_targets():
    dense, sst = _converted_pair()
    x = torch.randn(32, 24)
    torch.testing.assert_close(sst(x), dense(x), rtol=0, atol=ZERO_DISTORTION_ATOL)
    assert [name for name, _ in sst_layers(sst)] == ["attn", "mlp", "mlp_gate"]
    assert type(sst.head) is nn.Linear and torch.equal(sst.head.weight, dense.head.weight)
    for name, layer in sst_layers(sst):
        torch.testing.assert_close(
            layer.merged_weight(), getattr(dense, name).weight, rtol=0, atol=ZERO_DISTORTION_ATOL
        )


def test_layer_layout_and_memory_roles():
    layer = SSTLinear(40, 16, rank=4)  # m=16, n=40, k=16
    assert {n: tuple(p.shape) for n, p in layer.named_parameters()} == {
        "s": (16,),
        "U_active": (16, 4),
        "V_active": (40, 4),
        "bias": (16,),
    }
    assert {n: tuple(b.shape) for n, b in layer.named_buffers()} == {
        "U": (16, 16),
        "V": (40, 16),
        "active_indices": (4,),
    }
    assert layer.active_indices.dtype == torch.int64
    assert torch.equal(layer.active_indices, torch.arange(4))  # initially the top-r singular values
    assert torch.all(layer.s[:-1] >= layer.s[1:])


def test_fresh_layer_has_nn_linear_default_initialisation():
    torch.manual_seed(3)
    linear = nn.Linear(20, 9)
    torch.manual_seed(3)
    layer = SSTLinear(20, 9, rank=2)
    torch.testing.assert_close(layer.merged_weight(), linear.weight, rtol=0, atol=1e-6)
    assert torch.equal(layer.bias, linear.bias)


def test_merge_round_trip_after_the_factors_moved():
    _, model = _converted_pair()
    with torch.no_grad():
        for _, layer in sst_layers(model):
            layer.U_active.add_(0.1)  # active columns now differ from the U buffer's stale copy
            layer.s.mul_(1.5)
    x = torch.randn(16, 24)
    before = model(x)
    merge_sst(model)
    assert not sst_layers(model)
    assert all(type(getattr(model, n)) is nn.Linear for n in ("attn", "mlp", "mlp_gate"))
    assert model.mlp.bias is None and model.attn.bias is not None
    # The merged weight is the same product in one GEMM instead of two: fp32 reassociation only.
    torch.testing.assert_close(model(x), before, rtol=0, atol=1e-5)


def test_set_active_indices_swaps_in_place_without_changing_the_function():
    layer = _perturbed_layer()
    x = torch.randn(5, 12)
    objects = [id(layer.U_active), id(layer.V_active)]
    U_before, s_before, V_before = layer.current_factors()
    y_before = layer(x)
    layer.set_active_indices_(torch.tensor([1, 5, 6]))
    assert [id(layer.U_active), id(layer.V_active)] == objects
    U_after, s_after, V_after = layer.current_factors()
    assert torch.equal(U_after, U_before) and torch.equal(V_after, V_before) and torch.equal(s_after, s_before)
    assert torch.equal(layer.U_active, U_before[:, [1, 5, 6]])
    # Column 5 stayed active and now sits in slot 1: it is the trained vector, not the stale buffer copy.
    assert torch.equal(layer.V_active[:, 1], V_before[:, 5])
    torch.testing.assert_close(layer(x), y_before, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "indices,message",
    [
        (torch.tensor([0, 1]), r"Invalid indices shape: \(2,\)"),
        (torch.tensor([0, 1, 7]), r"Invalid indices: \[0, 1, 7\] \(expected values in \[0, 7\)\)"),
        (torch.tensor([2, 2, 3]), r"Invalid indices: \[2, 2, 3\] \(expected distinct values\)"),
    ],
)
def test_set_active_indices_rejects(indices, message):
    layer = _perturbed_layer()
    with pytest.raises(ValueError, match=message):
        layer.set_active_indices_(indices)


def test_resvd_restores_orthogonality_and_keeps_the_function():
    layer = _perturbed_layer()
    U, _, V = layer.current_factors()
    eye = torch.eye(7)
    assert (U.mT @ U - eye).abs().max() > 1e-2  # the drift the re-SVD must remove
    weight = layer.merged_weight()
    layer.resvd_()
    U, s, V = layer.current_factors()
    assert (U.mT @ U - eye).abs().max() < 1e-5 and (V.mT @ V - eye).abs().max() < 1e-5
    assert torch.all(s >= 0) and torch.all(s[:-1] >= s[1:])
    torch.testing.assert_close(layer.merged_weight(), weight, rtol=0, atol=1e-5)


@pytest.mark.parametrize("bias", [True, False])
def test_enhanced_gradient_against_dense_autograd(bias):
    """float64; the reference builds W = U_eff·diag(s)·V_effᵀ with autograd (true gradients)."""
    layer = _perturbed_layer(torch.float64, bias=bias)
    idx = layer.active_indices
    x = torch.randn(2, 3, 12, dtype=torch.float64, requires_grad=True)
    grad_y = torch.randn(2, 3, 7, dtype=torch.float64)

    ref = {n: p.detach().clone().requires_grad_() for n, p in layer.named_parameters()}
    x_ref = x.detach().clone().requires_grad_()
    U_eff = layer.U.index_copy(1, idx, ref["U_active"])
    V_eff = layer.V.index_copy(1, idx, ref["V_active"])
    y_ref = x_ref @ ((U_eff * ref["s"]) @ V_eff.mT).mT + (ref["bias"] if bias else 0.0)
    y_ref.backward(grad_y)

    y = layer(x)
    y.backward(grad_y)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.s.grad, ref["s"].grad, rtol=1e-12, atol=1e-12)
    s_active = layer.s.detach()[idx]
    # enhanced = true gradient without its diag(s_active) factor
    torch.testing.assert_close(layer.U_active.grad * s_active, ref["U_active"].grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.V_active.grad * s_active, ref["V_active"].grad, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(layer.U_active.grad, ref["U_active"].grad)  # they do differ
    if bias:
        torch.testing.assert_close(layer.bias.grad, ref["bias"].grad, rtol=1e-12, atol=1e-12)


def test_enhanced_gradient_is_defined_at_zero_singular_values():
    layer = _perturbed_layer(torch.float64)
    with torch.no_grad():
        layer.s[layer.active_indices] = 0.0
    layer(torch.randn(4, 12, dtype=torch.float64)).square().sum().backward()
    assert torch.isfinite(layer.U_active.grad).all() and layer.U_active.grad.abs().sum() > 0


def test_stale_buffer_columns_do_not_leak_into_outputs():
    layer = _perturbed_layer(torch.float64)
    x = torch.randn(4, 12, dtype=torch.float64)
    y = spectral_linear(x, layer.U, layer.V, layer.s, layer.active_indices, layer.U_active, layer.V_active)
    U_garbage, V_garbage = layer.U.clone(), layer.V.clone()
    U_garbage[:, layer.active_indices] = 1e3
    V_garbage[:, layer.active_indices] = -1e3
    y_garbage = spectral_linear(x, U_garbage, V_garbage, layer.s, layer.active_indices, layer.U_active, layer.V_active)
    assert torch.equal(y, y_garbage)


def test_autocast_computes_in_bf16_and_keeps_fp32_gradients():
    layer = _perturbed_layer()
    x = torch.randn(6, 12)
    expected = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), expected, rtol=0, atol=5e-2)  # bf16 has 8 mantissa bits
    y.float().sum().backward()
    assert all(p.grad.dtype == torch.float32 for p in layer.parameters())


def test_parameter_owners_follow_copies_and_conversions():
    layer = SSTLinear(8, 6, rank=2)
    assert sst_owner(layer.s) == (layer, "s") and sst_owner(layer.bias) is None
    twin = copy.deepcopy(layer)
    assert sst_owner(twin.V_active) == (twin, "V_active")
    assert sst_owner(layer.V_active) == (layer, "V_active")
    layer.to(torch.float64)
    assert sst_owner(layer.U_active) == (layer, "U_active") and layer.U_active.dtype == torch.float64

    old_s = twin.s
    twin.load_state_dict(copy.deepcopy(twin.state_dict()), assign=True)  # replaces the parameter objects
    assert twin.s is not old_s and sst_owner(twin.s) == (twin, "s")
    with pytest.raises(RuntimeError, match=r"was 's' of SSTLinear\(.*\), which has replaced it"):
        sst_owner(old_s)


def test_parameter_owners_survive_overwrite_on_conversion():
    layer = SSTLinear(8, 6, rank=2)
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        old = layer.s
        layer.to(torch.float64)
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(False)
    assert layer.s is not old and sst_owner(layer.s) == (layer, "s")


def test_meta_device_conversion_counts_parameters():
    with torch.device("meta"):
        model = TinyBlock()
    convert_to_sst(model, rank=4)
    counts = {name: sum(p.numel() for p in layer.parameters()) for name, layer in sst_layers(model)}
    # k + (m + n)·r (+ bias m): attn 16+(16+24)·4+16, mlp 16+(40+16)·4, mlp_gate 6+(6+40)·4+6
    assert counts == {"attn": 192, "mlp": 240, "mlp_gate": 196}


class _WithMultiheadAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2)


@pytest.mark.parametrize(
    "make,kwargs,message",
    [
        (TinyBlock, {"rank": 0}, r"Invalid rank: 0 \(expected an integer with 1 <= rank <= 16"),
        (TinyBlock, {"rank": 7}, r"Invalid rank: 7 .*<= 6 = min\(in_features, out_features\) of 'mlp_gate'"),
        (TinyBlock, {"rank": 2.0}, r"Invalid rank: 2\.0"),
        (TinyBlock, {"rank": 2, "target_modules": ("proj",)}, r"Invalid target_modules: \('proj',\) matches no"),
        (TinyBlock, {"rank": 2, "target_modules": "mlp_"}, r"Invalid target_modules: 'mlp_' matches no"),  # fullmatch
        (TinyBlock, {"rank": 2, "target_modules": "(attn"}, r"Invalid target_modules: '\(attn' \(a single string is a"),
        (TinyBlock, {"rank": 2, "target_modules": ()}, r"Invalid target_modules: \(\) \(expected non-empty"),
        (_WithMultiheadAttention, {"rank": 2}, r"matches 'attn\.out_proj', a NonDynamicallyQuantizableLinear"),
    ],
)
def test_convert_rejects(make, kwargs, message):
    model = make()
    with pytest.raises(ValueError, match=message):
        convert_to_sst(model, **kwargs)
    assert not sst_layers(model)  # nothing converted


def test_layer_rejects_bad_rank_and_weight():
    with pytest.raises(ValueError, match=r"Invalid rank: 9 \(expected an integer with 1 <= rank <= .* = 8\)"):
        SSTLinear(8, 10, rank=9)
    with pytest.raises(ValueError, match=r"Invalid weight shape: \(8, 10\) \(expected \(10, 8\)\)"):
        SSTLinear(8, 10, rank=2).load_dense_weight_(torch.zeros(8, 10))
