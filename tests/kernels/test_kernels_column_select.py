"""Kernel 2 (Triton column scores without S, top-r, gather-GEMM projection) against float64.

Without a GPU the kernels run on CPU tensors under TRITON_INTERPRET=1, set before they are defined.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

from lowrank_optim.kernels.column_select import gather_project, top_columns  # noqa: E402
from lowrank_optim.kernels.column_select_triton import (  # noqa: E402
    column_scores_triton,
    gather_project_triton,
    select_columns_triton,
)

from lowrank_optim.projectors.dct import DCTProjector  # noqa: E402
from lowrank_optim.projectors.dct_basis import dct_matrix  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (m, n): several row tiles, column counts that are neither tile multiples nor powers of two.
SHAPES = [(70, 45), (45, 70), (33, 96), (96, 33)]
DTYPES = [torch.float32, torch.bfloat16]
# Scores: each coefficient is a k-term fp32 dot product (k ≤ 96; bf16 operands multiply exactly in
# fp32), error ≲ k·2^-24 ≈ 6e-6 of the row scale in the worst case, doubled by squaring (l2), then
# summed: 2e-5 of the largest score. The reference uses the very same (bf16-rounded) operands.
SCORE_TOLERANCE = 2e-5
# R: the same dot products, stored in R's dtype: fp32 as for the scores; bf16 adds one rounding
# (half an ulp, 2^-9 relative).
PROJECTION_TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 4e-3}


def _skip_bf16_on_interpreter(dtype):
    if dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the interpreter's bf16 dot is wrong; runs on GPU")


def _problem(shape, side, dtype, seed=0):
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype).to(DEVICE)
    size = shape[1] if side == "right" else shape[0]
    basis = dct_matrix(size, dtype, torch.device(DEVICE))
    return grad, basis, basis.T.contiguous().T          # the column-major copy the projector passes


def _reference_scores(grad, basis, side, norm):
    """float64 scores (the library's reference sums in fp32)."""
    g, c = grad.double(), basis.double()
    coefficients = g @ c if side == "right" else c.T @ g
    magnitudes = coefficients.abs() if norm == "l1" else coefficients.square()
    return magnitudes.sum(dim=0 if side == "right" else 1)


@pytest.mark.parametrize("norm", ["l1", "l2"])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_scores_match_float64(dtype, shape, side, norm):
    _skip_bf16_on_interpreter(dtype)
    grad, basis, column_major = _problem(shape, side, dtype)
    expected = _reference_scores(grad, basis, side, norm)
    for layout in (basis, column_major):
        scores = column_scores_triton(grad, layout, side, norm)
        assert scores.dtype == torch.float32
        torch.testing.assert_close(scores.double(), expected, rtol=0,
                                   atol=SCORE_TOLERANCE * float(expected.max()))


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gather_projection_matches_float64(dtype, shape, side):
    _skip_bf16_on_interpreter(dtype)
    grad, basis, column_major = _problem(shape, side, dtype, seed=1)
    indices = torch.tensor([5, 0, 31, 2, 17, 9, 30], device=DEVICE)      # unsorted, as slots are
    expected = gather_project(grad.double(), basis.double(), indices, side)
    projected = gather_project_triton(grad, column_major, indices, side)
    assert projected.dtype == dtype and projected.shape == expected.shape and projected.is_contiguous()
    tolerance = PROJECTION_TOLERANCE[dtype]
    torch.testing.assert_close(projected.double(), expected, rtol=tolerance,
                               atol=tolerance * float(expected.abs().max()))


@pytest.mark.parametrize("norm", ["l1", "l2"])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("shape", SHAPES)
def test_selection_is_the_torch_selection(shape, side, norm):
    """Same indices, same slot order as the float64 ranking and as the projector's PyTorch path."""
    grad, basis, column_major = _problem(shape, side, torch.float32, seed=2)
    rank = 11
    indices, projected = select_columns_triton(grad, column_major, rank, side, norm, project=True)
    assert torch.equal(indices, top_columns(_reference_scores(grad, basis, side, norm), rank))
    projector = DCTProjector({"score": norm, "transform": "auto"})
    assert torch.equal(projector.select(grad, rank, side, "triton")["indices"], indices)
    assert torch.equal(projector.select(grad, rank, side, "torch")["indices"], indices)
    expected = gather_project(grad.double(), basis.double(), indices, side)
    torch.testing.assert_close(projected.double(), expected, rtol=2e-5, atol=2e-5 * float(expected.abs().max()))


def test_ties_go_to_the_lower_index():
    grad = torch.zeros(9, 7, device=DEVICE)                          # every score ties at zero
    _, _, column_major = _problem((9, 7), "right", torch.float32)
    indices, projected = select_columns_triton(grad, column_major, 3, "right", "l2")
    assert indices.tolist() == [0, 1, 2] and projected is None


def test_basis_of_the_wrong_size_is_rejected():
    grad, _, column_major = _problem((9, 7), "right", torch.float32)
    with pytest.raises(ValueError, match="compressed size"):
        column_scores_triton(grad, column_major, "left", "l1")
