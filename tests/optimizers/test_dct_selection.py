import itertools

import pytest
import torch

from lowrank_optim.projectors.dct import DCTProjector
from lowrank_optim.projectors.dct_basis import dct_matrix


def _projector(score, transform="matmul"):
    return DCTProjector({"score": score, "transform": transform})


@pytest.mark.parametrize("side", ["left", "right"])
def test_l2_selection_is_the_best_column_subset(side):
    size, rank = 7, 3
    grad = torch.randn((11, size) if side == "right" else (size, 11), dtype=torch.float64,
                       generator=torch.Generator().manual_seed(0))
    basis = dct_matrix(size, torch.float64, torch.device("cpu"))

    def error(indices):
        p = basis[:, list(indices)]
        approx = grad @ p @ p.T if side == "right" else p @ p.T @ grad
        return float((grad - approx).norm())

    best = min(itertools.combinations(range(size), rank), key=error)
    chosen = _projector("l2").select(grad, rank, side)["indices"]
    assert sorted(chosen.tolist()) == sorted(best)
    assert error(chosen.tolist()) == pytest.approx(error(best), rel=1e-12)


@pytest.mark.parametrize("score", ["l1", "l2"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_slots_hold_columns_by_decreasing_score(score, side):
    grad = torch.randn(24, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    indices = _projector(score).select(grad, 8, side)["indices"]
    basis = dct_matrix(24, torch.float64, torch.device("cpu"))
    coefficients = grad @ basis if side == "right" else basis.T @ grad
    per_candidate = coefficients.T if side == "right" else coefficients
    scores = per_candidate.abs().sum(1) if score == "l1" else per_candidate.square().sum(1)
    assert indices.dtype == torch.int64
    assert torch.equal(indices, torch.argsort(scores, descending=True)[:8])


def test_ties_are_broken_by_lower_index():
    grad = torch.zeros(5, 4, dtype=torch.float64)          # every score ties at zero
    assert _projector("l2").select(grad, 3, "right")["indices"].tolist() == [0, 1, 2]


def test_fft_and_matmul_select_the_same_columns():
    grad = torch.randn(64, 48, generator=torch.Generator().manual_seed(2))
    for side in ("left", "right"):
        a = _projector("l2", "fft").select(grad, 12, side)["indices"]
        b = _projector("l2", "matmul").select(grad, 12, side)["indices"]
        assert torch.equal(a, b)


@pytest.mark.parametrize("side", ["left", "right"])
def test_transport_keeps_moments_of_kept_indices_exactly(side):
    old = {"indices": torch.tensor([5, 2, 9, 0])}
    new = {"indices": torch.tensor([9, 7, 5, 1])}
    moment = torch.randn((6, 4) if side == "right" else (4, 6), generator=torch.Generator().manual_seed(4))
    moved = _projector("l2").transport(moment, old, new, side, second_moment=False)
    column = (lambda t, j: t[:, j]) if side == "right" else (lambda t, j: t[j, :])
    assert torch.equal(column(moved, 0), column(moment, 2))     # index 9: old slot 2 -> new slot 0
    assert torch.equal(column(moved, 2), column(moment, 0))     # index 5: old slot 0 -> new slot 2
    assert torch.count_nonzero(column(moved, 1)) == 0            # index 7 is new
    assert torch.count_nonzero(column(moved, 3)) == 0            # index 1 is new
    overlap = _projector("l2").overlap(old, new, 10)
    assert float(overlap) == pytest.approx(0.5)


def test_slot_bias_correction_restarts_new_columns_and_carries_kept_ones():
    """Under transport with bias_correction="slot", a kept column keeps its count, a new one restarts."""
    from lowrank_optim import DCTProjAdam

    weight = torch.nn.Parameter(torch.zeros(16, 8))
    optimizer = DCTProjAdam([weight], rank=3, update_proj_gap=4, moments="transport", bias_correction="slot")
    basis = dct_matrix(8, torch.float32, torch.device("cpu"))
    for step in range(5):
        # energy in columns 0,1,2 for steps 0-3; then in 2, 5, 6 (2 is kept)
        columns = [0, 1, 2] if step < 4 else [2, 5, 6]
        weight.grad = sum((10.0 - c) * torch.outer(torch.ones(16), basis[:, c]) for c in columns)
        optimizer.step()
    state = optimizer.state[weight]
    assert state["proj_indices"].tolist() == [2, 5, 6]
    assert state["slot_steps"].tolist() == [5, 1, 1]
