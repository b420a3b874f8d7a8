"""The fused Triton quantized moment update against the PyTorch path, and its AOT compilation.

Without a GPU the kernel runs on CPU tensors under TRITON_INTERPRET=1, which must be set before the
kernel module is imported (the kernels are defined at import).

Tolerance: none. Both paths evaluate the same sequence of separately rounded IEEE fp32 operations
(the kernel with FP fusion off and round-to-nearest sqrt/division; the PyTorch path without fused
adds and with a correctly rounded sqrt), and absmax, midpoint comparisons and table lookups are
exact, so ``N``, scales and codes must be bit-identical. A code could only differ where an ulp of
difference in a moment crosses a midpoint (an exact tie), which these IEEE paths exclude.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")


def _interpreter_is_usable() -> bool:
    """Under the interpreter, Triton's library functions (``tl.max``) must have been defined after
    TRITON_INTERPRET=1 was set. ``import lowrank_optim`` imports torch._dynamo, which imports
    triton: a test module collected earlier that imports the library without setting the variable
    first leaves them compiled-mode functions, which the interpreter cannot call."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
    return isinstance(tl.max, InterpretedFunction)


if os.environ.get("TRITON_INTERPRET") == "1" and not _interpreter_is_usable():
    pytest.skip("triton.language was imported before TRITON_INTERPRET=1 was set (by an earlier test module); "
                "run with TRITON_INTERPRET=1 in the environment or this file on its own", allow_module_level=True)

from lowrank_optim.kernels.quantized_moment_update_triton import quantized_adam_moment_update_triton  # noqa: E402
from support.quantized import quantized_step  # noqa: E402

from lowrank_optim.quantization import (  # noqa: E402
    codebook,
    quantize,
    quantized_zeros,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
# odd shapes: partial last blocks, an odd slot length (4 bits: a half-used byte), slots not a
# multiple of the kernel's slot tile, one flat tensor
CASES = [("columns", (300, 37)), ("rows", (37, 301)), ("flat", (61, 71))]
STEP = dict(beta1=0.9, beta2=0.999, eps=1e-8, bias_correction1=1 - 0.9**5, bias_correction2=1 - 0.999**5)


def _state(shape, bits, layout, seed, block_size=None):
    generator = torch.Generator().manual_seed(seed)
    grad = torch.randn(shape, generator=generator) * torch.rand(shape, generator=generator).pow(3)
    exp_avg = 0.1 * torch.randn(shape, generator=generator)
    exp_avg_sq = 0.01 * torch.rand(shape, generator=generator).pow(2)
    state = [*quantize(exp_avg, bits, True, layout, block_size=block_size),
             *quantize(exp_avg_sq, bits, False, layout, block_size=block_size)]
    return grad.to(DEVICE), [t.to(DEVICE) for t in state]


def _both(grad, state, **arguments):
    """(PyTorch result, Triton result) from two copies of ``state``."""
    torch_state, triton_state = [t.clone() for t in state], [t.clone() for t in state]
    expected = quantized_step(grad, *torch_state, backend="torch", **arguments)
    actual = quantized_step(grad, *triton_state, backend="triton", **arguments)
    return expected, actual, triton_state


def _assert_identical(expected, actual):
    for name, a, b in zip(("N", "m_codes", "m_scales", "v_codes", "v_scales"), actual, expected):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert torch.equal(a, b), f"{name}: {int((a != b).sum())} of {a.numel()} differ"


@pytest.mark.parametrize("layout,shape", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("bits", [8, 4])
def test_kernel_matches_the_pytorch_path_bit_for_bit(bits, layout, shape):
    grad, state = _state(shape, bits, layout, seed=0)
    expected, actual, triton_state = _both(grad, state, bits=bits, layout=layout, **STEP)
    _assert_identical(expected, actual)
    assert all(out is given for out, given in zip(actual[1:], triton_state))     # in place


@pytest.mark.parametrize("layout", ["columns", "rows"])
@pytest.mark.parametrize("bits", [8, 4])
def test_small_blocks_and_a_non_default_block_size(bits, layout):
    """Blocks of 8 and 64 values, and 2048 (moment_block_size at the 7B accounting): 2100-value
    slots, so each slot has one whole and one partial block of it."""
    for block_size in (8, 64, 2048):
        slots = 2100 if block_size == 2048 else 37
        shape = (slots, 13) if layout == "columns" else (13, slots)
        grad, state = _state(shape, bits, layout, seed=1, block_size=block_size)
        expected, actual, _ = _both(grad, state, bits=bits, layout=layout, block_size=block_size, **STEP)
        _assert_identical(expected, actual)


@pytest.mark.parametrize("layout,shape", CASES[:2], ids=["columns", "rows"])
@pytest.mark.parametrize("bits", [8, 4])
def test_slot_remap_is_fused_into_the_update(bits, layout, shape):
    grad, state = _state(shape, bits, layout, seed=2)
    n_slots = shape[1] if layout == "columns" else shape[0]
    source = torch.randperm(n_slots, generator=torch.Generator().manual_seed(3))
    source[::3] = -1
    before = [t.clone() for t in state]
    expected, actual, triton_state = _both(grad, state, bits=bits, layout=layout, source_slots=source.to(DEVICE),
                                           **STEP)
    _assert_identical(expected, actual)
    assert all(out is not given for out, given in zip(actual[1:], triton_state))   # new tensors
    assert all(torch.equal(t, b) for t, b in zip(triton_state, before))            # inputs untouched


@pytest.mark.parametrize("layout,shape", CASES[:2], ids=["columns", "rows"])
def test_per_slot_bias_corrections(layout, shape):
    n_slots = shape[1] if layout == "columns" else shape[0]
    steps = torch.randint(1, 50, (n_slots,), generator=torch.Generator().manual_seed(4)).float()
    steps = steps.view((1, -1) if layout == "columns" else (-1, 1)).to(DEVICE)
    bc1, bc2 = 1 - torch.pow(0.9, steps), 1 - torch.pow(0.999, steps)
    grad, state = _state(shape, 8, layout, seed=5)
    expected, actual, _ = _both(grad, state, bits=8, layout=layout, beta1=0.9, beta2=0.999, eps=1e-6 / bc2.sqrt(),
                                bias_correction1=bc1, bias_correction2=bc2)
    _assert_identical(expected, actual)


@pytest.mark.parametrize("bits", [8, 4])
def test_ten_steps_from_zero_state_stay_identical(bits):
    shape, layout = (300, 37), "columns"
    state = [*quantized_zeros(shape, bits, True, layout, device=DEVICE),
             *quantized_zeros(shape, bits, False, layout, device=DEVICE)]
    torch_state, triton_state = [t.clone() for t in state], [t.clone() for t in state]
    generator = torch.Generator().manual_seed(6)
    for step in range(1, 11):
        grad = torch.randn(shape, generator=generator).to(DEVICE)
        scalars = dict(beta1=0.9, beta2=0.999, eps=1e-8, bias_correction1=1 - 0.9**step,
                       bias_correction2=1 - 0.999**step)
        expected = quantized_step(grad, *torch_state, bits=bits, layout=layout, step=step, **scalars)
        actual = quantized_step(grad, *triton_state, bits=bits, layout=layout, backend="triton", step=step,
                                **scalars)
        _assert_identical(expected, actual)


def test_bf16_gradient():
    if INTERPRETING:
        pytest.skip("the interpreter's bf16 arithmetic is wrong; runs on GPU")
    grad, state = _state((300, 37), 8, "columns", seed=7)
    expected, actual, _ = _both(grad.bfloat16(), state, bits=8, layout="columns", **STEP)
    _assert_identical(expected, actual)


def test_launcher_checks():
    grad, state = _state((300, 37), 8, "columns", seed=8)
    books = dict(m_codebook=codebook(8, True, DEVICE), v_codebook=codebook(8, False, DEVICE))
    common = dict(bits=8, layout="columns", block_size=256, step=1, **books, **STEP)
    with pytest.raises(ValueError, match="exp_avg: codes of shape"):
        quantized_adam_moment_update_triton(grad.t().contiguous(), *state, **common)
    wide = torch.zeros(37, 600, dtype=torch.uint8, device=DEVICE)
    with pytest.raises(ValueError, match="must be contiguous"):
        quantized_adam_moment_update_triton(grad, wide[:, ::2].t(), *state[1:], **common)
    with pytest.raises(ValueError, match="do not index the 37 slots"):
        quantized_adam_moment_update_triton(grad, *state, source_slots=torch.arange(5, device=DEVICE), **common)
    flat_grad, flat_state = _state((61, 71), 8, "flat", seed=9)
    flat = dict(common, layout="flat", bias_correction1=torch.ones(1, device=DEVICE))
    with pytest.raises(ValueError, match="per-slot eps/bias corrections need"):
        quantized_adam_moment_update_triton(flat_grad, *flat_state, **flat)
    with pytest.raises(ValueError, match="one value per slot"):
        quantized_adam_moment_update_triton(grad, *state, **dict(common, bias_correction1=torch.ones(3)))


_AOT_SCRIPT = textwrap.dedent("""
    import warnings
    warnings.simplefilter("ignore")
    from triton.backends.compiler import GPUTarget
    from lowrank_optim.kernels.quantized_moment_update_triton import compile_for_target
    variants = [dict(layout="columns"), dict(layout="rows", has_remap=True, per_slot=True, grad_dtype="bf16"),
                dict(layout="flat")]
    for capability in (80, 90):
        for bits, block_size in ((8, 256), (4, 128), (8, 2048)):
            for variant in variants:
                compiled = compile_for_target(GPUTarget("cuda", capability, 32), bits=bits, block_size=block_size,
                                              **variant)
                ptx = compiled.asm["ptx"]
                assert f".target sm_{capability}" in ptx, capability
                assert "fma.rn.f32" not in ptx, "FP fusion must be off"
                assert len(compiled.asm["cubin"]) > 0
                print("compiled", capability, bits, block_size, variant["layout"])
""")


def test_aot_compiles_for_sm80_and_sm90():
    """Lower the real kernel (not the interpreter) to PTX and cubin for A100 and H100 targets: a
    fresh process without TRITON_INTERPRET, no GPU needed."""
    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    environment.setdefault("TRITON_DEFAULT_FP_FUSION", "1")        # silences Triton 3.9's notice
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    result = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], cwd=root, env=environment, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("compiled") == 18
