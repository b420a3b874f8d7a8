"""The ``adam_atan2`` update rule (:mod:`lowrank_optim.rules.adam_atan2`), the smallest rule that
proves rules are plug-ins: against a float64 reference of projected Adam-atan2, with float and
8/4-bit moments, and through the optimizer's contract (resume, in-backward modes)."""
import pytest
import torch

from lowrank_optim import DCTProjAdam, GaLoreAdamW
from lowrank_optim.reference.dct_adamw import reference_dct_basis


def _reference_trajectory(weight, grads, indices, *, lr, betas, weight_decay):
    """Projected Adam-atan2 on the right side with a fixed ``P = C[:, idx]``, in float64."""
    w = weight.double().clone()
    basis = reference_dct_basis(w.shape[1])[:, indices]
    m = torch.zeros(w.shape[0], len(indices), dtype=torch.float64)
    v = torch.zeros_like(m)
    for t, grad in enumerate(grads, start=1):
        r = grad.double() @ basis
        m = betas[0] * m + (1 - betas[0]) * r
        v = betas[1] * v + (1 - betas[1]) * r * r
        n = torch.atan2(m / (1 - betas[0] ** t), (v / (1 - betas[1] ** t)).sqrt())
        w = w * (1 - lr * weight_decay) - lr * n @ basis.T
    return w


@pytest.mark.parametrize("moment_bits, tolerance", [(None, 1e-5), (8, 2e-2), (4, 0.2)])
def test_adam_atan2_follows_its_float64_reference(moment_bits, tolerance):
    """Float moments to fp32 rounding, 8-bit ones to their quantization error (measured 1.1e-2),
    4-bit ones to theirs (measured 0.16 with the square-root map of ``v``; the linear map gave 0.26:
    gradients four decades apart put most of ``v`` below its lowest level)."""
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(256, 64))
    start = weight.detach().clone()
    grads = [torch.randn(256, 64) * 10 ** (-k) for k in range(4)]     # atan2 is invariant to the scale
    optimizer = DCTProjAdam([{"params": [weight], "rank": 16}], lr=1e-2, weight_decay=0.1, update_rule="adam_atan2",
                            residual="none", update_proj_gap=100, moment_bits=moment_bits, moment_block_size=64)
    for grad in grads:
        weight.grad = grad.clone()
        optimizer.step()
    indices = optimizer.state[weight]["proj_indices"]
    expected = _reference_trajectory(start, grads, indices, lr=1e-2, betas=(0.9, 0.999), weight_decay=0.1)
    moved = expected - start.double()
    assert ("exp_avg_codes" in optimizer.state[weight]) == (moment_bits is not None)
    assert ((weight.double() - expected).norm() / moved.norm()).item() < tolerance


@pytest.mark.parametrize("moment_bits", [8, 4])
def test_adam_atan2_stores_the_moments_an_adamw_step_stores(moment_bits):
    """The moments do not depend on the weights: on the same gradients the two rules store the same
    codes and scales, so a 4-bit ``v`` is written with the fused step's stochastic rounding (rounded
    to nearest it stops following a slowly growing average: ``test_quantization_update.py``)."""
    torch.manual_seed(0)
    grads = [torch.randn(256, 64) * (1 + 0.01 * t) for t in range(5)]
    states = []
    for rule in ("adamw", "adam_atan2"):
        weight = torch.nn.Parameter(torch.randn(256, 64))
        optimizer = DCTProjAdam([{"params": [weight], "rank": 16}], lr=1e-2, update_rule=rule, residual="none",
                                update_proj_gap=100, moment_bits=moment_bits, moment_block_size=64)
        for grad in grads:
            weight.grad = grad.clone()
            optimizer.step()
        states.append(optimizer.state[weight])
    for key in ("exp_avg_codes", "exp_avg_scales", "exp_avg_sq_codes", "exp_avg_sq_scales"):
        assert torch.equal(states[0][key], states[1][key]), key


def test_adam_atan2_is_not_adamw():
    torch.manual_seed(0)
    weights = [torch.nn.Parameter(torch.randn(64, 32)) for _ in range(2)]
    for weight, rule in zip(weights, ("adamw", "adam_atan2")):
        optimizer = GaLoreAdamW([{"params": [weight], "rank": 8}], lr=1e-2, update_rule=rule)
        weight.grad = torch.full_like(weight, 1e-9)
        optimizer.step()
    assert not torch.allclose(weights[0], weights[1])


def test_an_unknown_rule_is_refused_by_name():
    with pytest.raises(ValueError, match=r"Invalid update_rule: 'lion' \(expected one of 'adamw', 'adam_atan2'"):
        DCTProjAdam([torch.nn.Parameter(torch.randn(8, 8))], update_rule="lion")
