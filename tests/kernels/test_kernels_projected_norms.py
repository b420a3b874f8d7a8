"""``R`` and the channel norms of ``G`` in one pass (:mod:`lowrank_optim.kernels.projected_norms`):
against float64 with blocks smaller than ``G`` (several full blocks and a short last one), dense
and column-subset ``P``; the optimizer with blocks agrees with itself without them."""
import pytest
import torch
from support.apollo_cases import apollo_params, set_apollo_gradients

from lowrank_optim import APOLLOAdamW, APOLLOMini
from lowrank_optim.kernels import projected_norms

SHAPES = [(37, 53), (53, 37), (5, 3)]        # odd sizes: a short last block; (5, 3) fits one block


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 4 rows of fp32 ``G`` with 53 columns (a few hundred bytes): several per matrix."""
    monkeypatch.setattr(projected_norms, "BLOCK_BYTES", 4 * 53 * 4)


@pytest.mark.parametrize("indexed", [False, True], ids=["dense", "columns"])
@pytest.mark.parametrize("norm_side", ["side", None], ids=["channel", "tensor"])
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("shape", SHAPES)
def test_blocks_match_float64(small_blocks, shape, side, norm_side, indexed):
    generator = torch.Generator().manual_seed(3)
    grad = torch.randn(shape, generator=generator)
    size = shape[1] if side == "right" else shape[0]
    basis = torch.randn(size, 6, generator=generator)
    indices = torch.tensor([4, 0, 2]) if indexed else None
    norm_side = side if norm_side == "side" else None
    low_rank, squares = projected_norms.project_with_squared_norms(grad, basis, indices, side, norm_side)
    p = (basis if indices is None else basis[:, indices]).double()
    expected_low_rank = grad.double() @ p if side == "right" else p.T @ grad.double()
    expected_squares = grad.double().square()
    expected_squares = (expected_squares.sum() if norm_side is None
                        else expected_squares.sum(dim=1 if side == "right" else 0))
    assert low_rank.dtype == grad.dtype and squares.dtype == torch.float32
    # fp32 sums of ≤ 53 terms of order 1, in blocks or not: relative error ≲ 53·2^-24 ≈ 3e-6.
    torch.testing.assert_close(low_rank.double(), expected_low_rank, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(squares.double(), expected_squares, rtol=1e-5, atol=0)


def test_norm_side_other_than_the_projection_side_is_refused():
    with pytest.raises(ValueError, match=r"Invalid norm_side: 'left' \(expected the projection's side 'right'"):
        projected_norms.project_with_squared_norms(torch.randn(4, 4), torch.randn(4, 1), None, "right", "left")


@pytest.mark.parametrize("optimizer", [APOLLOAdamW, APOLLOMini])
def test_the_optimizer_in_blocks_agrees_with_one_block(monkeypatch, optimizer):
    """Blocks of one row (float64 rows of 10–24 values), across refreshes (gap 3)."""
    unblocked, blocked = apollo_params(), apollo_params()
    for params, block_bytes in ((unblocked, projected_norms.BLOCK_BYTES), (blocked, 64)):
        monkeypatch.setattr(projected_norms, "BLOCK_BYTES", block_bytes)
        rank = 2 if optimizer is APOLLOAdamW else 1
        opt = optimizer([dict(params=params[:3], rank=rank, update_proj_gap=3), dict(params=params[3:])],
                        lr=1e-2, weight_decay=0.1)
        for step in range(7):
            set_apollo_gradients(params, step)
            opt.step()
    for a, b in zip(blocked, unblocked):
        # float64, the left side's sums associated by block: a few ulps per step
        assert (a - b).abs().max() / b.abs().max() < 1e-12
