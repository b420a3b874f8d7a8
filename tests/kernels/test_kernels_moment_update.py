"""Kernel 1 (Triton projected Adam moment update) against a float64 reference.

Without a GPU the kernel runs on CPU tensors under TRITON_INTERPRET=1, which must be set before the
kernel module is imported (the kernels are defined at import).
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

from lowrank_optim.kernels.layout import layout_for, slot_dim  # noqa: E402
from lowrank_optim.kernels.moment_update import adam_moment_update_  # noqa: E402
from lowrank_optim.kernels.moment_update_triton import adam_moment_update_triton  # noqa: E402
from lowrank_optim.kernels.slot_remap import remap_slots  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(37, 13), (13, 37), (1, 5), (64, 96)]     # odd, non-power-of-two, and one exact tile
STEP_SCALARS = dict(beta1=0.9, beta2=0.999, eps=1e-8, bias_correction1=1 - 0.9**3, bias_correction2=1 - 0.999**3)

# (gradient dtype, moments dtype) -> relative tolerance. fp32 moments: a handful of fp32 roundings
# per element (no accumulation), so a few ulps (2^-24 ≈ 6e-8) of relative error: 1e-5 leaves
# margin. bf16 moments: m, v and N are each rounded once to bf16 (half an ulp, 2^-9 ≈ 2e-3
# relative), and v's rounding enters N at half its size: 8e-3.
TOLERANCES = {(torch.float32, torch.float32): 1e-5, (torch.bfloat16, torch.float32): 1e-5,
              (torch.bfloat16, torch.bfloat16): 8e-3}


def _inputs(shape, grad_dtype, moment_dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    grad = torch.randn(shape, generator=generator).to(grad_dtype)
    exp_avg = (0.1 * torch.randn(shape, generator=generator)).to(moment_dtype)
    exp_avg_sq = (0.01 * torch.rand(shape, generator=generator)).to(moment_dtype)
    return [t.to(DEVICE) for t in (grad, exp_avg, exp_avg_sq)]


def _assert_close(actual, expected, tolerance):
    torch.testing.assert_close(actual.double().cpu(), expected.cpu(), rtol=tolerance,
                               atol=tolerance * float(expected.abs().max()))


def _skip_bf16_moments_on_interpreter(moment_dtype):
    if moment_dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the interpreter's bf16 arithmetic is wrong; runs on GPU")


@pytest.mark.parametrize("dtypes", list(TOLERANCES), ids=lambda d: f"{d[0]}-{d[1]}".replace("torch.", ""))
@pytest.mark.parametrize("shape", SHAPES)
def test_in_place_update_matches_reference(shape, dtypes):
    grad_dtype, moment_dtype = dtypes
    _skip_bf16_moments_on_interpreter(moment_dtype)
    grad, exp_avg, exp_avg_sq = _inputs(shape, grad_dtype, moment_dtype)
    m64, v64 = exp_avg.double(), exp_avg_sq.double()
    expected = adam_moment_update_(grad.double(), m64, v64, **STEP_SCALARS)
    update, m, v = adam_moment_update_triton(grad, exp_avg, exp_avg_sq, **STEP_SCALARS)
    assert m is exp_avg and v is exp_avg_sq                    # in place
    assert update.dtype == moment_dtype
    for actual, reference in ((update, expected), (m, m64), (v, v64)):
        _assert_close(actual, reference, TOLERANCES[dtypes])


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("shape", [(37, 13), (13, 37)])
def test_slot_remap_is_fused_into_the_update(shape, side):
    layout = layout_for(side)
    grad, exp_avg, exp_avg_sq = _inputs(shape, torch.float32, torch.float32, seed=1)
    slots = torch.randperm(shape[slot_dim(layout)], generator=torch.Generator().manual_seed(2))
    slots[::3] = -1                                            # new columns start from zero
    slots = slots.to(DEVICE)
    m64 = remap_slots(exp_avg.double(), slots, layout)
    v64 = remap_slots(exp_avg_sq.double(), slots, layout)
    expected = adam_moment_update_(grad.double(), m64, v64, **STEP_SCALARS)
    old_m, old_v = exp_avg.clone(), exp_avg_sq.clone()
    update, m, v = adam_moment_update_triton(grad, exp_avg, exp_avg_sq, source_slots=slots, layout=layout,
                                             **STEP_SCALARS)
    for actual, reference in ((update, expected), (m, m64), (v, v64)):
        _assert_close(actual, reference, TOLERANCES[torch.float32, torch.float32])
    assert torch.equal(exp_avg, old_m) and torch.equal(exp_avg_sq, old_v)    # inputs untouched


def test_bias_corrections_are_runtime_values():
    """Two steps with different corrections through one compiled kernel both match the reference."""
    grad, exp_avg, exp_avg_sq = _inputs((9, 7), torch.float32, torch.float32)
    m64, v64 = exp_avg.double(), exp_avg_sq.double()
    for step in (1, 2):
        scalars = dict(STEP_SCALARS, bias_correction1=1 - 0.9**step, bias_correction2=1 - 0.999**step)
        expected = adam_moment_update_(grad.double(), m64, v64, **scalars)
        update, _, _ = adam_moment_update_triton(grad, exp_avg, exp_avg_sq, **scalars)
        _assert_close(update, expected, TOLERANCES[torch.float32, torch.float32])


def test_shape_mismatch_is_rejected():
    grad, exp_avg, exp_avg_sq = _inputs((5, 4), torch.float32, torch.float32)
    with pytest.raises(ValueError, match="do not match"):
        adam_moment_update_triton(grad, exp_avg.T.contiguous(), exp_avg_sq, **STEP_SCALARS)


def _slot_corrections(n_slots, side, form, seed=3):
    """Per-slot fp32 ``(bc1, bc2, ε)`` for step counts 1..40, shaped as the engine makes them:
    ``(1, r)`` when slots are columns (right), ``(r, 1)`` when they are rows (left). The HF form
    folds its ε convention into a per-slot ε (``ε/√bc2``), the torch form keeps a scalar one."""
    steps = torch.randint(1, 41, (n_slots,), generator=torch.Generator().manual_seed(seed)).float()
    steps = steps.view((1, -1) if side == "right" else (-1, 1)).to(DEVICE)
    bc1, bc2 = 1.0 - torch.pow(0.9, steps), 1.0 - torch.pow(0.999, steps)
    eps = 1e-8 / bc2.sqrt() if form == "hf" else 1e-8
    return bc1, bc2, eps


def _double(value):
    return value.double() if isinstance(value, torch.Tensor) else value


@pytest.mark.parametrize("form", ["torch", "hf"])
@pytest.mark.parametrize("remap", [False, True], ids=["in-place", "remap"])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("shape", [(37, 13), (13, 37), (1, 5)])
def test_per_slot_corrections_match_float64(shape, side, remap, form):
    """Per-slot bc1, bc2, ε read by slot (column on the right, row on the left), alone and with the
    fused slot remap; float64 reference from the same fp32 corrections."""
    layout = layout_for(side)
    grad, exp_avg, exp_avg_sq = _inputs(shape, torch.float32, torch.float32, seed=4)
    bc1, bc2, eps = _slot_corrections(shape[slot_dim(layout)], side, form)
    slots = None
    m64, v64 = exp_avg.double(), exp_avg_sq.double()
    if remap:
        slots = torch.randperm(shape[slot_dim(layout)], generator=torch.Generator().manual_seed(5))
        slots[::2] = -1
        slots = slots.to(DEVICE)
        m64, v64 = remap_slots(m64, slots, layout), remap_slots(v64, slots, layout)
    expected = adam_moment_update_(grad.double(), m64, v64, beta1=0.9, beta2=0.999, eps=_double(eps),
                                   bias_correction1=bc1.double(), bias_correction2=bc2.double())
    given = [value.clone() if isinstance(value, torch.Tensor) else value for value in (bc1, bc2, eps)]
    update, m, v = adam_moment_update_triton(grad, exp_avg, exp_avg_sq, beta1=0.9, beta2=0.999, eps=eps,
                                             bias_correction1=bc1, bias_correction2=bc2, source_slots=slots,
                                             layout=layout)
    assert (m is exp_avg) is not remap
    for before, after in zip(given, (bc1, bc2, eps)):              # the corrections are only read
        assert before == after if isinstance(before, float) else torch.equal(before, after)
    for actual, reference in ((update, expected), (m, m64), (v, v64)):
        _assert_close(actual, reference, TOLERANCES[torch.float32, torch.float32])


def test_per_slot_corrections_go_to_triton(monkeypatch):
    """``backend="triton"`` runs the kernel for per-slot corrections, never the PyTorch reference."""
    from lowrank_optim.kernels import dispatch

    def reference(*args, **kwargs):
        raise AssertionError("backend='triton' fell back to the PyTorch reference")

    grad, exp_avg, exp_avg_sq = _inputs((13, 37), torch.float32, torch.float32, seed=6)
    bc1, bc2, eps = _slot_corrections(13, "left", "hf")
    m64, v64 = exp_avg.double(), exp_avg_sq.double()
    expected = adam_moment_update_(grad.double(), m64, v64, beta1=0.9, beta2=0.999, eps=eps.double(),
                                   bias_correction1=bc1.double(), bias_correction2=bc2.double())
    monkeypatch.setattr(dispatch, "adam_moment_update_", reference)
    monkeypatch.setattr(dispatch, "remap_slots", reference)
    update, _, _ = dispatch.adam_moment_update("triton", grad, exp_avg, exp_avg_sq, beta1=0.9, beta2=0.999, eps=eps,
                                               bias_correction1=bc1, bias_correction2=bc2, layout="rows")
    _assert_close(update, expected, TOLERANCES[torch.float32, torch.float32])


def test_per_slot_corrections_along_the_wrong_dim_are_rejected():
    """A length-r vector broadcasts along columns, so it cannot index the rows of r×n moments."""
    grad, exp_avg, exp_avg_sq = _inputs((5, 9), torch.float32, torch.float32)
    bc1, bc2, eps = _slot_corrections(5, "left", "torch")
    with pytest.raises(ValueError, match=r"per-slot bias_correction1 of shape \(5,\) does not broadcast"):
        adam_moment_update_triton(grad, exp_avg, exp_avg_sq, beta1=0.9, beta2=0.999, eps=eps,
                                  bias_correction1=bc1.view(-1), bias_correction2=bc2, layout="rows")
