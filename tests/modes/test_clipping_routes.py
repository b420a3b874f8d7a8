"""Clipping under the in-backward modes, whichever way it is reached: never a silent norm that
leaves the projected weights out.

Under ``backward_projection=True`` every route clips by the norm the optimizer uses (projected
accumulators, refreshing and plain gradients), exactly as ``lowrank_optim.clip_grad_norm_`` does;
under ``step_in_backward=True`` every route that would clip raises, and a norm for the logs is the
norm of what the steps used."""
import math

import pytest
import torch
import torch.distributed as dist
from support.toy import batch, make_model, next_token_loss, train_in_micro_batches
from torch.nn.utils import clip_grad_norm_ as clip_taken_before_any_optimizer

import lowrank_optim
from lowrank_optim import DCTProjAdam
from lowrank_optim.gradient_stand_ins import ProjectedGradient

GAP = 3


def _dct(model, **kwargs):
    return DCTProjAdam(model.named_parameters(), lr=3e-3, rank=4, update_proj_gap=GAP, residual="none",
                       weight_decay=0.01, **kwargs)


def _module_attribute(model, max_norm):
    return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)


def _reference_taken_before(model, max_norm):
    return clip_taken_before_any_optimizer(model.parameters(), max_norm)


def _reference_taken_after(model, max_norm):
    from torch.nn.utils.clip_grad import clip_grad_norm_
    return clip_grad_norm_(model.parameters(), max_norm)


def _foreach_forced(model, max_norm):
    return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm, foreach=True)


def _total_norm_then_clip(model, max_norm):
    from torch.nn.utils import clip_grads_with_norm_, get_total_norm
    parameters = list(model.parameters())
    total = get_total_norm([p.grad for p in parameters if p.grad is not None])
    clip_grads_with_norm_(parameters, max_norm, total)
    return total


def _accelerate(model, max_norm):
    from accelerate import Accelerator
    return Accelerator(cpu=True).clip_grad_norm_(model.parameters(), max_norm)


ROUTES = {"torch.nn.utils.clip_grad_norm_": _module_attribute, "imported before": _reference_taken_before,
          "imported after": _reference_taken_after, "foreach=True": _foreach_forced,
          "get_total_norm + clip_grads_with_norm_": _total_norm_then_clip, "accelerate": _accelerate}


def _after_backward(model, optimizer, step=5):
    train_in_micro_batches(model, optimizer, 2, 1)          # past the first step: the subspaces exist
    for part in batch(step, size=(12, 10)).chunk(2):          # two micro-batches into the accumulators
        next_token_loss(model, part).backward()


@pytest.mark.parametrize("route", list(ROUTES))
def test_backward_projection_clips_by_the_norm_the_optimizer_uses(route):
    model, twin = make_model(dtype=torch.float64), make_model(dtype=torch.float64)
    optimizer, reference = _dct(model, backward_projection=True), _dct(twin, backward_projection=True)
    _after_backward(model, optimizer)
    _after_backward(twin, reference)
    assert any(isinstance(p.grad, ProjectedGradient) for p in model.parameters())
    used = [t.clone() for t in optimizer.gradients_in_use()]
    plain_only = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()
                                                if not isinstance(p.grad, ProjectedGradient)])
    expected = lowrank_optim.clip_grad_norm_(reference, 0.5)

    total = ROUTES[route](model, 0.5)
    torch.testing.assert_close(total, expected)
    assert float(total) > float(plain_only) * (1 + 1e-3)       # the accumulators are inside the norm
    ratio = 0.5 / (float(expected) + 1e-6)
    assert ratio < 1
    for before, after in zip(used, optimizer.gradients_in_use()):
        torch.testing.assert_close(after, before * ratio)
    optimizer.step()
    reference.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("route", list(ROUTES))
def test_step_in_backward_refuses_every_clipping_route(route):
    model = make_model()
    _dct(model, step_in_backward=True)
    next_token_loss(model, batch(0)).backward()
    with pytest.raises(RuntimeError, match=r"already took its step inside the backward pass \(step_in_backward=True\)"):
        ROUTES[route](model, 1.0)


def test_step_in_backward_refuses_the_library_clip_too():
    model = make_model()
    optimizer = _dct(model, step_in_backward=True)
    next_token_loss(model, batch(0)).backward()
    with pytest.raises(RuntimeError, match=r"step_in_backward=True"):
        lowrank_optim.clip_grad_norm_(optimizer, 1.0)


def test_step_in_backward_logs_the_norm_the_steps_used():
    """A norm for the logs (accelerate with ``max_norm=inf``, as Hugging Face Trainer asks at every
    step) is the norm of the gradients the hooks stepped with: with one backward pass per step,
    the full gradients of the standard loop, which the mode follows exactly."""
    model, standard = make_model(dtype=torch.float64), make_model(dtype=torch.float64)
    in_backward = DCTProjAdam(model.named_parameters(), lr=3e-3, rank=4, update_proj_gap=GAP, step_in_backward=True)
    plain = DCTProjAdam(standard.named_parameters(), lr=3e-3, rank=4, update_proj_gap=GAP)
    for step in range(4):
        next_token_loss(model, batch(step)).backward()
        next_token_loss(standard, batch(step)).backward()
        logged = _accelerate(model, math.inf)
        torch.testing.assert_close(logged, torch.nn.utils.get_total_norm([p.grad for p in standard.parameters()]))
        in_backward.step()
        plain.step()
        in_backward.zero_grad()
        plain.zero_grad()
    with pytest.raises(RuntimeError, match=r"only the 2-norm was recorded"):
        next_token_loss(model, batch(0)).backward()
        torch.nn.utils.get_total_norm([p.grad for p in model.parameters()], norm_type=1.0)


def test_the_stand_ins_leave_at_step_and_refuse_other_operations():
    model = make_model()
    optimizer = _dct(model, backward_projection=True)
    _after_backward(model, optimizer)
    with pytest.raises(RuntimeError, match=r"up\.weight.*projected in the backward pass.*aten\.clone"):
        model.up.weight.grad.clone()
    with pytest.raises(RuntimeError, match=r"up\.weight.*projected in the backward pass.*aten\.add"):
        torch.zeros_like(model.up.weight).add_(model.up.weight.grad)
    optimizer.step()
    assert all(not isinstance(p.grad, ProjectedGradient) for p in model.parameters())


def test_zeroing_keeps_accumulating_from_zero():
    """``zero_grad(set_to_none=False)`` zeroes the accumulators in place: the next window starts
    from zero, as a full gradient would."""
    model, twin = make_model(dtype=torch.float64), make_model(dtype=torch.float64)
    optimizer, reference = _dct(model, backward_projection=True), _dct(twin, backward_projection=True)
    _after_backward(model, optimizer)
    _after_backward(twin, reference)
    model.zero_grad(set_to_none=False)
    reference.zero_grad()
    assert isinstance(model.up.weight.grad, ProjectedGradient)
    for network in (model, twin):
        next_token_loss(network, batch(7)).backward()
    optimizer.step()
    reference.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_with_a_process_group_torch_clipping_is_refused_and_the_library_clip_works(tmp_path):
    """The optimizer averages the accumulators across ranks inside step(): a norm taken before
    would be this rank's alone, so it is refused by name; lowrank_optim.clip_grad_norm_ averages first."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
    try:
        model = make_model()
        optimizer = _dct(model, backward_projection=True, process_group=dist.group.WORLD)
        _after_backward(model, optimizer)
        with pytest.raises(RuntimeError, match=r"process_group.*lowrank_optim\.clip_grad_norm_\(optimizer, max_norm\)"):
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        assert float(lowrank_optim.clip_grad_norm_(optimizer, 1.0)) > 0
        optimizer.step()
    finally:
        dist.destroy_process_group()
