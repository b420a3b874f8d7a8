"""Fast optimizers against the slow paper-faithful references, 100 steps with refreshes."""
import pytest
import torch
from support.toy import make_model, max_rel_diff, projected_groups, train, twin

from lowrank_optim import DCTProjAdam, GaLoreAdamW
from lowrank_optim.reference import ReferenceDCTAdamW, ReferenceGaLoreAdamW

# float32 on both sides, different operation order: on refresh steps the fast path takes R from the
# FFT coefficients (scipy, float32) where the reference multiplies by the basis, and the Adam update
# is fused. Rounding differences grow over 100 steps of lr 3e-3 (most with per-slot bias correction,
# whose fresh slots take large first steps) but stay far below any real divergence (~1e-1).
TOLERANCE = 5e-4
STEPS = 100


@pytest.mark.parametrize("moments", ["keep", "reset", "transport"])
@pytest.mark.parametrize("score", ["l1", "l2"])
@pytest.mark.parametrize("proj_side", ["auto", "reverse_std", "left", "right"])
@pytest.mark.parametrize("bias_correction", ["step", "slot"])
def test_dct_matches_reference(moments, score, proj_side, bias_correction):
    fast_model = make_model()
    slow_model = twin(fast_model)
    settings = dict(update_proj_gap=7, scale=0.5, score=score, moments=moments, proj_side=proj_side,
                    bias_correction=bias_correction, residual="none")
    fast_groups = projected_groups(fast_model, 5, plain_group_keys={"rank": None})
    fast = DCTProjAdam(fast_groups, lr=3e-3, weight_decay=0.01, **settings)
    slow = ReferenceDCTAdamW(projected_groups(slow_model, 5), lr=3e-3, weight_decay=0.01, **settings)
    train(fast_model, fast, STEPS)
    train(slow_model, slow, STEPS)
    assert max_rel_diff(fast_model, slow_model) < TOLERANCE
    for p, q in zip(fast_model.parameters(), slow_model.parameters()):
        if "indices" in slow.state[q]:
            assert torch.equal(fast.state[p]["proj_indices"], slow.state[q]["indices"])


@pytest.mark.parametrize("proj_side", ["left", "right"])
@pytest.mark.parametrize("moments", ["keep", "transport"])
def test_dct_scaled_residual_matches_reference(proj_side, moments):
    fast_model = make_model()
    slow_model = twin(fast_model)
    settings = dict(update_proj_gap=7, scale=0.5, moments=moments, proj_side=proj_side, residual="scaled")
    fast_groups = projected_groups(fast_model, 5, plain_group_keys={"rank": None})
    fast = DCTProjAdam(fast_groups, lr=3e-3, weight_decay=0.01, **settings)
    slow = ReferenceDCTAdamW(projected_groups(slow_model, 5), lr=3e-3, weight_decay=0.01, **settings)
    train(fast_model, fast, STEPS)
    train(slow_model, slow, STEPS)
    assert max_rel_diff(fast_model, slow_model) < TOLERANCE
    limited = [float(fast.state[p]["residual_norm"]) for p in (fast_model.up.weight, fast_model.down.weight)]
    assert limited == pytest.approx([slow.state[q]["residual_norm"] for q in (slow_model.up.weight,
                                                                              slow_model.down.weight)], rel=1e-3)


@pytest.mark.parametrize("moments", ["keep", "reset", "transport"])
@pytest.mark.parametrize("proj_type", ["std", "reverse_std"])
def test_galore_matches_reference(moments, proj_type):
    fast_model = make_model()
    slow_model = twin(fast_model)
    settings = dict(update_proj_gap=7, scale=0.25, proj_type=proj_type, moments=moments)
    fast = GaLoreAdamW(projected_groups(fast_model, 5, **settings), lr=3e-3, weight_decay=0.01)
    slow = ReferenceGaLoreAdamW(projected_groups(slow_model, 5), lr=3e-3, weight_decay=0.01, **settings)
    train(fast_model, fast, STEPS)
    train(slow_model, slow, STEPS)
    assert max_rel_diff(fast_model, slow_model) < TOLERANCE


def test_plain_parameters_match_torch_adamw():
    """DCTProjAdam with nothing projected is torch.optim.AdamW (foreach path)."""
    ours_model = make_model()
    torch_model = twin(ours_model)
    ours = DCTProjAdam(ours_model.parameters(), lr=3e-3, weight_decay=0.1, rank=None)
    reference = torch.optim.AdamW(torch_model.parameters(), lr=3e-3, weight_decay=0.1, foreach=False)
    train(ours_model, ours, 50)
    train(torch_model, reference, 50)
    assert max_rel_diff(ours_model, torch_model) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_scaled_residual_runs_in_every_float_dtype(dtype):
    """float64 weights keep float64 norms; bf16 weights get fp32 norms and move."""
    model = make_model(dtype=dtype)
    before = model.up.weight.detach().clone()
    optimizer = DCTProjAdam(projected_groups(model, 5, plain_group_keys={"rank": None}), residual="scaled")
    train(model, optimizer, 3)
    assert torch.isfinite(model.up.weight).all() and not torch.equal(model.up.weight, before)
    assert optimizer.state[model.up.weight]["residual_norm"].dtype == torch.promote_types(dtype, torch.float32)
