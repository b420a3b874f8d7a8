"""The fused quantized Adam moment update (PyTorch path) against a float64 reference, and quantized
Adam against float Adam on a toy least-squares problem."""
import math

import pytest
import torch
from lowrank_optim.kernels.moment_update import adam_moment_update_
from lowrank_optim.kernels.quantized_moment_update import remap_quantized_slots, rounding_noise, unpack_codes
from support.quantized import fused_second_moment, quantized_step, reference_noise
from test_quantization_blockwise import SHAPES, _per_value_absmax

from lowrank_optim.quantization import (
    codebook,
    dequantize,
    quantize,
    quantized_zeros,
)
from lowrank_optim.quantization.maps import rounds_stochastically
from lowrank_optim.quantization.reference import reference_quantized_adam_step

BLOCK = {8: 256, 4: 128}
STEP = dict(beta1=0.9, beta2=0.999, eps=1e-8, bias_correction1=1 - 0.9**5, bias_correction2=1 - 0.999**5)
# N in fp32 from fp32 moments: about ten separately rounded operations on values dequantized
# exactly as float64 does (fp32 level × fp32 scale, exact in float64 up to one rounding): a few
# ulps relative, 2^-24 ≈ 6e-8 each; 2e-6 leaves margin.
UPDATE_RTOL = 2e-6
# a code may differ from the float64 one only where float64 puts t = x/a within this distance of
# a midpoint (or, rounding stochastically, the chance of rounding up within it of u·2⁻²⁴): the fp32
# moment carries a few ulps of its terms (|β1·m| + |(1−β1)·R|, up to ~2× |m| under cancellation)
# relative to a
TIE_DISTANCE = 1e-6


def _state(shape, bits, layout, seed):
    generator = torch.Generator().manual_seed(seed)
    grad = torch.randn(shape, generator=generator) * torch.rand(shape, generator=generator).pow(3)
    exp_avg = 0.1 * torch.randn(shape, generator=generator)
    exp_avg_sq = 0.01 * torch.rand(shape, generator=generator).pow(2)
    return grad, [*quantize(exp_avg, bits, True, layout), *quantize(exp_avg_sq, bits, False, layout)]


def _assert_codes_match_up_to_ties(codes, expected_codes, moment64, bits, signed, layout, shape, noise=None):
    """Equal codes, or adjacent ones where float64 ``t`` sits within TIE_DISTANCE of a midpoint
    (with ``noise``: where the chance of rounding up sits within it of ``u·2⁻²⁴``)."""
    ours = unpack_codes(codes, bits=bits, layout=layout, shape=shape)
    theirs = unpack_codes(expected_codes, bits=bits, layout=layout, shape=shape)
    differ = ours != theirs
    if not differ.any():
        return
    absmax = _per_value_absmax(moment64, layout, BLOCK[bits])
    t = moment64 / absmax.clamp(min=1e-300)
    if noise is None:
        boundaries = codebook(bits, signed).midpoints.double()
        boundaries = boundaries[torch.isfinite(boundaries)]
        near_tie = (t[differ].view(-1, 1) - boundaries.view(1, -1)).abs().amin(1) <= TIE_DISTANCE
    else:
        levels = codebook(bits, signed).levels.double().sqrt()           # the 4-bit v rounds in √ (p = 2)
        lower = torch.minimum(ours, theirs)[differ]
        chance = (t[differ].sqrt() - levels[lower]) / (levels[lower + 1] - levels[lower])
        near_tie = (chance - noise[differ].double() / 2**24).abs() <= TIE_DISTANCE
    assert near_tie.all() and ((ours - theirs).abs()[differ] == 1).all(), f"{int(differ.sum())} codes differ"


def _v_noise(grad, state, bits, layout, source_slots=None):
    """The ``u`` of the fused step's stochastic ``v`` rounding (None where ``bits`` rounds to nearest),
    from the Python-integer Philox on the fp32 ``v`` the step computes."""
    if not rounds_stochastically(bits, False):
        return None
    v_codes, v_scales = state[2:]
    if source_slots is not None:
        v_codes, v_scales = remap_quantized_slots(v_codes, v_scales, source_slots, layout=layout, bits=bits,
                                                  fill_code=codebook(bits, False).fill_code)
    return reference_noise(fused_second_moment(grad, v_codes, v_scales, bits=bits, layout=layout, **STEP), grad, 1)


def _compare_with_reference(result, expected, bits, layout, shape, v_noise=None):
    update, m_codes, m_scales, v_codes, v_scales = result
    torch.testing.assert_close(update.double(), expected["update"], rtol=UPDATE_RTOL,
                               atol=UPDATE_RTOL * float(expected["update"].abs().max()))
    for scales, key in ((m_scales, "m_scales"), (v_scales, "v_scales")):
        torch.testing.assert_close(scales.double(), expected[key], rtol=UPDATE_RTOL, atol=0)
    _assert_codes_match_up_to_ties(m_codes, expected["m_codes"], expected["exp_avg"], bits, True, layout, shape)
    _assert_codes_match_up_to_ties(v_codes, expected["v_codes"], expected["exp_avg_sq"], bits, False, layout, shape,
                                   v_noise)


@pytest.mark.parametrize("layout", ["columns", "rows", "flat"])
@pytest.mark.parametrize("bits", [8, 4])
def test_fused_update_matches_the_float64_reference(bits, layout):
    shape = SHAPES[layout]
    grad, state = _state(shape, bits, layout, seed=0)
    v_noise = _v_noise(grad, state, bits, layout)
    expected = reference_quantized_adam_step(grad, *state, bits=bits, layout=layout, block_size=BLOCK[bits],
                                             v_noise=v_noise, **STEP)
    inputs = list(state)
    result = quantized_step(grad, *state, bits=bits, layout=layout, **STEP)
    assert all(out is given for out, given in zip(result[1:], inputs))          # in place
    assert result[0].dtype == torch.float32 and result[0].shape == shape
    _compare_with_reference(result, expected, bits, layout, shape, v_noise)


@pytest.mark.parametrize("layout", ["columns", "rows"])
@pytest.mark.parametrize("bits", [8, 4])
def test_fused_update_with_a_slot_remap(bits, layout):
    shape = SHAPES[layout]
    grad, state = _state(shape, bits, layout, seed=1)
    n_slots = shape[1] if layout == "columns" else shape[0]
    source = torch.randperm(n_slots, generator=torch.Generator().manual_seed(2))
    source[::3] = -1
    v_noise = _v_noise(grad, state, bits, layout, source)
    expected = reference_quantized_adam_step(grad, *state, bits=bits, layout=layout, block_size=BLOCK[bits],
                                             source_slots=source, v_noise=v_noise, **STEP)
    before = [t.clone() for t in state]
    result = quantized_step(grad, *state, bits=bits, layout=layout, source_slots=source, **STEP)
    assert all(out is not given for out, given in zip(result[1:], state))      # new tensors
    assert all(torch.equal(t, b) for t, b in zip(state, before))                # inputs untouched
    _compare_with_reference(result, expected, bits, layout, shape, v_noise)


@pytest.mark.parametrize("layout", ["columns", "rows"])
def test_per_slot_bias_corrections(layout):
    """Per-slot step counts (the engine's ``bias_correction="slot"``), HF-style ε = ε/√bc2 per slot."""
    shape = SHAPES[layout]
    n_slots = shape[1] if layout == "columns" else shape[0]
    view = (1, -1) if layout == "columns" else (-1, 1)
    steps = torch.randint(1, 50, (n_slots,), generator=torch.Generator().manual_seed(3)).float().view(view)
    bc1, bc2 = 1 - torch.pow(0.9, steps), 1 - torch.pow(0.999, steps)
    scalars = dict(beta1=0.9, beta2=0.999, eps=1e-6 / bc2.sqrt(), bias_correction1=bc1, bias_correction2=bc2)
    grad, state = _state(shape, 8, layout, seed=4)
    expected = reference_quantized_adam_step(grad, *state, bits=8, layout=layout, block_size=256, **scalars)
    result = quantized_step(grad, *state, bits=8, layout=layout, **scalars)
    _compare_with_reference(result, expected, 8, layout, shape)


@pytest.mark.parametrize("bits", [8, 4])
def test_first_step_from_zero_state_is_float_adams(bits):
    """Zero state dequantizes exactly, so the first N equals float Adam's (fp32, a few ulps)."""
    shape = (300, 37)
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    state = [*quantized_zeros(shape, bits, True, "columns"), *quantized_zeros(shape, bits, False, "columns")]
    scalars = dict(STEP, bias_correction1=0.1, bias_correction2=0.001)
    update = quantized_step(grad, *state, bits=bits, layout="columns", **scalars)[0]
    m, v = torch.zeros(shape, dtype=torch.float64), torch.zeros(shape, dtype=torch.float64)
    expected = adam_moment_update_(grad.double(), m, v, **scalars)
    torch.testing.assert_close(update.double(), expected, rtol=UPDATE_RTOL, atol=0)
    # the new state is exactly the quantized first moments (1−β1)·R and (1−β2)·R² (v rounded
    # stochastically at 4 bits, with the noise of those values)
    expected_m = quantize(grad * (1 - 0.9), bits, True, "columns")
    v = (grad * grad) * (1 - 0.999)
    expected_v = quantize(v, bits, False, "columns", noise=reference_noise(v, grad, 1) if bits == 4 else None)
    assert all(torch.equal(a, b) for a, b in zip(state, (*expected_m, *expected_v)))


def test_bf16_gradient_is_read_exactly():
    grad, state = _state((300, 37), 8, "columns", seed=6)
    twin = [t.clone() for t in state]
    a = quantized_step(grad.bfloat16(), *state, bits=8, layout="columns", **STEP)
    b = quantized_step(grad.bfloat16().float(), *twin, bits=8, layout="columns", **STEP)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_invalid_backend_and_state_are_named():
    grad, state = _state((300, 37), 8, "columns", seed=7)
    with pytest.raises(ValueError, match="Invalid backend: 'auto'"):
        quantized_step(grad, *state, bits=8, layout="columns", backend="auto", **STEP)
    with pytest.raises(ValueError, match="exp_avg_sq: codes of shape"):
        quantized_step(grad, *state[:2], state[2][:10], state[3], bits=8, layout="columns", **STEP)


# --------------------------------------------------------------------------- toy least squares
N_SAMPLES, N_IN, N_OUT = 512, 128, 64       # W is 128×64 = 8192 values: quantized (≥ 4096)
STEPS, LR = 300, 1e-2


def _problem():
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(N_SAMPLES, N_IN, generator=generator) / math.sqrt(N_IN)
    targets = inputs @ torch.randn(N_IN, N_OUT, generator=generator) + 0.01 * torch.randn(
        N_SAMPLES, N_OUT, generator=generator)
    return inputs, targets


def _loss(inputs, targets, weight):
    return float(0.5 * (inputs @ weight - targets).pow(2).sum() / inputs.shape[0])


def _adam_run(bits, layout, batch):
    """Adam (β = 0.9, 0.999; ε = 1e-8; lr 1e-2) on ½‖X·W − Y‖²/n from W = 0; minibatches of
    ``batch`` rows (None: full batch). Returns the final W and the full-batch losses."""
    inputs, targets = _problem()
    sampler = torch.Generator().manual_seed(1)
    weight = torch.zeros(N_IN, N_OUT)
    shape = weight.shape
    if bits is None:
        moments = [torch.zeros(shape), torch.zeros(shape)]
    else:
        moments = [*quantized_zeros(shape, bits, True, layout), *quantized_zeros(shape, bits, False, layout)]
    losses = []
    for step in range(1, STEPS + 1):
        losses.append(_loss(inputs, targets, weight))
        rows = torch.randint(0, N_SAMPLES, (batch,), generator=sampler) if batch else slice(None)
        x, y = inputs[rows], targets[rows]
        grad = x.t() @ (x @ weight - y) / x.shape[0]
        scalars = dict(beta1=0.9, beta2=0.999, eps=1e-8, bias_correction1=1 - 0.9**step,
                       bias_correction2=1 - 0.999**step)
        if bits is None:
            update = adam_moment_update_(grad, *moments, **scalars)
        else:
            update = quantized_step(grad, *moments, bits=bits, layout=layout, step=step, **scalars)[0]
        weight -= LR * update
    return weight, losses


@pytest.fixture(scope="module")
def float_runs():
    return {batch: _adam_run(None, None, batch) for batch in (None, 64)}


# Tolerances: the measured values (printed with -s) with ~30-50% margin. Trajectory:
# ‖W_q − W_f‖ / ‖W_f‖ at the end; loss gap: max over steps of |L_q − L_f| / L_f(0).
# Measured: 8 bits 0.027 / 0.004 full batch, 0.014-0.017 / 0.003 minibatch. 4 bits is coarse
# (16 levels for m and for v): on the noiseless problem its quantization noise keeps it from
# converging as far (trajectory 0.30-0.31, loss gap 0.16, final loss ~7× float's; next test); with
# minibatch gradient noise it tracks better (0.10-0.12 / 0.018).
TOLERANCES = {  # (bits, batch): (trajectory, loss gap)
    (8, None): (0.04, 0.01), (8, 64): (0.03, 0.01),
    (4, None): (0.42, 0.23), (4, 64): (0.2, 0.05),
}


@pytest.mark.parametrize("layout", ["flat", "columns"])
@pytest.mark.parametrize("bits,batch", list(TOLERANCES))
def test_quantized_adam_tracks_float_adam(float_runs, bits, batch, layout):
    float_weight, float_losses = float_runs[batch]
    weight, losses = _adam_run(bits, layout, batch)
    trajectory = float((weight - float_weight).norm() / float_weight.norm())
    loss_gap = max(abs(a - b) for a, b in zip(losses, float_losses)) / float_losses[0]
    print(f"{bits}-bit {layout} batch={batch}: trajectory {trajectory:.4f}, loss gap {loss_gap:.4f}, "
          f"final loss {losses[-1]:.4f} vs {float_losses[-1]:.4f}")
    max_trajectory, max_gap = TOLERANCES[bits, batch]
    assert trajectory <= max_trajectory and loss_gap <= max_gap
    assert losses[-1] < 0.2 * losses[0]                           # it does optimize


# Final full-batch loss, ours over torchao's (measured): 8 bits 0.387 vs 0.406 full batch, 1.080
# vs 1.090 minibatch; 4 bits 1.288 vs 1.463 minibatch, and 2.75 vs 2.41 full batch (float: 0.379 /
# 1.005). The one case behind is the noiseless problem converging on its optimum at 4 bits (not
# analysed further; presumably the variance that stochastic rounding adds to v, hence to the step,
# where nothing else is noisy: the nearest-rounded v measured 0.27 of trajectory error here against
# torchao's 0.28 before it). With gradient noise, as in training, ours ends lower.
TORCHAO_MARGINS = {(8, None): 1.0, (8, 64): 1.0, (4, 64): 1.0, (4, None): 1.2}


@pytest.mark.parametrize("bits,batch", list(TORCHAO_MARGINS))
def test_quantized_adam_ends_as_low_as_torchaos(float_runs, bits, batch, monkeypatch):
    """torchao's AdamW8bit / AdamW4bit (its eager step; torch.compile bypassed) on the same problem
    and minibatches: our final loss at most ``TORCHAO_MARGINS`` × theirs."""
    torchao_optim = pytest.importorskip("torchao.optim")
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)
    inputs, targets = _problem()
    sampler = torch.Generator().manual_seed(1)
    weight = torch.zeros(N_IN, N_OUT, requires_grad=True)
    optimizer = (torchao_optim.AdamW8bit if bits == 8 else torchao_optim.AdamW4bit)(
        [weight], lr=LR, weight_decay=0.0, eps=1e-8)
    for _ in range(STEPS):
        rows = torch.randint(0, N_SAMPLES, (batch,), generator=sampler) if batch else slice(None)
        x, y = inputs[rows], targets[rows]
        weight.grad = x.t() @ (x @ weight.detach() - y) / x.shape[0]
        optimizer.step()
    theirs = _loss(inputs, targets, weight.detach())
    ours = _loss(inputs, targets, _adam_run(bits, "flat", batch)[0])
    print(f"{bits}-bit batch={batch} final loss: ours {ours:.4f}, torchao {theirs:.4f}, "
          f"float {_loss(inputs, targets, float_runs[batch][0]):.4f}")
    assert ours <= TORCHAO_MARGINS[bits, batch] * theirs


# ------------------------------------------------------------------------- stochastic rounding
def test_rounding_noise_is_philox_of_the_value_and_gradient_bits():
    """The kernels' noise against the Python-integer Philox: signs, zeros, subnormals, infinities."""
    generator = torch.Generator().manual_seed(8)
    values = torch.rand(500, generator=generator).pow(4)
    grad = torch.randn(500, generator=generator)
    values[:4] = torch.tensor([0.0, 1e-40, float("inf"), 1.0])
    grad[:4] = torch.tensor([-0.0, 0.0, -1e-40, float("-inf")])
    for step in (1, 7, 2**32 + 5):
        noise = rounding_noise(values, grad, step)
        assert noise.dtype == torch.int64 and noise.shape == values.shape
        assert torch.equal(noise, reference_noise(values, grad, step % 2**32))
        assert 0 <= int(noise.min()) and int(noise.max()) < 2**24
    assert not torch.equal(rounding_noise(values, grad, 1), rounding_noise(values, grad, 2))


def test_stochastic_rounding_lets_a_slow_average_move():
    """A second moment whose gradients ask it to grow by 0.1% a step relative to its block's absmax
    (which stays put): rounded to the nearest level of the 4-bit map it never leaves its codes
    (each step's change is below half a level's gap), rounded stochastically its average follows
    the float one (in √v, the domain it is rounded in)."""
    generator = torch.Generator().manual_seed(9)
    start = 0.01 * torch.rand(64, 128, generator=generator).pow(2) + 1e-4
    start[:, 0] = 0.05                                   # each block's (row's) absmax, stationary
    target = 2 * start
    target[:, 0] = start[:, 0]
    nearest, stochastic, exact = start.clone(), [start.clone() for _ in range(8)], start.clone()
    for step in range(1, 301):
        grad = target.sqrt() * torch.randn(64, 128, generator=generator).sign()
        exact = 0.999 * exact + 0.001 * grad * grad
        nearest = dequantize(*quantize(0.999 * nearest + 0.001 * grad * grad, 4, False, "rows"), 4, False,
                             nearest.shape, "rows")
        for i, v in enumerate(stochastic):
            v = 0.999 * v + 0.001 * grad * grad
            noise = rounding_noise(v, grad, 1000 * i + step)      # replica i: its own steps
            stochastic[i] = dequantize(*quantize(v, 4, False, "rows", noise=noise), 4, False, v.shape, "rows")
    stored_start = dequantize(*quantize(start, 4, False, "rows"), 4, False, start.shape, "rows")
    growing = slice(1, None)
    growth = float(exact[:, growing].sum() / start[:, growing].sum())               # about 1.26
    assert growth > 1.2
    assert abs(float(nearest[:, growing].sum() / stored_start[:, growing].sum()) - 1) < 0.02     # held still
    # rounded unbiased in √v (the map's domain, what the update divides by): √ṽ follows √v
    average_root = torch.stack(stochastic).sqrt().mean(0)
    assert abs(float(average_root[:, growing].sum() / exact[:, growing].sqrt().sum()) - 1) < 0.02
