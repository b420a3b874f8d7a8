"""The randomized SVD projector (GaLore 2) against the full SVD, and through GaLoreAdamW."""
import pytest
import torch
from support.toy import make_model, projected_groups, train

from lowrank_optim import GaLoreAdamW
from lowrank_optim.projectors import PROJECTORS


def _low_rank_plus_noise(m, n, rank, seed=0):
    generator = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, rank, generator=generator)).Q
    v = torch.linalg.qr(torch.randn(n, rank, generator=generator)).Q
    spectrum = torch.logspace(1, 0, rank)
    return u @ torch.diag(spectrum) @ v.T + 1e-3 * torch.randn(m, n, generator=generator), u, v


@pytest.mark.parametrize("side", ["left", "right"])
def test_the_subspace_matches_the_full_svd_on_a_decaying_spectrum(side):
    grad, u, v = _low_rank_plus_noise(70, 45, rank=6)
    randomized = PROJECTORS["randomized_svd"]({}).select(grad, 6, side)["matrix"]
    exact = PROJECTORS["svd"]({}).select(grad, 6, side)["matrix"]
    assert randomized.shape == exact.shape == ((70, 6) if side == "left" else (45, 6))
    torch.testing.assert_close(randomized.T @ randomized, torch.eye(6), atol=1e-5, rtol=0)
    # Same subspace: ‖P_rᵀ·P_exact‖²_F / r = 1 up to the noise floor (1e-3 against σ_r = 1).
    assert (randomized.T @ exact).square().sum() / 6 > 1 - 1e-4


def test_the_refresh_is_deterministic():
    grad, _, _ = _low_rank_plus_noise(40, 30, rank=4)
    first = PROJECTORS["randomized_svd"]({}).select(grad, 4, "right")["matrix"]
    assert torch.equal(first, PROJECTORS["randomized_svd"]({}).select(grad.clone(), 4, "right")["matrix"])


def test_galore_with_the_randomized_projector_trains_like_the_full_svd():
    losses = {}
    for projector in ("svd", "randomized_svd"):
        model = make_model(d=16, hidden=48)
        optimizer = GaLoreAdamW(projected_groups(model, 4, update_proj_gap=5), lr=1e-2, projector=projector)
        losses[projector] = train(model, optimizer, 30)
        assert optimizer.param_groups[0]["projector"] == projector
    assert losses["randomized_svd"][-1] < losses["randomized_svd"][0]
    assert abs(losses["randomized_svd"][-1] - losses["svd"][-1]) < 1e-3 * losses["svd"][-1]
