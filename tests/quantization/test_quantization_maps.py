"""The quantization maps: structure, the zero-free second-moment maps, and torchao as an oracle."""
import pytest
import torch

from lowrank_optim.quantization import (
    codebook,
    dequantize,
    dynamic_map,
    full_signed_map,
    linear_zero_free_map,
    quantization_map,
    quantize,
)
from lowrank_optim.quantization.maps import midpoints, rounding_power, square_root_map

MAPS = [(8, True), (8, False), (4, True), (4, False)]


@pytest.mark.parametrize("bits,signed", MAPS)
def test_maps_are_sorted_distinct_and_span_the_unit_interval(bits, signed):
    levels = quantization_map(bits, signed)
    assert levels.dtype == torch.float64
    assert torch.all(levels[1:] > levels[:-1])                      # strictly ascending, no duplicates
    assert levels.numel() == (255 if (bits, signed) == (8, True) else 2**bits)  # 8-bit m: one spare code
    assert levels[-1] == 1.0                                        # a positive absmax is exact
    if (bits, signed) == (8, True):                                 # symmetric around 0
        assert levels[0] == -1.0 and torch.equal(levels, -levels.flip(0)) and (levels == 0).sum() == 1
    elif signed:                                                    # 4-bit m: the full signed map
        assert levels[0] == -0.8875 and torch.equal(levels[:-1], -levels[:-1].flip(0)) and (levels == 0).sum() == 1
    else:
        assert levels[0] > 0                                        # no zero level for v (package doc)


def test_dynamic_map_decades():
    """Decade e (values in (10^-(e+1), 10^-e]) holds 2^(c-1-e) levels: 64, 32, …, 1 for 8-bit signed;
    the levels are the centres of equal bins (as bitsandbytes' and torchao's dynamic map)."""
    signed = dynamic_map(8, signed=True)
    positive = signed[signed > 0]
    counts = [int(((positive > 10.0 ** -(e + 1)) & (positive <= 10.0 ** -e)).sum()) for e in range(7)]
    assert counts == [64, 32, 16, 8, 4, 2, 1]
    assert positive.min() == pytest.approx(5.5e-7)                  # decade 6: one bin, its centre
    assert positive[-2] == pytest.approx(1 - 0.9 * 1.5 / 64)           # bin centres, the top one moved to 1
    unsigned = dynamic_map(8, signed=False)
    assert unsigned.min() == pytest.approx(5.5e-9) and unsigned.numel() == 256
    four = dynamic_map(4, signed=True)
    assert four[four > 0].tolist() == pytest.approx([0.0055, 0.0325, 0.0775, 0.2125, 0.4375, 0.6625, 1.0])


def test_the_full_signed_map_keeps_the_top_centre_and_adds_one():
    """The 4-bit first moment's map: the dynamic map's decade centres, the top one (0.8875) not moved
    to 1, mirrored, 0, and +1 on the code the symmetric map leaves spare."""
    full = full_signed_map(4)
    centres = [0.0055, 0.0325, 0.0775, 0.2125, 0.4375, 0.6625, 0.8875]
    assert full.tolist() == pytest.approx([-c for c in reversed(centres)] + [0.0] + centres + [1.0])
    assert torch.equal(quantization_map(4, True), full)
    assert torch.equal(quantization_map(8, True), dynamic_map(8, True))          # the 8-bit scheme is kept


def test_codebook_tables():
    for bits, signed in MAPS:
        book = codebook(bits, signed)
        used = quantization_map(bits, signed).numel()
        assert book.levels.dtype == torch.float32 and book.levels.numel() == 2**bits
        assert torch.equal(book.levels[:used], quantization_map(bits, signed).float())
        assert torch.all(book.levels[used:] == 1.0)                # spare codes decode inside the table
        assert book.midpoints.numel() == 2**bits - 1
        finite = book.midpoints[torch.isfinite(book.midpoints)]
        assert finite.numel() == used - 1
        assert torch.all((finite > book.levels[:used - 1]) & (finite < book.levels[1:used]))
        assert book.levels[book.fill_code].abs() == book.levels.abs().min()
    for bits in (8, 4):
        assert codebook(bits, True).levels[codebook(bits, True).fill_code] == 0
    assert torch.isfinite(codebook(4, True).midpoints).all()                    # all 16 codes are levels


def test_midpoints_are_padded_with_inf():
    levels = dynamic_map(4, True)
    padded = midpoints(levels, 4)
    assert padded.numel() == 15 and torch.isinf(padded[-1]) and torch.isfinite(padded[:-1]).all()


# ------------------------------------------------------------------------- torchao as an oracle
@pytest.fixture(scope="module")
def torchao_utils():
    return pytest.importorskip("torchao.optim.quant_utils")


def test_four_bit_second_moment_map_is_torchaos_applied_to_the_square_root(torchao_utils):
    assert torch.equal(linear_zero_free_map(4), torch.linspace(0, 1, 17, dtype=torch.float64)[1:])
    assert torch.equal(quantization_map(4, False), square_root_map(4))
    assert torch.equal(square_root_map(4).sqrt(), linear_zero_free_map(4))
    assert rounding_power(4, False) == 2 and {rounding_power(b, s) for b, s in MAPS if (b, s) != (4, False)} == {1}
    boundaries = midpoints(square_root_map(4), 4, power=2)
    assert torch.equal(boundaries[:15], ((2 * torch.arange(1, 16, dtype=torch.float64) + 1) / 32) ** 2)


def test_square_root_map_keeps_small_second_moments():
    """What the update divides by is √v: on v spread over three decades inside one block, the
    square-root map's relative error of √v is a fraction of the linear map's, which rounds every
    v below absmax/32 up to absmax/16 (the 4-bit loss of the ablation, package doc)."""
    generator = torch.Generator().manual_seed(2)
    v = torch.exp(torch.empty(128 * 64).uniform_(-3 * 2.3026, 0, generator=generator))    # 1e-3 … 1
    root = v.sqrt().double()

    def root_error(levels: torch.Tensor, power: int) -> float:
        boundaries = midpoints(levels, 4, power)[:levels.numel() - 1]
        t = v.double().view(-1, 128) / v.double().view(-1, 128).amax(1, keepdim=True)
        restored = levels[torch.bucketize(t, boundaries, right=True)] * v.double().view(-1, 128).amax(1, keepdim=True)
        return float(((restored.sqrt().view(-1) - root).abs() / root).mean())

    linear, square_root = root_error(linear_zero_free_map(4), 1), root_error(square_root_map(4), 2)
    print(f"mean relative error of sqrt(v): linear map {linear:.3f}, square-root map {square_root:.3f}")
    assert square_root < 0.4 * linear


def _set_difference(a, b, rtol=1e-6):
    """Values of ``a`` with no value of ``b`` within ``rtol`` (relative)."""
    a, b = a.double(), b.double()
    close = ((a[:, None] - b[None, :]).abs() <= rtol * a.abs()[:, None].clamp(min=1e-30)).any(1)
    return sorted(a[~close].tolist())


def test_eight_bit_maps_are_torchaos_with_the_documented_changes(torchao_utils):
    """Same dynamic tree (bin centres per decade). Signed: we store ±1 instead of torchao's ±0.99297
    (top bin centre) and its extra +1, so the map is symmetric. Unsigned: we drop torchao's 0 and
    0.99648 (top centre, moved to 1) and add a 7th decade's centre 5.5e-8 and the zero-free 5.5e-9."""
    for signed, only_ours, only_theirs in ((True, [-1.0], [-0.99296875, 0.99296875]),
                                           (False, [5.5e-9, 5.5e-8], [0.0, 0.996484375])):
        ours = dynamic_map(8, signed)
        theirs = torch.tensor(torchao_utils.create_dynamic_map(signed=signed))
        assert _set_difference(ours, theirs) == pytest.approx(only_ours)
        assert _set_difference(theirs, ours) == pytest.approx(only_theirs, abs=1e-7)


def test_four_bit_first_moment_map_is_torchaos(torchao_utils):
    """torchao's AdamW4bit's signed map (bitsandbytes' construction at 3 exponent bits), computed by
    torchao in fp32: the same 16 levels."""
    theirs = torch.tensor(torchao_utils.create_dynamic_map(True, 3, 4), dtype=torch.float64)
    torch.testing.assert_close(quantization_map(4, True), theirs, rtol=0, atol=1e-7)


@pytest.mark.parametrize("bits,signed", MAPS)
def test_nearest_level_search_agrees_with_torchao(torchao_utils, bits, signed):
    """torchao's own search, given our map (padded to 2^bits entries with a repeated 1.0), picks the
    same values; a disagreement is allowed only at a tie: t within 1e-6 of a midpoint (torchao
    compares the residual t − q_k with half the gap, a different rounding than our t ≥ midpoint)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64 * 256, generator=generator) * torch.rand(64 * 256, generator=generator).pow(4)
    x = x if signed else x * x
    codes, scales = quantize(x, bits, signed, "flat", block_size=256)
    ours = codebook(bits, signed).levels[:quantization_map(bits, signed).numel()]
    mine = torch.stack((codes & 15, codes >> 4), -1).reshape(-1) if bits == 4 else codes
    dequantized = ours[mine.long()].view(-1, 256) * scales.view(-1, 1)

    # the square-root map: torchao's search of √x on the map's square roots (its linear map)
    power = rounding_power(bits, signed)
    qmap = ours.pow(1 / power)
    qmap = torch.cat((qmap, qmap.new_ones(2**bits - qmap.numel())))
    normalized, torchao_scales = torchao_utils.scale_tensor(x.pow(1 / power), 256)
    search = torchao_utils.quantize_8bit_with_qmap if bits == 8 else torchao_utils.quantize_4bit_with_qmap
    theirs = torchao_utils.dequant_with_qmap(search(normalized, qmap), qmap, torchao_scales).view(-1, 256)
    if power == 2:
        # (level·√a)² against level²·a: equal up to fp32 rounding
        torch.testing.assert_close(scales, torchao_scales.square(), rtol=2**-22, atol=0)
        torch.testing.assert_close(dequantized, theirs.square(), rtol=2**-20, atol=0)
        return
    assert torch.equal(scales, torchao_scales)
    differ = dequantized != theirs
    boundaries = codebook(bits, signed).midpoints[:ours.numel() - 1].double()
    distance = (normalized.double().view(-1, 1) - boundaries.view(1, -1)).abs().amin(1).view(-1, 256)
    assert torch.all(distance[differ] < 1e-6), f"{int(differ.sum())} values differ away from a tie"


@pytest.mark.parametrize("bits,signed", MAPS)
def test_our_maps_are_no_less_accurate_than_torchaos(torchao_utils, bits, signed):
    """Mean absolute dequantization error on Gaussian data (m) and its squares (v), default block
    sizes (256 / 128): ours within 10% of torchao's maps (or better). Measured in the report."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(256 * 256, generator=generator)
    x = x if signed else x * x
    block = 256 if bits == 8 else 128
    codes, scales = quantize(x, bits, signed, "flat")
    ours = (dequantize(codes, scales, bits, signed, x.shape, "flat") - x).abs().mean()
    if bits == 8:
        qmap = torch.tensor(torchao_utils.create_dynamic_map(signed=signed))
    elif signed:
        qmap = torch.tensor(torchao_utils.create_dynamic_map(True, 3, 4))
    else:
        qmap = torch.linspace(0, 1, 17)[1:]
    normalized, torchao_scales = torchao_utils.scale_tensor(x.clone(), block)
    search = torchao_utils.quantize_8bit_with_qmap if bits == 8 else torchao_utils.quantize_4bit_with_qmap
    theirs = (torchao_utils.dequant_with_qmap(search(normalized, qmap), qmap, torchao_scales) - x).abs().mean()
    print(f"{bits}-bit {'m' if signed else 'v'}: ours/torchao = {float(ours / theirs):.3f}")
    assert ours <= 1.1 * theirs, (float(ours), float(theirs))
