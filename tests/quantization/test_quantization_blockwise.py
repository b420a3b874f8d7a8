"""Block-wise quantization of moments against the scheme's float64 reference.

Error bound checked for every value (package doc): with ``a`` its block's absmax, ``t = x/a`` and
``q_k ≤ t ≤ q_{k+1}`` the neighbouring levels of the float64 map and ``b_k`` the decision boundary
between them (their midpoint in the map's rounding domain: the arithmetic midpoint, or
``((√q_k + √q_{k+1})/2)²`` for the 4-bit second moment's square-root map),
``|deq − x| ≤ a·max(b_k − q_k, q_{k+1} − b_k) + a·2^−22`` (half the gap for an arithmetic midpoint);
below the lowest level of a zero-free map ``|deq − x| ≤ a·(q_0 − t) + a·2^−22``. The slack ``a·2^−22``
is fp32 arithmetic: ``t`` rounded (≤ 2^−24), the fp32 level (≤ 2^−24) and the fp32 product (≤ 2^−24),
all relative to ``a``.
"""
import io

import pytest
import torch
import torch.nn.functional as F
from lowrank_optim.kernels.layout import slot_dim
from lowrank_optim.kernels.quantized_moment_update import remap_quantized_slots, storage_shapes
from lowrank_optim.kernels.slot_remap import remap_slots

from lowrank_optim.quantization import (
    codebook,
    dequantize,
    quantization_map,
    quantize,
    quantized_zeros,
    requantize_transformed,
)
from lowrank_optim.quantization.maps import midpoints, rounding_power
from lowrank_optim.quantization.reference import reference_dequantize, reference_quantize

SLACK = 2.0**-22
# odd shapes: slots of 300 values (blocks 256 + 44; 128 + 128 + 44), an odd slot length of 301
# (a half-used last byte at 4 bits), and a flat tensor of 4331 values
SHAPES = {"columns": (300, 37), "rows": (37, 301), "flat": (61, 71)}
MAPS = [(8, True), (8, False), (4, True), (4, False)]
BLOCK = {8: 256, 4: 128}


def _data(kind: str, shape, signed: bool, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if kind == "normal":
        x = torch.randn(shape, generator=generator)
    elif kind == "student_t":                        # df = 2: infinite variance, heavy outliers
        normal = torch.randn(shape, generator=generator)
        chi2 = torch.randn((2, *shape), generator=generator).pow(2).sum(0)
        x = normal / (chi2 / 2).sqrt()
    else:                                            # lognormal, σ = 3: values over ~8 decades
        x = torch.exp(3 * torch.randn(shape, generator=generator))
        x = x * torch.sign(torch.randn(shape, generator=generator))
    return x if signed else x * x                    # v-like: non-negative, squared dynamic range


def _per_value_absmax(x64: torch.Tensor, layout: str, block: int) -> torch.Tensor:
    """The absmax of each value's block, computed here from the scheme's definition."""
    slots = x64.reshape(1, -1) if layout == "flat" else (x64.t() if layout == "columns" else x64)
    length = slots.shape[1]
    n_blocks = -(-length // block)
    padded = F.pad(slots, (0, n_blocks * block - length)).view(slots.shape[0], n_blocks, block)
    absmax = padded.abs().amax(-1).repeat_interleave(block, dim=1)[:, :length]
    if layout == "flat":
        return absmax.reshape(x64.shape)
    return absmax.t() if layout == "columns" else absmax


def _error_bound(x64: torch.Tensor, absmax: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    levels = quantization_map(bits, signed)
    boundaries = midpoints(levels, bits, rounding_power(bits, signed))[:levels.numel() - 1]
    t = torch.where(absmax > 0, x64 / absmax.clamp(min=1e-300), torch.zeros_like(x64))
    upper = torch.searchsorted(levels, t.reshape(-1)).clamp(max=levels.numel() - 1).view(t.shape)
    lower = (upper - 1).clamp(min=0)
    below = t < levels[0]
    boundary = boundaries[lower]
    worst = torch.maximum(boundary - levels[lower], levels[upper] - boundary)
    gap = torch.where(below, levels[0] - t, worst)
    gap = torch.where(t == levels[upper], torch.zeros_like(gap), gap)      # exactly a level
    return absmax * (gap + SLACK)


@pytest.mark.parametrize("kind", ["normal", "student_t", "lognormal"])
@pytest.mark.parametrize("layout", ["columns", "rows", "flat"])
@pytest.mark.parametrize("bits,signed", MAPS)
def test_round_trip_error_is_within_half_a_map_step(bits, signed, layout, kind):
    x = _data(kind, SHAPES[layout], signed)
    codes, scales = quantize(x, bits, signed, layout)
    restored = dequantize(codes, scales, bits, signed, x.shape, layout)
    assert restored.dtype == torch.float32 and restored.shape == x.shape
    x64 = x.double()
    absmax = _per_value_absmax(x64, layout, BLOCK[bits])
    error = (restored.double() - x64).abs()
    bound = _error_bound(x64, absmax, bits, signed)
    assert torch.all(error <= bound), f"worst excess {float((error - bound).max()):.3g}"
    # the bound is tight: some value comes within 1% of it (excluding the fp32 slack)
    assert float((error / (bound - absmax * SLACK).clamp(min=1e-30)).max()) > 0.99


@pytest.mark.parametrize("layout", ["columns", "rows", "flat"])
@pytest.mark.parametrize("bits,signed", MAPS)
def test_codes_and_scales_match_the_float64_reference(bits, signed, layout):
    """Scales exactly (the absmax of fp32 inputs is exact); codes equal except where float64 puts
    ``t`` within 2^-22 of a midpoint (fp32 ``x/a`` may fall on the other side): none here."""
    x = _data("student_t", SHAPES[layout], signed, seed=3)
    codes, scales = quantize(x, bits, signed, layout)
    reference_codes, reference_scales = reference_quantize(x, bits, signed, layout, BLOCK[bits])
    assert torch.equal(scales.double(), reference_scales)
    assert codes.dtype == torch.uint8 and scales.dtype == torch.float32
    assert torch.equal(codes, reference_codes)
    restored = reference_dequantize(codes, scales, bits, signed, x.shape, layout, BLOCK[bits])
    torch.testing.assert_close(dequantize(codes, scales, bits, signed, x.shape, layout).double(), restored,
                               rtol=2**-23, atol=0)


@pytest.mark.parametrize("layout", ["columns", "rows"])
@pytest.mark.parametrize("bits,signed", MAPS)
def test_small_blocks_and_many_partial_blocks(bits, signed, layout):
    """Block 8 on slots of 13/37 values: every slot ends in a partial block."""
    x = _data("normal", (37, 13) if layout == "columns" else (13, 37), signed, seed=4)
    codes, scales = quantize(x, bits, signed, layout, block_size=8)
    reference_codes, reference_scales = reference_quantize(x, bits, signed, layout, 8)
    assert torch.equal(codes, reference_codes) and torch.equal(scales.double(), reference_scales)


@pytest.mark.parametrize("layout", ["columns", "rows", "flat"])
@pytest.mark.parametrize("bits,signed", MAPS)
def test_all_zero_blocks_restore_exact_zeros(bits, signed, layout):
    x = _data("normal", SHAPES[layout], signed, seed=5)
    zero_value = torch.zeros_like(x, dtype=torch.bool)
    if layout == "flat":
        zero_value.view(-1)[256:768] = True             # whole blocks at both block sizes
    elif layout == "columns":
        zero_value[:, 3] = True                         # a whole slot
        zero_value[:256, 5] = True                      # the first block(s) of another
    else:
        zero_value[3] = True
        zero_value[5, :256] = True
    x = x.masked_fill(zero_value, 0.0)
    codes, scales = quantize(x, bits, signed, layout)
    restored = dequantize(codes, scales, bits, signed, x.shape, layout)
    assert torch.all(restored[zero_value] == 0)
    assert int((scales == 0).sum()) >= 2
    everything_zero = quantize(torch.zeros(SHAPES[layout]), bits, signed, layout)
    assert torch.all(everything_zero[1] == 0)
    assert torch.all(dequantize(*everything_zero, bits, signed, SHAPES[layout], layout) == 0)


@pytest.mark.parametrize("layout", ["columns", "rows"])
def test_blocks_never_mix_slots(layout):
    """Scaling one slot by 10^6 leaves every other slot's codes and scales as they were."""
    x = _data("normal", SHAPES[layout], True, seed=6)
    dim = slot_dim(layout)
    scaled = x.clone()
    scaled.select(dim, 2).mul_(1e6)
    for bits in (8, 4):
        codes, scales = quantize(x, bits, True, layout)
        scaled_codes, scaled_scales = quantize(scaled, bits, True, layout)
        others = torch.arange(x.shape[dim]) != 2
        assert torch.equal(codes.index_select(dim, others.nonzero().view(-1)),
                           scaled_codes.index_select(dim, others.nonzero().view(-1)))
        assert torch.equal(scales.index_select(dim, others.nonzero().view(-1)),
                           scaled_scales.index_select(dim, others.nonzero().view(-1)))


@pytest.mark.parametrize("layout", ["columns", "rows"])
@pytest.mark.parametrize("bits,signed", MAPS)
def test_slot_remap_equals_remapping_the_dequantized_state(bits, signed, layout):
    x = _data("lognormal", SHAPES[layout], signed, seed=7)
    source = torch.randperm(x.shape[slot_dim(layout)], generator=torch.Generator().manual_seed(8))
    source[::4] = -1                                    # new slots start from zero
    codes, scales = quantize(x, bits, signed, layout)
    new_codes, new_scales = remap_quantized_slots(codes, scales, source, bits=bits, layout=layout,
                                                  fill_code=codebook(bits, signed).fill_code)
    expected = remap_slots(dequantize(codes, scales, bits, signed, x.shape, layout), source, layout)
    assert torch.equal(dequantize(new_codes, new_scales, bits, signed, x.shape, layout), expected)
    assert new_codes.shape == codes.shape and new_scales.shape == scales.shape


def test_slot_remap_rejects_flat_and_wrong_sizes():
    codes, scales = quantize(torch.randn(4096), 8, True, "flat")
    with pytest.raises(ValueError, match="'columns' or 'rows'"):
        remap_quantized_slots(codes, scales, torch.arange(1), bits=8, layout="flat", fill_code=0)
    codes, scales = quantize(torch.randn(300, 37), 8, True, "columns")
    with pytest.raises(ValueError, match="do not index the 37 slots"):
        remap_quantized_slots(codes, scales, torch.arange(36), bits=8, layout="columns", fill_code=0)


@pytest.mark.parametrize("bits", [8, 4])
def test_requantize_transformed_rotates_in_fp32(bits):
    """An SVD-style transport M ← M·Q: dequantize, rotate in fp32, re-quantize; the result is the
    quantization of the rotated dequantized moment, within the bound of the exact rotation."""
    x = _data("normal", (300, 37), True, seed=9)
    rotation, _ = torch.linalg.qr(torch.randn(37, 37, generator=torch.Generator().manual_seed(10)))
    codes, scales = quantize(x, bits, True, "columns")
    rotate = lambda moment: moment @ rotation
    new_codes, new_scales = requantize_transformed(codes, scales, rotate, bits=bits, signed=True,
                                                   shape=x.shape, layout="columns")
    rotated = rotate(dequantize(codes, scales, bits, True, x.shape, "columns"))
    expected = quantize(rotated, bits, True, "columns")
    assert torch.equal(new_codes, expected[0]) and torch.equal(new_scales, expected[1])
    with pytest.raises(ValueError, match="transform returned shape"):
        requantize_transformed(codes, scales, lambda m: m[:, :5], bits=bits, signed=True, shape=x.shape,
                               layout="columns")


@pytest.mark.parametrize("layout", ["columns", "rows", "flat"])
@pytest.mark.parametrize("bits,signed", MAPS)
def test_quantized_zeros_is_the_state_of_a_zero_moment(bits, signed, layout):
    shape = SHAPES[layout]
    codes, scales = quantized_zeros(shape, bits, signed, layout)
    expected_codes, expected_scales = quantize(torch.zeros(shape), bits, signed, layout)
    assert torch.equal(scales, expected_scales)
    assert torch.all(dequantize(codes, scales, bits, signed, shape, layout) == 0)
    if bits == 8 or shape[-1] % 2 == 0 or layout == "columns":
        assert torch.equal(codes, expected_codes)
    book = codebook(bits, signed)
    low = codes & 15 if bits == 4 else codes
    assert torch.all(low == book.fill_code)


def test_the_spare_code_of_the_8_bit_signed_map_decodes_inside_the_table():
    """The 8-bit signed map leaves code 255 unused; quantization never writes it, and a state holding
    it (corrupted or crafted) still reads inside the table, as the top level. At 4 bits every code is
    a level: a block's positive absmax is written as code 15 (+1), its negative one as code 0."""
    x = _data("student_t", (300, 37), True, seed=11)
    codes, scales = quantize(x, 8, True, "columns")
    assert int(codes.max()) < 255
    codes[0, 0] = 255
    restored = dequantize(codes, scales, 8, True, x.shape, "columns")
    assert float(restored[0, 0]) == float(scales[0, 0])
    four = torch.tensor([[1.0, -2.0, 0.5, 0.0], [-1.0, 2.0, 0.25, 0.0]])
    four_codes, four_scales = quantize(four, 4, True, "rows")
    nibbles = torch.stack((four_codes & 15, four_codes >> 4), -1).reshape(2, 4)
    assert nibbles[0, 1] == 0 and nibbles[1, 1] == 15 and nibbles[0, 3] == 7
    restored = dequantize(four_codes, four_scales, 4, True, four.shape, "rows")
    assert restored[0, 1] == torch.tensor(-0.8875) * 2 and restored[1, 1] == 2.0


def test_storage_shapes():
    assert storage_shapes((4096, 256), 8, "columns", 256) == ((4096, 256), (16, 256))
    assert storage_shapes((4096, 256), 4, "columns", 128) == ((2048, 256), (32, 256))
    assert storage_shapes((256, 11008), 8, "rows", 256) == ((256, 11008), (256, 43))
    assert storage_shapes((37, 301), 4, "rows", 128) == ((37, 151), (37, 3))
    assert storage_shapes((61, 71), 4, "flat", 128) == ((2166,), (34,))


def test_bf16_input_is_quantized_from_its_fp32_values():
    x = torch.randn(300, 37).bfloat16()
    assert all(torch.equal(a, b) for a, b in zip(quantize(x, 8, True, "columns"),
                                                  quantize(x.float(), 8, True, "columns")))


def test_state_round_trips_through_torch_load_weights_only():
    state = {}
    for name, signed in (("exp_avg", True), ("exp_avg_sq", False)):
        codes, scales = quantize(_data("normal", (300, 37), signed), 4, signed, "columns")
        state[name + "_codes"], state[name + "_scales"] = codes, scales
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)


def test_invalid_arguments_are_named():
    x = torch.randn(64, 64)
    with pytest.raises(ValueError, match="Invalid bits: 2"):
        quantize(x, 2, True, "flat")
    with pytest.raises(ValueError, match="Invalid layout: 'diagonal'"):
        quantize(x, 8, True, "diagonal")
    with pytest.raises(ValueError, match="Invalid block_size: 100"):
        quantize(x, 8, True, "flat", block_size=100)
    with pytest.raises(ValueError, match="needs a 2-D moment"):
        quantize(torch.randn(4, 4, 4), 8, True, "rows")
    codes, scales = quantize(x, 8, True, "columns")
    with pytest.raises(ValueError, match=r"not the 8-bit 'columns' storage of a moment of shape \(64, 32\)"):
        dequantize(codes, scales, 8, True, (64, 32), "columns")
    with pytest.raises(ValueError, match="codes must be uint8"):
        dequantize(codes.int(), scales, 8, True, (64, 64), "columns")
