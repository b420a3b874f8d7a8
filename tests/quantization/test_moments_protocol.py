"""The moments protocol (:class:`lowrank_optim.moments.Moments`): one set of tests for every storage
(float fp32, float bf16, 8-bit, 4-bit) in every layout (columns, rows, flat).

Tolerances of a step against float64 Adam (``m ← β1·m + (1−β1)·R``, ``v ← β2·v + (1−β2)·R²``,
``N = (m/bc1)/(√(v/bc2)+ε)`` from the moments the state held before, as ``load`` gives them):

* fp32 float: the moments and ``N`` are fp32 results of a few separately rounded operations,
  ``2e-6`` relative to the largest value (a few ulps of 2^-24); and bit-identical to the kernels'
  PyTorch reference run on the same fp32 tensors.
* bf16 float: the gradient is rounded to bf16 and every operation rounds to 8 significant bits
  (2^-9 relative each, about six in ``N``): ``2e-2`` relative to the largest value.
* 8/4-bit: ``N`` comes from the fp32 moments before re-quantization, so ``2e-6`` as fp32; the
  stored moments are re-quantized: within the map's largest half-gap (the lowest level, for the
  zero-free ``v`` map, where values below it round up) times the block's absmax, bounded here by the
  tensor's absmax, plus fp32 slack.
"""
import pytest
import torch
from lowrank_optim.kernels.layout import slot_dim
from lowrank_optim.kernels.moment_update import adam_moment_update_
from lowrank_optim.kernels.slot_remap import remap_slots

from lowrank_optim.moments import FLOAT_KEYS, QUANTIZED_KEYS, FloatMoments, Moments, QuantizedMoments
from lowrank_optim.quantization import dequantize, quantization_map, quantize
from lowrank_optim.quantization.maps import rounds_stochastically

# (side, shape): odd shapes, at least 4096 values (smaller moments stay float whatever the bits),
# partial last blocks and an odd slot length (4 bits: a half-used byte)
CASES = {"columns": ("right", (300, 37)), "rows": ("left", (37, 301)), "flat": (None, (61, 71))}
# storage id: (moment_bits, float dtype passed to create)
STORAGES = {"fp32": (None, torch.float32), "bf16": (None, torch.bfloat16), "8bit": (8, torch.float32),
            "4bit": (4, torch.float32)}
ADAM_SCALARS = dict(beta1=0.9, beta2=0.999, eps=1e-8, bias_correction1=1 - 0.9**5, bias_correction2=1 - 0.999**5)
SCALARS = dict(ADAM_SCALARS, step=5)              # the protocol's step also takes the step count
FP32_RTOL = 2e-6
BF16_RTOL = 2e-2


def _moments(storage: str, layout: str) -> tuple[Moments, torch.dtype]:
    bits, dtype = STORAGES[storage]
    side, shape = CASES[layout]
    moments = Moments.of({}, shape, side, bits)
    moments.create(dtype, torch.device("cpu"))
    return moments, dtype


def _random(shape, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(R, m, v)``: a heavy-tailed gradient, a signed first and a non-negative second moment."""
    generator = torch.Generator().manual_seed(seed)
    grad = torch.randn(shape, generator=generator) * torch.rand(shape, generator=generator).pow(3)
    return grad, 0.1 * torch.randn(shape, generator=generator), 0.01 * torch.rand(shape, generator=generator).pow(2)


def _held(moments: Moments, dtype: torch.dtype, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor):
    """What the storage holds of fp32 ``(m, v)``: rounded to the float dtype, or quantized."""
    if isinstance(moments, FloatMoments):
        return exp_avg.to(dtype).float(), exp_avg_sq.to(dtype).float()
    return tuple(dequantize(*quantize(moment, moments.bits, signed, moments.layout), moments.bits, signed,
                            moment.shape, moments.layout)
                 for moment, signed in ((exp_avg, True), (exp_avg_sq, False)))


def _quantization_bound(bits: int, signed: bool) -> float:
    """The largest ``|deq(x) − x| / absmax`` of a step's rounding (module doc): half the widest gap
    between levels, the whole gap where the step rounds stochastically."""
    levels = quantization_map(bits, signed)
    gap = float((levels[1:] - levels[:-1]).max()) / (1 if rounds_stochastically(bits, signed) else 2)
    return gap if signed else max(gap, float(levels[0]))


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=rtol * float(expected.abs().max()))


parametrize = pytest.mark.parametrize
storages = parametrize("storage", list(STORAGES))
layouts = parametrize("layout", list(CASES))


@storages
@layouts
def test_of_picks_the_storage_and_create_gives_zeros(storage, layout):
    moments, dtype = _moments(storage, layout)
    bits = STORAGES[storage][0]
    assert isinstance(moments, FloatMoments if bits is None else QuantizedMoments) and moments.bits == bits
    assert moments.exists and set(moments.state) == set(FLOAT_KEYS if bits is None else QUANTIZED_KEYS)
    assert moments.float_dtype == (dtype if bits is None else torch.float32)
    for moment in moments.load():
        assert moment.dtype == torch.float32 and moment.shape == moments.shape
        assert torch.equal(moment, torch.zeros(moments.shape))


@storages
@layouts
def test_store_then_load_gives_what_the_storage_holds(storage, layout):
    moments, dtype = _moments(storage, layout)
    _, exp_avg, exp_avg_sq = _random(moments.shape, seed=1)
    stored = moments.state[moments.keys[0]]
    moments.store(exp_avg, exp_avg_sq)
    assert moments.state[moments.keys[0]] is stored                       # written in place
    for loaded, expected in zip(moments.load(), _held(moments, dtype, exp_avg, exp_avg_sq)):
        assert torch.equal(loaded, expected)
    with pytest.raises(ValueError, match="cannot be stored"):
        moments.store(exp_avg.view(-1)[:-1], exp_avg_sq)


@layouts
def test_fp32_load_gives_the_stored_tensors(layout):
    """Float fp32: ``load`` returns the state's tensors, so in-place edits update the state, and
    storing them back is free; other storages give copies."""
    moments, _ = _moments("fp32", layout)
    exp_avg, exp_avg_sq = moments.load()
    assert exp_avg is moments.state["exp_avg"] and exp_avg_sq is moments.state["exp_avg_sq"]
    exp_avg.add_(1.0)
    moments.store(exp_avg, exp_avg_sq)
    assert torch.equal(moments.state["exp_avg"], torch.ones(moments.shape))
    copies, _ = _moments("bf16", layout)
    copies.load()[0].add_(1.0)
    assert torch.equal(copies.state["exp_avg"], torch.zeros(copies.shape, dtype=torch.bfloat16))


@storages
@layouts
def test_step_is_adams_moment_update(storage, layout):
    moments, dtype = _moments(storage, layout)
    grad, exp_avg, exp_avg_sq = _random(moments.shape, seed=2)
    moments.store(exp_avg, exp_avg_sq)
    m0, v0 = (moment.double() for moment in moments.load())
    if storage == "fp32":
        reference = [moment.clone() for moment in moments.load()]
        reference_update = adam_moment_update_(grad, *reference, **ADAM_SCALARS)
    update = moments.step("torch", grad, **SCALARS)
    assert update.dtype == moments.float_dtype and update.shape == moments.shape

    g = grad.double()
    m64 = SCALARS["beta1"] * m0 + (1 - SCALARS["beta1"]) * g
    v64 = SCALARS["beta2"] * v0 + (1 - SCALARS["beta2"]) * g * g
    update64 = (m64 / SCALARS["bias_correction1"]) / ((v64 / SCALARS["bias_correction2"]).sqrt() + SCALARS["eps"])
    exp_avg, exp_avg_sq = moments.load()
    if moments.bits is None:
        rtol = FP32_RTOL if dtype == torch.float32 else BF16_RTOL
        for actual, expected in ((update, update64), (exp_avg, m64), (exp_avg_sq, v64)):
            _assert_close(actual, expected, rtol)
    else:
        _assert_close(update, update64, FP32_RTOL)
        for actual, expected, signed in ((exp_avg, m64, True), (exp_avg_sq, v64, False)):
            bound = (_quantization_bound(moments.bits, signed) + 1e-6) * float(expected.abs().max())
            assert float((actual.double() - expected).abs().max()) <= bound
    if storage == "fp32":
        assert torch.equal(update, reference_update)
        assert all(torch.equal(a, b) for a, b in zip((exp_avg, exp_avg_sq), reference))


@parametrize("storage", ["fp32", "8bit", "4bit"])
@layouts
def test_store_with_the_steps_gradient_writes_what_step_writes(storage, layout):
    """A rule that updates the moments itself (``adam_atan2``) stores them with the step's gradient
    and count: the state then equals the fused step's, the 4-bit ``v``'s stochastic rounding
    included; without them a quantized store rounds to nearest (another state at 4 bits)."""
    states = []
    for with_gradient in (True, False, None):
        moments, _ = _moments(storage, layout)
        grad, exp_avg, exp_avg_sq = _random(moments.shape, seed=7)
        moments.store(exp_avg, exp_avg_sq)
        if with_gradient is None:
            moments.step("torch", grad, **SCALARS)
        else:
            m, v = (moment.clone() for moment in moments.load())
            m = m * SCALARS["beta1"] + grad * (1.0 - SCALARS["beta1"])
            v = v * SCALARS["beta2"] + (grad * grad) * (1.0 - SCALARS["beta2"])
            moments.store(m, v, **(dict(grad=grad, step=SCALARS["step"]) if with_gradient else {}))
        states.append([tensor.clone() for tensor in moments.state.values()])
    fused_step, with_gradient, nearest = states[2], states[0], states[1]
    if storage == "fp32":                      # the float step's own expressions: equal to rounding
        for a, b in zip(with_gradient, fused_step):
            torch.testing.assert_close(a, b, rtol=FP32_RTOL, atol=FP32_RTOL * float(b.abs().max()))
    else:
        assert all(torch.equal(a, b) for a, b in zip(with_gradient, fused_step))
        assert all(torch.equal(a, b) for a, b in zip(nearest, fused_step)) == (storage == "8bit")
        with pytest.raises(ValueError, match=r"grad and step go together \(grad given: True, step=None\)"):
            moments.store(exp_avg, exp_avg_sq, grad=grad)
        assert all(torch.equal(a, b) for a, b in zip(moments.state.values(), fused_step))      # untouched


@storages
@parametrize("layout", ["columns", "rows"])
def test_remap_slots_remaps_the_loaded_moments(storage, layout):
    """Exact for every storage: whole slots move (quantized: with their codes and scales)."""
    moments, _ = _moments(storage, layout)
    grad, exp_avg, exp_avg_sq = _random(moments.shape, seed=3)
    moments.store(exp_avg, exp_avg_sq)
    before = [moment.clone() for moment in moments.load()]
    source = torch.randperm(moments.shape[slot_dim(layout)], generator=torch.Generator().manual_seed(4))
    source[::3] = -1                                    # new slots start from zero
    moments.remap_slots(source)
    for loaded, old in zip(moments.load(), before):
        assert torch.equal(loaded, remap_slots(old, source, layout))
    # the same remap fused into a step
    fused, _ = _moments(storage, layout)
    fused.store(exp_avg, exp_avg_sq)
    update = fused.step("torch", grad, source_slots=source, **SCALARS)
    assert torch.equal(update, moments.step("torch", grad, **SCALARS))
    assert all(torch.equal(a, b) for a, b in zip(fused.load(), moments.load()))


@storages
def test_flat_moments_have_no_slots(storage):
    moments, _ = _moments(storage, "flat")
    with pytest.raises(ValueError, match="'columns' or 'rows'"):
        moments.remap_slots(torch.arange(1))


@storages
@layouts
def test_transform_applies_to_each_moment(storage, layout):
    """Float moments are transformed in their own dtype, quantized ones in fp32 and re-quantized."""
    moments, dtype = _moments(storage, layout)
    _, exp_avg, exp_avg_sq = _random(moments.shape, seed=5)
    moments.store(exp_avg, exp_avg_sq)
    first, second = (lambda m: -2.0 * m.flip(0)), (lambda v: 3.0 * v.flip(-1))
    if moments.bits is None:
        expected = [transform(moments.state[key].clone()).float()
                    for key, transform in zip(FLOAT_KEYS, (first, second))]
    else:
        m, v = moments.load()
        expected = _held(moments, dtype, first(m), second(v))
    moments.transform_(first, second)
    assert all(torch.equal(a, b) for a, b in zip(moments.load(), expected))


@storages
@layouts
def test_zero_resets_both_moments(storage, layout):
    moments, _ = _moments(storage, layout)
    moments.store(*_random(moments.shape, seed=6)[1:])
    moments.zero_()
    assert all(torch.equal(moment, torch.zeros(moments.shape)) for moment in moments.load())


@storages
@layouts
def test_expected_bytes_are_the_bytes_created(storage, layout):
    bits, dtype = STORAGES[storage]
    side, shape = CASES[layout]
    expected = Moments.of({}, shape, side, bits).expected_bytes(dtype)
    moments, _ = _moments(storage, layout)
    assert expected == sum(t.numel() * t.element_size() for t in moments.state.values())


@storages
def test_flat_chunks_step_the_state_in_place(storage):
    """Stepping a flat moment in block-aligned chunks (views of its state) is stepping it whole."""
    whole, _ = _moments(storage, "flat")
    chunked, _ = _moments(storage, "flat")
    grad, exp_avg, exp_avg_sq = _random(whole.shape, seed=7)
    for moments in (whole, chunked):
        moments.store(exp_avg, exp_avg_sq)
    update = whole.step("torch", grad, **SCALARS)
    bounds = (0, 1024, 3072, grad.numel())                     # multiples of the 8- and 4-bit blocks
    flat_grad = grad.view(-1)
    updates = [chunked.flat_chunk(start, stop).step("torch", flat_grad[start:stop], **SCALARS)
               for start, stop in zip(bounds, bounds[1:])]
    assert torch.equal(torch.cat(updates), update.view(-1))
    assert all(torch.equal(a, b) for a, b in zip(chunked.load(), whole.load()))


def test_chunks_need_the_flat_layout_and_quantized_ones_a_block_start():
    with pytest.raises(ValueError, match="flat_chunk needs the 'flat' layout"):
        _moments("fp32", "columns")[0].flat_chunk(0, 10)
    with pytest.raises(ValueError, match="must start on a block of 256 values"):
        _moments("8bit", "flat")[0].flat_chunk(100, 300)
