"""Kernel 3 (Triton back-projection GEMM with the weight update in its epilogue) against float64.

Without a GPU the kernel runs on CPU tensors under TRITON_INTERPRET=1, set before it is defined.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

from lowrank_optim.kernels.weight_update import projected_weight_update_  # noqa: E402
from lowrank_optim.kernels.weight_update_triton import projected_weight_update_triton_  # noqa: E402

from lowrank_optim.projectors.dct_basis import dct_matrix  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(70, 45), (45, 70), (33, 96), (96, 33)]
RANK = 7
HYPER = dict(lr=0.05, scale=0.5, weight_decay=0.1)
# (weight dtype, update dtype) -> relative tolerance. fp32: ΔW entries are r-term fp32 dot products
# (r = 7, error ≲ r·2^-24), scaled by ηα and added to W with one rounding: 1e-5. bf16 W: the kernel
# rounds the fp32 result once to bf16 (half an ulp, 2^-9 ≈ 2e-3): 4e-3. bf16 N: bf16 operands
# multiply exactly and accumulate in fp32, then W (fp32 here) is rounded once: 1e-5 against a
# reference computed from the same bf16 operands.
TOLERANCES = {(torch.float32, torch.float32): 1e-5, (torch.bfloat16, torch.float32): 4e-3,
              (torch.float32, torch.bfloat16): 1e-5}


def _problem(shape, side, weight_dtype, update_dtype, dense, seed=0):
    generator = torch.Generator().manual_seed(seed)
    m, n = shape
    size = n if side == "right" else m
    weight = torch.randn(shape, generator=generator).to(weight_dtype)
    update = torch.randn((m, RANK) if side == "right" else (RANK, n), generator=generator).to(update_dtype)
    basis = dct_matrix(size, update_dtype, torch.device("cpu"))
    indices = torch.randperm(size, generator=generator)[:RANK]
    if dense:                                   # GaLore: a dense k×r P, no indices
        basis, indices = basis[:, indices].contiguous(), None
    else:                                       # DCT: the column-major C the projector passes
        basis = basis.T.contiguous().T
    on_device = [t.to(DEVICE) if t is not None else None for t in (weight, update, basis, indices)]
    return on_device


@pytest.mark.parametrize("decay_before_update", [True, False], ids=["torch-form", "hf-form"])
@pytest.mark.parametrize("dense", [False, True], ids=["gathered", "dense"])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtypes", list(TOLERANCES), ids=lambda d: f"W{d[0]}-N{d[1]}".replace("torch.", ""))
def test_update_matches_float64(dtypes, shape, side, dense, decay_before_update):
    weight_dtype, update_dtype = dtypes
    if update_dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the interpreter's bf16 dot is wrong; runs on GPU")
    weight, update, basis, indices = _problem(shape, side, weight_dtype, update_dtype, dense)
    expected = weight.double()
    projected_weight_update_(expected, update.double(), basis.double(), indices, side,
                             decay_before_update=decay_before_update, **HYPER)
    # The first call for a new shape autotunes on GPU: restore_value must leave one update only.
    projected_weight_update_triton_(weight, update, basis, indices, side,
                                    decay_before_update=decay_before_update, **HYPER)
    assert weight.dtype == weight_dtype
    tolerance = TOLERANCES[dtypes]
    torch.testing.assert_close(weight.double(), expected, rtol=tolerance,
                               atol=tolerance * float(expected.abs().max()))


def test_no_weight_decay_is_a_plain_update():
    weight, update, basis, indices = _problem((33, 21), "right", torch.float32, torch.float32, dense=False)
    expected = weight.double() - 0.05 * 0.5 * (update.double() @ basis.double()[:, indices].T)
    projected_weight_update_triton_(weight, update, basis, indices, "right", lr=0.05, scale=0.5,
                                    weight_decay=0.0, decay_before_update=False)
    torch.testing.assert_close(weight.double(), expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def test_update_of_the_wrong_shape_is_rejected():
    weight, update, basis, indices = _problem((33, 21), "right", torch.float32, torch.float32, dense=False)
    with pytest.raises(ValueError, match="do not fit"):
        projected_weight_update_triton_(weight, update.T, basis, indices, "right", decay_before_update=True, **HYPER)


def _residual_problem(shape, side, weight_dtype, update_dtype, dense, seed=1):
    """The weight problem plus ``G`` (in W's dtype, as autograd leaves it), ``R`` (in N's dtype)
    and ``φ`` (fp32, ``m×1`` or ``1×n``, as the residual's coefficients come)."""
    weight, update, basis, indices = _problem(shape, side, weight_dtype, update_dtype, dense, seed=seed)
    generator = torch.Generator().manual_seed(seed + 100)
    m, n = shape
    grad = torch.randn(shape, generator=generator).to(weight_dtype).to(DEVICE)
    low_rank_grad = torch.randn(update.shape, generator=generator).to(update_dtype).to(DEVICE)
    coefficients = torch.rand((m, 1) if side == "right" else (1, n), generator=generator).to(DEVICE)
    return weight, update, basis, indices, dict(residual_grad=grad, residual_low_rank_grad=low_rank_grad,
                                                residual_coefficients=coefficients)


def _as_double(residual):
    return {key: value.double() for key, value in residual.items()}


@pytest.mark.parametrize("decay_before_update", [True, False], ids=["torch-form", "hf-form"])
@pytest.mark.parametrize("dense", [False, True], ids=["gathered", "dense"])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtypes", list(TOLERANCES), ids=lambda d: f"W{d[0]}-N{d[1]}".replace("torch.", ""))
def test_residual_update_matches_float64_and_the_reference(dtypes, shape, side, dense, decay_before_update):
    """``W ← a·W − b·[(N − φ∘R)·Pᵀ + φ∘G]`` (right; left ``P·(N − φ∘R) + φ∘G``) by the fused kernel,
    against float64 and against the PyTorch reference run in the same dtypes. Tolerances as for
    the plain update: ``φ∘G`` adds one fp32 product to each fp32 accumulator, ``N − φ∘R`` one
    fp32 rounding per operand (none that the r-term dot does not already allow for)."""
    weight_dtype, update_dtype = dtypes
    if update_dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the interpreter's bf16 dot is wrong; runs on GPU")
    weight, update, basis, indices, residual = _residual_problem(shape, side, weight_dtype, update_dtype, dense)
    arguments = dict(decay_before_update=decay_before_update, **HYPER)
    expected = weight.double()
    projected_weight_update_(expected, update.double(), basis.double(), indices, side, **arguments,
                             **_as_double(residual))
    reference = weight.clone()
    projected_weight_update_(reference, update, basis, indices, side, **arguments, **residual)
    projected_weight_update_triton_(weight, update, basis, indices, side, **arguments, **residual)
    assert weight.dtype == weight_dtype
    tolerance = TOLERANCES[dtypes]
    for actual in (weight, reference):
        torch.testing.assert_close(actual.double(), expected, rtol=tolerance,
                                   atol=tolerance * float(expected.abs().max()))


@pytest.mark.parametrize("side", ["left", "right"])
def test_residual_is_the_gradient_outside_the_subspace(side):
    """With ``N = 0`` and ``φ = 1`` the update is ``−ηα·(G − R·Pᵀ)`` (right): for ``R`` the
    projection of ``G`` that is the part of ``G`` outside the span of ``P``, formed from scratch."""
    weight, update, basis, indices, residual = _residual_problem((45, 70), side, torch.float32, torch.float32,
                                                                 dense=False)
    grad = residual["residual_grad"]
    p = basis.double()[:, indices]
    low_rank_grad = grad.double() @ p if side == "right" else p.T @ grad.double()
    outside = grad.double() - (low_rank_grad @ p.T if side == "right" else p @ low_rank_grad)
    expected = weight.double() - 0.05 * 0.5 * outside
    projected_weight_update_triton_(weight, torch.zeros_like(update), basis, indices, side, lr=0.05, scale=0.5,
                                    weight_decay=0.0, decay_before_update=True, residual_grad=grad,
                                    residual_low_rank_grad=low_rank_grad.float(),
                                    residual_coefficients=torch.ones_like(residual["residual_coefficients"]))
    torch.testing.assert_close(weight.double(), expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


@pytest.mark.parametrize("side", ["left", "right"])
def test_one_dimensional_coefficients_and_the_dispatch(side, monkeypatch):
    """``φ`` as a 1-D vector does what its ``m×1``/``1×n`` view does, and ``backend="triton"``
    runs the kernel, never the PyTorch reference."""
    from lowrank_optim.kernels import dispatch

    def reference(*args, **kwargs):
        raise AssertionError("backend='triton' fell back to the PyTorch reference")

    weight, update, basis, indices, residual = _residual_problem((33, 96), side, torch.float32, torch.float32,
                                                                 dense=True)
    expected = weight.clone()
    projected_weight_update_triton_(expected, update, basis, indices, side, decay_before_update=False, **HYPER,
                                    **residual)
    flat = dict(residual, residual_coefficients=residual["residual_coefficients"].view(-1))
    monkeypatch.setattr(dispatch, "_reference_weight_update_", reference)
    dispatch.projected_weight_update_("triton", weight, update, basis, indices, side, decay_before_update=False,
                                      **HYPER, **flat)
    assert torch.equal(weight, expected)


def test_incomplete_or_misshapen_residual_is_rejected():
    weight, update, basis, indices, residual = _residual_problem((33, 21), "right", torch.float32, torch.float32,
                                                                 dense=False)
    for update_weight in (projected_weight_update_, projected_weight_update_triton_):
        with pytest.raises(ValueError, match="missing residual_low_rank_grad"):
            update_weight(weight, update, basis, indices, "right", decay_before_update=True, **HYPER,
                          residual_grad=residual["residual_grad"],
                          residual_coefficients=residual["residual_coefficients"])
        with pytest.raises(ValueError, match=r"residual_coefficients of shape \(1, 21\) do not scale the rows"):
            update_weight(weight, update, basis, indices, "right", decay_before_update=True, **HYPER,
                          **dict(residual, residual_coefficients=torch.ones(1, 21, device=DEVICE)))
