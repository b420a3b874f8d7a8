"""The int8 weight format against the float64 reference: scales, codes, the half-step error bound
of rounding to nearest, the scale rule that never clips, and the arguments refused.

Tolerances: the fast path computes ``t = W/s`` in fp32, the reference in float64; a code can
differ only where fp32 rounding moves ``t`` across a tie (``k + 1/2``), i.e. within ``2⁻¹⁷`` of
one, so codes may differ by one at a handful of values and the error bound gets ``10⁻⁵`` of a
step of slack. bf16 scales are equal; fp32 scales within an fp32 ulp (the reference rounds
``absmax/127`` twice, float64 then fp32).
"""
import pytest
import torch
from lowrank_optim.kernels.int8_weight_update import check_storage, quantize_rows
from torchao.prototype.quantized_training.int8 import quantize_int8_rowwise

from lowrank_optim.reference.int8_weights import reference_dequantize, reference_quantize
from lowrank_optim.weights import dequantize_weight, int8_storage, is_int8_weight, quantize_weight

SHAPES = [(1, 1), (7, 37), (33, 300)]
SCALE_DTYPES = [torch.float32, torch.bfloat16]


def _heavy_tailed(shape, seed=0):
    generator = torch.Generator().manual_seed(seed)
    rows = torch.exp(3 * torch.randn(shape[0], 1, generator=generator))
    return torch.randn(shape, generator=generator) * rows


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("scale_dtype", SCALE_DTYPES)
def test_round_to_nearest_matches_the_float64_reference(shape, scale_dtype):
    dense = _heavy_tailed(shape)
    codes, scales = quantize_rows(dense, scale_dtype=scale_dtype)
    ref_codes, ref_scales = reference_quantize(dense, scale_dtype)
    if scale_dtype == torch.bfloat16:
        assert torch.equal(scales.double(), ref_scales)
    else:
        torch.testing.assert_close(scales.double(), ref_scales, rtol=2**-23, atol=0)
    differ = codes.long() != ref_codes
    assert differ.sum() <= max(1, dense.numel() // 10_000)
    assert (codes.long() - ref_codes).abs().max() <= 1
    error = (reference_dequantize(codes, scales) - dense.double()).abs()
    assert torch.all(error <= scales.double()[:, None] * (0.5 + 1e-5))


@pytest.mark.parametrize("scale_dtype", SCALE_DTYPES)
def test_codes_stay_within_127_and_zero_rows_are_zero(scale_dtype):
    dense = _heavy_tailed((64, 96), seed=1)
    dense[5] = 0
    weight = quantize_weight(dense.to(scale_dtype))
    codes, scales = int8_storage(weight)
    assert codes.dtype == torch.int8 and scales.dtype == scale_dtype == weight.dtype
    assert codes.abs().max() <= 127 and (codes.abs().amax(dim=1)[torch.arange(64) != 5] >= 126).all()
    assert scales[5] == 0 and not codes[5].any() and not dequantize_weight(weight)[5].any()


def test_bf16_scales_rounded_up_never_clip_where_torchao_rounding_to_nearest_does():
    """The reason for the scale rule: with the scale rounded to nearest in bf16, a row's absmax
    sits above 127 steps in most rows and is clipped; rounded up, never."""
    dense = _heavy_tailed((1000, 64), seed=2).bfloat16()
    _, torchao_scales = quantize_int8_rowwise(dense)
    absmax = dense.float().abs().amax(dim=1)
    assert (absmax / torchao_scales.float() > 127).float().mean() > 0.5
    _, scales = quantize_rows(dense, scale_dtype=torch.bfloat16)
    assert (absmax / scales.float() <= 127).all()


def test_quantize_weight_keeps_requires_grad_and_dequantizes_to_any_dtype():
    dense = _heavy_tailed((6, 10)).requires_grad_()
    weight = quantize_weight(dense, scale_dtype=torch.bfloat16)
    assert is_int8_weight(weight) and weight.requires_grad and weight.dtype == torch.bfloat16
    assert not is_int8_weight(dense) and not is_int8_weight(None)
    exact = dequantize_weight(weight, torch.float64)
    assert torch.equal(exact, reference_dequantize(*int8_storage(weight)))
    assert dequantize_weight(weight).dtype == torch.bfloat16


def test_the_arguments_refused_are_named():
    with pytest.raises(ValueError, match="Invalid scale_dtype: torch.float16"):
        quantize_weight(torch.ones(2, 3, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"a 2-D float matrix, got torch.float32 of shape \(4,\)"):
        quantize_weight(torch.ones(4))
    with pytest.raises(ValueError, match="weight is not an int8 weight"):
        dequantize_weight(torch.ones(2, 2))
    with pytest.raises(ValueError, match=r"codes must be a 2-D int8 tensor, got torch.uint8"):
        check_storage(torch.zeros(2, 3, dtype=torch.uint8), torch.zeros(2))
    with pytest.raises(ValueError, match=r"scales must be 2 values .* got torch.float32 of shape \(3,\)"):
        check_storage(torch.zeros(2, 3, dtype=torch.int8), torch.zeros(3))
