"""Stochastic rounding into int8 weights: unbiased, sub-step updates kept in expectation, round to
nearest stalling where it is not, the update against the float64 reference with the same noise,
and the noise reproducible from a generator.

Statistics: a value a fraction ``p`` of a step ``s`` above a code rounds up with probability
``p``: its error has mean 0 and standard deviation ``s·√(p(1−p)) ≤ s/2``, and the mean of ``N``
independent errors (independent: every value has its own word of the Philox stream) at most
``s/(2√N)``. Tests allow 5 of those (a false failure once in ~1.7 million runs; the seeds are
fixed anyway).
"""
import math

import pytest
import torch
from lowrank_optim.kernels.int8_weight_update import int8_weight_update_ as kernel_update_

from lowrank_optim.reference.int8_weights import reference_dequantize, reference_int8_update
from lowrank_optim.reference.philox import reference_stream_word
from lowrank_optim.rounding import rounding_generator
from lowrank_optim.weights import dequantize_weight, int8_storage, int8_update_, quantize_weight

STEP = 2.0**-6                     # the rows' scale: their absmax is 127 steps, exactly, in either dtype


def _rows(n_rows: int, n_cols: int, scale_dtype, seed=0) -> torch.Tensor:
    """Identical rows: their absmax 127·STEP in column 0, the rest within ±100 steps, off the grid."""
    row = (torch.rand(n_cols, generator=torch.Generator().manual_seed(seed)) * 200 - 100) * STEP
    row[0] = 127 * STEP
    return row.expand(n_rows, n_cols).to(scale_dtype).contiguous()


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
def test_stochastic_quantization_is_unbiased(scale_dtype):
    dense = _rows(20_000, 33, scale_dtype)
    weight = quantize_weight(dense, generator=torch.Generator().manual_seed(0))
    _, scales = int8_storage(weight)
    assert (scales.float() == STEP).all()
    error = dequantize_weight(weight, torch.float64) - dense.double()
    assert (error.abs() < STEP).all()                                   # one of the two neighbours
    bound = 5 * STEP / (2 * math.sqrt(error.shape[0]))
    assert error.mean(dim=0).abs().max() <= bound                       # per value, over 20 000 draws
    assert error.abs().mean() > 0.1 * STEP                              # and it did round


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fraction", [0.3, 0.01])
def test_an_update_below_half_a_step_moves_the_weight_in_expectation(scale_dtype, fraction):
    start = quantize_weight(_rows(20_000, 33, scale_dtype))              # on the grid: exactly representable
    before = dequantize_weight(start, torch.float64)
    signs = torch.where(torch.arange(33) % 2 == 0, 1.0, -1.0)
    delta = (fraction * STEP) * signs.expand(20_000, 33).clone()
    delta[:, 0] = 0                                                     # the absmax, and so the scale, stays
    weight = quantize_weight(before.to(scale_dtype))
    int8_update_(weight, delta, a=1.0, b=1.0, generator=torch.Generator().manual_seed(1))
    moved = dequantize_weight(weight, torch.float64) - before
    expected = -delta.double()
    bound = 5 * STEP / (2 * math.sqrt(moved[:, 1:].numel()))
    assert abs(float((moved - expected)[:, 1:].mean())) <= bound        # unbiased over all values
    movement = float((moved * -signs.double())[:, 1:].mean())           # the step's direction
    assert abs(movement - fraction * STEP) <= bound and movement > 2 * bound


def test_round_to_nearest_stalls_where_stochastic_rounding_keeps_the_steps():
    """100 steps of a twentieth of a step each: round to nearest (re-quantizing ``Ŵ − b·ΔW``)
    never moves a code; stochastic rounding moves the weights by 100·b·ΔW = 5 steps on average."""
    dense = _rows(64, 33, torch.bfloat16)
    nearest = quantize_weight(dense)
    stochastic = quantize_weight(dense)
    start_codes = int8_storage(nearest)[0].clone()
    delta = torch.full((64, 33), STEP / 20)
    delta[:, 0] = 0
    for step in range(100):
        nearest = quantize_weight(dequantize_weight(nearest, torch.float32) - delta, scale_dtype=torch.bfloat16)
        int8_update_(stochastic, delta, a=1.0, b=1.0, generator=rounding_generator("w", step, torch.device("cpu")))
    assert torch.equal(int8_storage(nearest)[0], start_codes)
    moved = (dequantize_weight(stochastic, torch.float64) - dequantize_weight(quantize_weight(dense), torch.float64))
    # 100 roundings per value, each with standard deviation ≤ STEP/2, over 64·32 values
    bound = 5 * math.sqrt(100) * STEP / (2 * math.sqrt(64 * 32))
    assert abs(float(moved[:, 1:].mean()) + 5 * STEP) <= bound


def test_a_small_learning_rate_trains_only_with_stochastic_rounding():
    """Least squares, 300 steps of a learning rate whose steps stay below a tenth of a quantization
    step. Round to nearest never changes a code (only the row scales follow the rows' largest
    weights); stochastic rounding trains as the fp32 weights do."""
    generator = torch.Generator().manual_seed(3)
    teacher = torch.randn(8, 16, generator=generator)
    inputs = torch.randn(16, 256, generator=generator)
    targets = teacher @ inputs
    lr = 2e-3

    def loss_and_grad(w):
        residual = w @ inputs - targets
        return float((residual**2).mean()), 2 * residual @ inputs.T / residual.numel()

    start = teacher + 0.5 * torch.randn(8, 16, generator=generator)
    nearest, stochastic = quantize_weight(start), quantize_weight(start)
    dense = dequantize_weight(nearest)
    start_codes = int8_storage(nearest)[0].clone()
    initial_loss = loss_and_grad(dense)[0]
    for step in range(300):
        _, grad = loss_and_grad(dequantize_weight(nearest))
        assert (lr * grad).abs().max() < 0.1 * int8_storage(nearest)[1].min()
        nearest = quantize_weight(dequantize_weight(nearest) - lr * grad)
        _, grad = loss_and_grad(dequantize_weight(stochastic))
        int8_update_(stochastic, grad, a=1.0, b=lr, generator=rounding_generator("w", step, torch.device("cpu")))
        dense = dense - lr * loss_and_grad(dense)[1]
    assert torch.equal(int8_storage(nearest)[0], start_codes)
    nearest_loss, stochastic_loss = (loss_and_grad(dequantize_weight(w))[0] for w in (nearest, stochastic))
    dense_loss = loss_and_grad(dense)[0]
    assert initial_loss - nearest_loss < 0.3 * (initial_loss - stochastic_loss)
    assert abs(stochastic_loss - dense_loss) < 0.05 * dense_loss


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
def test_the_update_matches_the_float64_reference_with_the_same_noise(scale_dtype):
    """Tolerance: ``w`` is fp32 here, float64 there; a code differs only where that moves ``t``
    across ``⌊t⌋ + u`` (a few values in 10⁴), by one; the scales by an fp32 ulp of the absmax,
    which rounds up to the same bf16 scale except at a boundary."""
    generator = torch.Generator().manual_seed(4)
    dense = torch.randn(41, 77, generator=generator) * torch.exp(torch.randn(41, 1, generator=generator))
    weight = quantize_weight(dense.to(scale_dtype))
    codes, scales = (t.clone() for t in int8_storage(weight))
    delta = torch.randn(41, 77, generator=generator)
    seed = torch.tensor([2024], dtype=torch.int64)
    noise = torch.tensor([reference_stream_word(2024, p) >> 8 for p in range(41 * 77)]).double().view(41, 77) / 2**24
    ref_codes, ref_scales = reference_int8_update(codes, scales, delta, a=0.99, b=0.05, noise=noise,
                                                  scale_dtype=scale_dtype)
    kernel_update_(codes, scales, delta, a=0.99, b=0.05, seed=seed)
    torch.testing.assert_close(scales.double(), ref_scales, rtol=2**-7 if scale_dtype == torch.bfloat16 else 2**-22,
                               atol=0)
    assert (codes.long() != ref_codes).sum() <= 2 and (codes.long() - ref_codes).abs().max() <= 1
    exact = 0.99 * reference_dequantize(*int8_storage(weight)) - 0.05 * delta.double()
    assert ((reference_dequantize(codes, scales) - exact).abs() < scales.double()[:, None]).all()


@pytest.mark.parametrize("chunk_values", [1, 200, 500])
def test_the_update_writes_the_same_bits_in_any_chunking(monkeypatch, chunk_values):
    """Rows of 77 = 4·19 + 1 values, one, two or six per pass, against all 41 in one pass (the
    default): most passes start their noise inside a Philox counter's four words."""
    generator = torch.Generator().manual_seed(10)
    weight = quantize_weight(torch.randn(41, 77, generator=generator))
    delta = torch.randn(41, 77, generator=generator)
    seed = torch.tensor([2**62 + 31], dtype=torch.int64)
    expected = [t.clone() for t in int8_storage(weight)]
    kernel_update_(*expected, delta, a=0.99, b=0.05, seed=seed)
    monkeypatch.setattr("lowrank_optim.kernels.int8_weight_update._CHUNK_VALUES", chunk_values)
    codes, scales = (t.clone() for t in int8_storage(weight))
    kernel_update_(codes, scales, delta, a=0.99, b=0.05, seed=seed)
    assert torch.equal(codes, expected[0]) and torch.equal(scales, expected[1])


def test_the_noise_is_the_generators():
    dense = torch.randn(12, 30, generator=torch.Generator().manual_seed(5))
    delta = torch.randn(12, 30, generator=torch.Generator().manual_seed(6))
    replicas = [quantize_weight(dense) for _ in range(3)]
    steps = [7, 7, 8]
    for weight, step in zip(replicas, steps):
        int8_update_(weight, delta, a=0.999, b=0.1, generator=rounding_generator("layers.0.weight", step,
                                                                                  torch.device("cpu")))
    (codes0, scales0), (codes1, scales1), (codes2, _) = (int8_storage(w) for w in replicas)
    assert torch.equal(codes0, codes1) and torch.equal(scales0, scales1)     # ranks with one generator agree
    assert not torch.equal(codes0, codes2)                                   # the next step draws afresh


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
def test_both_backends_write_the_same_bits(scale_dtype):
    pytest.importorskip("triton")
    dense = torch.randn(9, 45, generator=torch.Generator().manual_seed(7)).to(scale_dtype)
    delta = torch.randn(9, 45, generator=torch.Generator().manual_seed(8))
    torch_weight, triton_weight = quantize_weight(dense), quantize_weight(dense)
    for weight, backend in ((torch_weight, "torch"), (triton_weight, "triton")):
        int8_update_(weight, delta, a=0.9, b=0.3, generator=torch.Generator().manual_seed(9), backend=backend)
    assert all(torch.equal(x, y) for x, y in zip(int8_storage(torch_weight), int8_storage(triton_weight)))


def test_the_arguments_refused_are_named():
    weight = quantize_weight(torch.randn(4, 6))
    generator = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="Invalid generator: None"):
        int8_update_(weight, torch.zeros(4, 6), a=1.0, b=1.0, generator=None)
    with pytest.raises(ValueError, match=r"delta of torch.float32 and shape \(6, 4\) does not update"):
        int8_update_(weight, torch.zeros(6, 4), a=1.0, b=1.0, generator=generator)
    with pytest.raises(ValueError, match="Invalid delta: list"):
        int8_update_(weight, [0.0], a=1.0, b=1.0, generator=generator)
    with pytest.raises(ValueError, match="weight is not an int8 weight"):
        int8_update_(torch.zeros(4, 6), torch.zeros(4, 6), a=1.0, b=1.0, generator=generator)
    with pytest.raises(ValueError, match="Invalid backend: 'cuda'"):
        int8_update_(weight, torch.zeros(4, 6), a=1.0, b=1.0, generator=generator, backend="cuda")
