"""Stochastic rounding of fp32 updates into bf16 weights: unbiased, reproducible, neighbours only.

Statistics: a value a fraction ``p`` of a bf16 ulp ``u`` above ``lo`` rounds to ``lo + u`` with
probability ``p``, so its error has mean 0 and standard deviation ``u·√(p(1−p)) ≤ u/2``; the mean of
``n`` independent errors has standard deviation ``≤ u/(2√n)``. Tests allow 5 of those (a false
failure once in ~1.7 million runs, and the seeds are fixed anyway).
"""
import math

import pytest
import torch

from lowrank_optim.quantization import add_stochastic_round_, stochastic_round_bf16
from lowrank_optim.quantization import stochastic_rounding as sr_module


def _ulp(weight: torch.Tensor) -> torch.Tensor:
    """The bf16 spacing at each (normal, non-zero) value."""
    exponent = torch.floor(torch.log2(weight.float().abs()))
    return torch.pow(2.0, exponent - 7)


@pytest.mark.parametrize("start", [1.0, -1.0, 3.0e-3, -7.5e4])
@pytest.mark.parametrize("fraction", [0.3, 0.01])
def test_a_sub_ulp_update_is_kept_in_expectation(start, fraction):
    n = 200_000
    weight = torch.full((n,), start, dtype=torch.bfloat16)
    start = float(weight[0])                                                  # the bf16 value
    ulp = float(_ulp(weight[:1]))
    update = torch.full((n,), fraction * ulp * math.copysign(1.0, start))
    exact = weight.double() + update.double()
    assert torch.equal((weight.float() + update).bfloat16(), weight)          # round-to-nearest drops it
    add_stochastic_round_(weight, update, generator=torch.Generator().manual_seed(0))
    error = (weight.double() - exact).mean()
    assert abs(float(error)) <= 5 * ulp / (2 * math.sqrt(n))
    assert set(weight.unique().tolist()) <= {start, start + math.copysign(ulp, start)}


def test_unbiased_over_random_weights_and_updates():
    generator = torch.Generator().manual_seed(1)
    n, trials = 4096, 64
    base = (torch.randn(n, generator=generator) * torch.exp(4 * torch.randn(n, generator=generator))).bfloat16()
    ulp = _ulp(base)
    update = (torch.rand(n, generator=generator) * 4 - 2) * ulp               # within ±2 ulps
    exact = base.double() + update.double()
    errors = []
    for _ in range(trials):
        weight = base.clone()
        add_stochastic_round_(weight, update, generator=generator)
        assert torch.all((weight.double() - exact).abs() < 2 * ulp.double())   # a neighbour of the exact sum
        errors.append((weight.double() - exact) / ulp.double())
    normalized = torch.stack(errors).mean()
    assert abs(float(normalized)) <= 5 * 0.5 / math.sqrt(n * trials)


def test_representable_results_are_exact_and_specials_survive():
    weight = torch.tensor([1.0, -2.0, 0.0, float("inf"), float("-inf"), float("nan")], dtype=torch.bfloat16)
    update = torch.tensor([0.5, 0.25, -0.0078125, 1.0, 1.0, 1.0])
    for seed in range(20):
        result = add_stochastic_round_(weight.clone(), update, generator=torch.Generator().manual_seed(seed))
        assert result[:3].tolist() == [1.5, -1.75, -0.0078125]
        assert result[3] == float("inf") and result[4] == float("-inf") and torch.isnan(result[5])


def test_reproducible_with_a_generator():
    x = torch.randn(10_000, generator=torch.Generator().manual_seed(2))
    a = stochastic_round_bf16(x, generator=torch.Generator().manual_seed(3))
    b = stochastic_round_bf16(x, generator=torch.Generator().manual_seed(3))
    c = stochastic_round_bf16(x, generator=torch.Generator().manual_seed(4))
    assert a.dtype == torch.bfloat16 and torch.equal(a, b) and not torch.equal(a, c)


def test_chunked_and_non_contiguous_weights(monkeypatch):
    monkeypatch.setattr(sr_module, "_CHUNK", 1000)                      # many chunks
    generator = torch.Generator().manual_seed(5)
    base = torch.randn(64, 100, generator=generator).bfloat16()
    update = torch.randn(64, 100, generator=generator) * _ulp(base) * 0.4
    exact = base.double() + update.double()
    for weight, step in ((base.clone(), update), (base.clone().t(), update.t())):       # contiguous, transposed
        out = add_stochastic_round_(weight, step, generator=generator)
        assert out is weight
        reference = exact if step is update else exact.t()
        assert torch.all((weight.double() - reference).abs() < _ulp(weight.float()).double() * 1.01 + 1e-30)


def test_alpha_scales_the_update():
    weight = torch.full((100_000,), 1.0, dtype=torch.bfloat16)
    update = torch.full((100_000,), 2.0 ** -8)                          # half an ulp at 1.0
    add_stochastic_round_(weight, update, alpha=-0.5, generator=torch.Generator().manual_seed(6))
    ulp_below = 2.0 ** -8                                               # spacing in [0.5, 1)
    expected = 1.0 - 0.5 * 2.0**-8
    assert abs(float(weight.double().mean()) - expected) <= 5 * ulp_below / (2 * math.sqrt(100_000))


def test_invalid_arguments_are_named():
    with pytest.raises(ValueError, match="bf16 weights, got torch.float32"):
        add_stochastic_round_(torch.zeros(3), torch.zeros(3))
    with pytest.raises(ValueError, match=r"update of shape \(4,\) does not match the weight's \(3,\)"):
        add_stochastic_round_(torch.zeros(3, dtype=torch.bfloat16), torch.zeros(4))
