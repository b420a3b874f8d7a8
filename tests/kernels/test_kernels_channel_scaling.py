"""APOLLO's weight update (channel norms of ``G``, then ``W ← a·W − b·(f∘G)``): the PyTorch
reference against float64, the Triton kernels against the reference, the optimizer on both backends.

Without a GPU the kernels run on CPU tensors under TRITON_INTERPRET=1, set before they are defined
(the interpreter's bf16 arithmetic is wrong: fp32 and fp16 here, bf16 compiled in
test_kernels_compile.py for sm80/sm90).
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

from lowrank_optim.kernels.channel_scaling import channel_squared_norms, scaled_weight_update_  # noqa: E402
from lowrank_optim.kernels.channel_scaling_triton import (  # noqa: E402
    BLOCK_L,
    channel_squared_norms_triton,
    scaled_weight_update_triton_,
)

from lowrank_optim import APOLLOAdamW  # noqa: E402
from lowrank_optim.kernels import dispatch  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Odd shapes (masked tails in both tile dimensions), one longer than a norm tile row (several
# BLOCK_L tiles, and a split of the length), one with fewer rows than a tile.
SHAPES = [(37, 53), (53, 37), (5, 3 * BLOCK_L + 7), (3 * BLOCK_L + 7, 5)]
A, B = 0.987, 0.0123              # a = 1 − ηλ, b = η·√α·bias (any numbers: the kernel takes them as given)
PAD = float("nan")


def _padded(shape, dtype, generator, fill=PAD):
    """A view of ``shape`` into a larger buffer whose margin holds ``fill``: a load past a mask reads
    NaN into the result, a store past one overwrites the margin (the interpreter lets both pass on
    a tight tensor)."""
    m, n = shape
    buffer = torch.full((m + 3, n + 5), fill, dtype=torch.float32)
    buffer[:m, :n] = torch.randn(shape, generator=generator)
    buffer = buffer.to(dtype=dtype, device=DEVICE)
    return buffer, buffer[:m, :n]


def _factors(shape, side, generator, per_channel=True):
    m, n = shape
    if not per_channel:
        return torch.rand((), generator=generator).to(DEVICE)
    return torch.rand(m if side == "right" else n, generator=generator).to(DEVICE)


@pytest.mark.parametrize("side", ["right", "left", None])
@pytest.mark.parametrize("shape", SHAPES)
def test_reference_channel_norms_match_float64(shape, side):
    generator = torch.Generator().manual_seed(1)
    grad = torch.randn(shape, generator=generator)
    expected = grad.double().square()
    expected = expected.sum() if side is None else expected.sum(dim=1 if side == "right" else 0)
    got = channel_squared_norms(grad, side)
    assert got.dtype == torch.float32
    # fp32 sums of ≤ 400 positive terms: relative error ≲ n·2^-24 ≈ 3e-5, usually far less.
    torch.testing.assert_close(got.double(), expected, rtol=3e-5, atol=0)


@pytest.mark.parametrize("per_channel", [True, False], ids=["channel", "tensor"])
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("shape", SHAPES)
def test_reference_update_matches_float64(shape, side, per_channel):
    generator = torch.Generator().manual_seed(2)
    weight, grad = torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)
    factors = _factors(shape, side, generator, per_channel).cpu()
    broadcast = factors if not per_channel else (factors[:, None] if side == "right" else factors[None, :])
    expected = A * weight.double() - B * broadcast.double() * grad.double()
    scaled_weight_update_(weight, grad, factors, side, a=A, b=B)
    # Two fp32 roundings (a·W, then the fused multiply-add) of values of order 1: 2 ulp.
    torch.testing.assert_close(weight.double(), expected, rtol=2.5e-7, atol=2.5e-7)


@pytest.mark.parametrize("side", ["right", "left", None])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_channel_norms_match_the_reference(dtype, shape, side):
    generator = torch.Generator().manual_seed(3)
    _, grad = _padded(shape, dtype, generator)
    got = channel_squared_norms_triton(grad, side)
    expected = channel_squared_norms(grad.cpu(), side)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    # fp32 sums in another order (a tree over lanes, partials per split): a few ulps of the sum.
    torch.testing.assert_close(got.cpu(), expected, rtol=2e-6, atol=0)


@pytest.mark.parametrize("per_channel", [True, False], ids=["channel", "tensor"])
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_update_matches_the_reference_exactly(dtype, shape, side, per_channel):
    """Bitwise: the kernel computes fma((−b)·G, f, a·W) in fp32 like torch's mul_ + addcmul_ (fp32
    weights) and the reference's fp32 path (16-bit weights), then rounds once. On a GPU the same."""
    generator = torch.Generator().manual_seed(4)
    buffer, weight = _padded(shape, dtype, generator)
    _, grad = _padded(shape, dtype, generator)
    factors = _factors(shape, side, generator, per_channel)
    expected = weight.cpu().clone()
    scaled_weight_update_(expected, grad.cpu(), factors.cpu(), side, a=A, b=B)
    margin = buffer.clone()
    scaled_weight_update_triton_(weight, grad, factors, side, a=A, b=B)
    assert torch.equal(weight.cpu(), expected)
    margin[:shape[0], :shape[1]] = weight
    assert torch.equal(buffer.isnan(), margin.isnan()), "a store past the mask wrote into the margin"


def test_dispatch_routes_by_backend_and_checks_shapes():
    generator = torch.Generator().manual_seed(5)
    grad = torch.randn(37, 53, generator=generator).to(DEVICE)
    for backend in ("torch", "triton"):
        torch.testing.assert_close(dispatch.channel_squared_norms(backend, grad, "left"),
                                   channel_squared_norms(grad, "left"), rtol=2e-6, atol=0)
        weight = torch.zeros_like(grad)
        dispatch.scaled_weight_update_(backend, weight, grad, torch.full((37,), 2.0, device=DEVICE), "right",
                                       a=1.0, b=0.5)
        assert torch.equal(weight, -grad)
        with pytest.raises(ValueError, match=r"do not scale the rows of a 37×53 gradient \(expected \(37,\)"):
            dispatch.scaled_weight_update_(backend, weight, grad, torch.ones(53, device=DEVICE), "right", a=1.0, b=1.0)
    with pytest.raises(ValueError, match="Invalid backend: 'auto'"):
        dispatch.channel_squared_norms("auto", grad, "left")
    with pytest.raises(RuntimeError, match="backend='triton' got a torch.float64 tensor"):
        scaled_weight_update_triton_(grad.double(), grad.double(), torch.ones(37, device=DEVICE), "right",
                                     a=1.0, b=1.0)


def _train(backend, steps, **group):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(24, 40), torch.nn.Tanh(), torch.nn.Linear(40, 24)).to(DEVICE)
    matrices = [model[0].weight, model[2].weight]
    others = [model[0].bias, model[2].bias]
    optimizer = APOLLOAdamW([{"params": matrices, "rank": 4, **group}, {"params": others}], lr=1e-2,
                            weight_decay=0.1, backend=backend)
    data = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(8, 24, generator=data).to(DEVICE)
        model(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return [p.detach().clone() for p in model.parameters()], optimizer


@pytest.mark.parametrize("group", [{}, {"scale_type": "tensor"}, {"norm_growth_limit": None}],
                         ids=["channel-limiter", "tensor-limiter", "channel"])
def test_apollo_on_triton_follows_torch(group):
    """Four steps of a small MLP: the Triton moments and update agree with PyTorch's to fp32 rounding
    (the moment kernel's and the norms' orders of operations differ by ulps, carried by the
    weights): 1e-5 relative on weights of order 0.1."""
    expected, reference = _train("torch", 4, **group)
    got, optimizer = _train("triton", 4, **group)
    assert optimizer.plan_of(optimizer.param_groups[0]["params"][0]).backend == "triton"
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    limiter = [optimizer.state[p].get("limiter_norm") for p in optimizer.param_groups[0]["params"]]
    expected_limiter = [reference.state[p].get("limiter_norm") for p in reference.param_groups[0]["params"]]
    for a, b in zip(limiter, expected_limiter):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=0)


def test_triton_with_stochastic_rounding_is_refused_for_apollo():
    """The fused update rounds to nearest: a bf16 weight that asks for stochastic rounding is refused
    on backend='triton' (by name), as for the other rules, never run on PyTorch silently."""
    weight = torch.nn.Parameter(torch.randn(24, 40, device=DEVICE, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"\(shape \(24, 40\)\): backend='triton' with bf16_stochastic_round=True"):
        APOLLOAdamW([{"params": [weight], "rank": 4}], backend="triton", bf16_stochastic_round=True)
