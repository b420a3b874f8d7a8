"""Optimizer state: DCT holds exactly the moments plus r int64 indices per projected weight."""
import pytest
import torch

from lowrank_optim import DCTProjAdam, GaLoreAdamW, optimizer_state_bytes


def _state_after_one_step(make, shape=(64, 16)):
    weight = torch.nn.Parameter(torch.randn(shape))
    optimizer = make([weight])
    weight.grad = torch.randn(shape)
    optimizer.step()
    return optimizer, optimizer.state[weight]


def test_dct_state_is_moments_plus_indices():
    rank = 4
    optimizer, state = _state_after_one_step(lambda p: DCTProjAdam(p, rank=rank, residual="none"))
    assert set(state) == {"step", "exp_avg", "exp_avg_sq", "proj_indices"}
    assert state["proj_indices"].shape == (rank,) and state["proj_indices"].dtype == torch.int64
    assert optimizer_state_bytes(optimizer) == 2 * 64 * rank * 4 + rank * 8


def test_dct_default_residual_adds_one_scalar():
    rank = 4
    optimizer, state = _state_after_one_step(lambda p: DCTProjAdam(p, rank=rank))
    assert set(state) == {"step", "exp_avg", "exp_avg_sq", "proj_indices", "residual_norm"}
    assert optimizer_state_bytes(optimizer) == 2 * 64 * rank * 4 + rank * 8 + 4


def test_galore_state_adds_the_projection_matrix():
    rank = 4
    optimizer, state = _state_after_one_step(lambda p: GaLoreAdamW([{"params": p, "rank": rank}]))
    assert set(state) == {"step", "exp_avg", "exp_avg_sq", "proj_matrix"}
    assert optimizer_state_bytes(optimizer) == 2 * 64 * rank * 4 + 16 * rank * 4


def test_tensor_subclass_state_counts_its_inner_tensors():
    """torchao keeps 8-bit moments in a wrapper tensor subclass without storage of its own: the
    count is its inner tensors (codes, block scales, the shared map), plus the step."""
    optim = pytest.importorskip("torchao.optim")
    weight = torch.nn.Parameter(torch.randn(1024, 1024))
    weight.grad = torch.randn_like(weight)
    optimizer = optim.AdamW8bit([weight])
    optimizer.step()
    moment = optimizer.state[weight]["exp_avg"]
    inner = sum(getattr(moment, name).untyped_storage().nbytes() for name in moment.__tensor_flatten__()[0])
    assert inner == 1024 * 1024 + (1024 * 1024 // 256) * 4 + 256 * 4       # codes, fp32 scales, qmap
    step = optimizer.state[weight]["step"]
    assert optimizer_state_bytes(optimizer) == 2 * inner + step.untyped_storage().nbytes()
