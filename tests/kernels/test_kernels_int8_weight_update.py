"""The fused Triton int8 weight update against the PyTorch path, and the Philox noise they share.

Without a GPU the kernel runs on CPU tensors under TRITON_INTERPRET=1 (set before the kernel
module is imported). Tolerance: none. Both paths draw the same noise (``tl.randint4x`` and its
PyTorch copy :func:`lowrank_optim.kernels.philox.philox_randint4x`, and the kernel's stream words
and :func:`lowrank_optim.kernels.philox.philox_words`, compared here directly) and
evaluate the same separately rounded fp32 operations (the kernel with FP fusion off and
round-to-nearest division); absmax, floor and the noise comparison are exact: codes and scales
must be bit-identical. Inputs are fp32 or bf16 values converted on load (the interpreter's bf16
arithmetic is wrong, its loads and conversions are not); shapes are odd, one spans two column
blocks.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from lowrank_optim.kernels.int8_weight_update import int8_weight_update_, quantize_rows  # noqa: E402
from lowrank_optim.kernels.int8_weight_update_triton import (  # noqa: E402
    _stream_word,
    block_columns,
    int8_weight_update_triton_,
)
from lowrank_optim.kernels.philox import philox_randint4x, philox_words  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(1, 1), (7, 37), (3, 2500)]          # 2500 columns: two blocks of 2048, the second partial


@triton.jit
def _randint4x_kernel(seed_ptr, out_ptr, base, N: tl.constexpr):
    counters = base + tl.arange(0, N).to(tl.int64)
    c0, c1, c2, c3 = tl.randint4x(tl.load(seed_ptr), counters)
    tl.store(out_ptr + tl.arange(0, N), c0.to(tl.int64) & 0xFFFFFFFF)
    tl.store(out_ptr + N + tl.arange(0, N), c1.to(tl.int64) & 0xFFFFFFFF)
    tl.store(out_ptr + 2 * N + tl.arange(0, N), c2.to(tl.int64) & 0xFFFFFFFF)
    tl.store(out_ptr + 3 * N + tl.arange(0, N), c3.to(tl.int64) & 0xFFFFFFFF)


@triton.jit
def _stream_kernel(seed_ptr, out_ptr, base, N: tl.constexpr):
    positions = base + tl.arange(0, N).to(tl.int64)
    tl.store(out_ptr + tl.arange(0, N), _stream_word(tl.load(seed_ptr), positions).to(tl.int64) & 0xFFFFFFFF)


@pytest.mark.parametrize("seed", [0, 12345, 2**62 + 987654321])
@pytest.mark.parametrize("base", [0, 2**33 + 5])            # counters above 2^32 use the second counter word
def test_philox_in_pytorch_is_triton_randint4x(seed, base):
    seed = torch.tensor([seed], dtype=torch.int64, device=DEVICE)
    out = torch.empty(4, 64, dtype=torch.int64, device=DEVICE)
    _randint4x_kernel[(1,)](seed, out, base, N=64)
    assert torch.equal(out, torch.stack(philox_randint4x(seed, base + torch.arange(64, device=DEVICE))))


@pytest.mark.parametrize("base", [0, 2**34 + 7])            # a start inside a counter's four words
def test_the_kernels_stream_is_philox_words(base):
    seed = torch.tensor([2**62 + 987654321], dtype=torch.int64, device=DEVICE)
    out = torch.empty(64, dtype=torch.int64, device=DEVICE)
    _stream_kernel[(1,)](seed, out, base, N=64)
    assert torch.equal(out, philox_words(seed, base, 64, DEVICE))


def _weight(shape, scale_dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    dense = torch.randn(shape, generator=generator) * torch.exp(torch.randn(shape[0], 1, generator=generator))
    if shape[0] > 2:
        dense[1] = 0                                          # a zero row
    codes, scales = quantize_rows(dense, scale_dtype=scale_dtype)
    delta = torch.randn(shape, generator=generator)
    return codes.to(DEVICE), scales.to(DEVICE), delta.to(DEVICE)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("delta_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("a, b", [(0.999, 0.01), (1.0, 3e-4), (0.5, 2.0)])
def test_the_kernel_writes_the_pytorch_bits(shape, scale_dtype, delta_dtype, a, b):
    codes, scales, delta = _weight(shape, scale_dtype)
    delta = delta.to(delta_dtype)
    seed = torch.tensor([987654321], dtype=torch.int64, device=DEVICE)
    expected_codes, expected_scales = codes.clone(), scales.clone()
    int8_weight_update_(expected_codes, expected_scales, delta, a=a, b=b, seed=seed)
    int8_weight_update_triton_(codes, scales, delta, a=a, b=b, seed=seed)
    assert torch.equal(codes, expected_codes) and torch.equal(scales, expected_scales)


def test_strided_rows_of_delta_and_an_update_that_changes_nothing():
    codes, scales, delta = _weight((5, 300), torch.bfloat16)
    wide = torch.zeros(5, 333, device=DEVICE)                 # delta rows 333 apart, only 300 used
    before = codes.clone(), scales.clone()
    seed = torch.tensor([7], dtype=torch.int64, device=DEVICE)
    # a = 1, ΔW = 0 with bf16 scales: every t is an integer and the absmax 127·s gives s back
    int8_weight_update_triton_(codes, scales, wide[:, :300], a=1.0, b=0.5, seed=seed)
    assert torch.equal(codes, before[0]) and torch.equal(scales, before[1])
    wide[:, :300] = delta
    expected = codes.clone(), scales.clone()
    int8_weight_update_(*expected, wide[:, :300], a=0.9, b=0.1, seed=seed)
    int8_weight_update_triton_(codes, scales, wide[:, :300], a=0.9, b=0.1, seed=seed)
    assert torch.equal(codes, expected[0]) and torch.equal(scales, expected[1])


def test_block_columns_and_launcher_errors():
    assert [block_columns(n) for n in (1, 37, 2048, 2500)] == [1, 64, 2048, 2048]
    codes, scales, delta = _weight((4, 6), torch.float32)
    seed = torch.tensor([1], dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match="unit column stride"):
        int8_weight_update_triton_(codes, scales, delta.t().contiguous().t(), a=1.0, b=1.0, seed=seed)
    with pytest.raises(ValueError, match=r"delta of torch.float32 and shape \(6, 4\)"):
        int8_weight_update_triton_(codes, scales, delta.t(), a=1.0, b=1.0, seed=seed)
    with pytest.raises(ValueError, match="seed must be one int64 value"):
        int8_weight_update_triton_(codes, scales, delta, a=1.0, b=1.0, seed=seed.int())
