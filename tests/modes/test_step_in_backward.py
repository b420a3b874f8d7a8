"""``step_in_backward=True``: every parameter's step taken in its post-accumulate-grad hook, one
window of ``accumulation_steps`` backward passes per ``optimizer.step()``; what it equals, what it
frees, what it refuses."""
import copy
import pickle

import pytest
import torch
from support.toy import (
    batch,
    holds_full_gradient,
    make_model,
    max_rel_diff,
    next_token_loss,
    projected_groups,
    train_in_micro_batches,
)
from torch import nn

from lowrank_optim import DCTProjAdam, GaLoreAdamW
from lowrank_optim.gradient_stand_ins import ProjectedGradient, SteppedGradient

GAP = 3


def _dct(model, **kwargs):       # DCTProjAdam's defaults (scaled residual) but a small rank and gap
    return DCTProjAdam(model.named_parameters(), lr=3e-3, rank=4, update_proj_gap=GAP, weight_decay=0.01,
                       **kwargs)


def _dct_no_residual(model, **kwargs):
    return _dct(model, residual="none", **kwargs)


def _galore(model, **kwargs):
    return GaLoreAdamW(projected_groups(model, 4, update_proj_gap=GAP, scale=0.5), lr=3e-3, weight_decay=0.01,
                       **kwargs)


BUILDS = {"dct": _dct, "galore": _galore}


def _decay(optimizer):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 1.0 / (1 + t))


@pytest.mark.parametrize("name", list(BUILDS))
def test_one_backward_per_step_follows_the_standard_loop(name):
    """Accumulation 1: the standard refresh schedule (no stagger), the same updates, so the
    trajectory is the standard loop's: 10 steps, refreshes every 3, a scheduler, float64."""
    standard, in_backward = make_model(dtype=torch.float64), make_model(dtype=torch.float64)
    reference = BUILDS[name](standard)
    train_in_micro_batches(standard, reference, 10, 1, _decay(reference))
    optimizer = BUILDS[name](in_backward, step_in_backward=True)
    train_in_micro_batches(in_backward, optimizer, 10, 1, _decay(optimizer))
    assert max_rel_diff(in_backward, standard) < 1e-12
    assert optimizer.state_dict()["state"].keys() == reference.state_dict()["state"].keys()
    assert all(optimizer.state[p]["step"] == 10 for p in in_backward.parameters())


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-10), (torch.float32, 1e-6)])
@pytest.mark.parametrize("build", [_dct_no_residual, _galore])
def test_accumulation_equals_the_backward_projection_mode(build, dtype, tolerance):
    """Accumulation 3 in the hooks ≡ backward projection with accumulation 3 stepped in step()
    (exact accumulation, staggered refreshes) ≡ one backward on the whole batch in that mode."""
    hooks, deferred, whole = (make_model(dtype=dtype) for _ in range(3))
    train_in_micro_batches(hooks, build(hooks, step_in_backward=True, accumulation_steps=3), 10, 3)
    train_in_micro_batches(deferred, build(deferred, backward_projection=True), 10, 3)
    train_in_micro_batches(whole, build(whole, backward_projection=True), 10, 1)
    assert max_rel_diff(hooks, deferred) < tolerance
    assert max_rel_diff(hooks, whole) < tolerance


@pytest.mark.parametrize("name", list(BUILDS))
def test_nothing_is_left_after_backward(name):
    """After each backward pass that ends a window: no gradient, no accumulator, only the stepped
    stand-ins; the parameters already hold the step's values (step() only closes the window and
    clears the stand-ins)."""
    model = make_model()
    optimizer = BUILDS[name](model, step_in_backward=True)
    seen = []

    def check(model, optimizer):
        seen.append(all(isinstance(p.grad, SteppedGradient) for p in model.parameters()))

    before = [p.detach().clone() for p in model.parameters()]
    train_in_micro_batches(model, optimizer, 4, 1, after_backward=check)
    assert seen == [True] * 4
    assert all(p.grad is None for p in model.parameters())
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_inside_a_window_projected_weights_keep_only_accumulators():
    model = make_model()
    optimizer = _dct_no_residual(model, step_in_backward=True, accumulation_steps=2)
    train_in_micro_batches(model, optimizer, 1, 2)  # step 1 created the subspaces
    tokens = batch(1, size=(12, 10))
    next_token_loss(model, tokens[:6]).backward()
    projected = [p for p in model.parameters() if optimizer.plan_of(p).projected]
    assert projected and all(isinstance(p.grad, ProjectedGradient) for p in projected)
    assert all(holds_full_gradient(p) for p in model.parameters() if not optimizer.plan_of(p).projected)


def test_8bit_moments_follow_the_standard_loop():
    standard, in_backward = make_model(), make_model()
    train_in_micro_batches(standard, _dct(standard, moment_bits=8), 6, 1)
    train_in_micro_batches(in_backward, _dct(in_backward, moment_bits=8, step_in_backward=True), 6, 1)
    assert max_rel_diff(in_backward, standard) < 1e-6


def test_step_before_the_window_ends_is_an_error_and_changes_nothing():
    model = make_model()
    optimizer = _dct_no_residual(model, step_in_backward=True, accumulation_steps=3)
    next_token_loss(model, batch(0, size=(4, 10))).backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"after 1 of accumulation_steps=3 backward passes"):
        optimizer.step()
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert not optimizer.state


def test_a_backward_pass_after_the_step_without_step_is_an_error():
    model = make_model()
    _dct(model, step_in_backward=True)
    next_token_loss(model, batch(0)).backward()
    with pytest.raises(RuntimeError, match=r"before optimizer.step\(\)"):
        next_token_loss(model, batch(1)).backward()


def test_a_parameter_unused_in_a_micro_batch_steps_on_what_it_accumulated():
    """A parameter that misses a micro-batch of the window steps in step() on its summed gradient,
    as the standard loop would (its missing gradient is zero): projected weights and biases."""
    torch.manual_seed(0)
    modules = (nn.Linear(8, 8).double(), nn.Linear(8, 8).double())
    twins = copy.deepcopy(modules)
    inputs = torch.randn(2, 8, dtype=torch.float64)

    def window(modules, **kwargs):
        weights = [m.weight for m in modules]
        biases = [m.bias for m in modules]
        optimizer = DCTProjAdam([{"params": weights, "rank": 2}, {"params": biases, "rank": None}], lr=1e-2,
                                residual="none", **kwargs)
        for _ in range(2):                   # the second window has subspaces: accumulators are used
            first, second = modules
            first(inputs[:1]).square().sum().backward()
            (first(inputs[1:]) + second(inputs[1:])).square().sum().backward()
            optimizer.step()
            optimizer.zero_grad()

    window(modules, step_in_backward=True, accumulation_steps=2)
    window(twins)
    for a, b in zip([p for m in modules for p in m.parameters()], [p for m in twins for p in m.parameters()]):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)


def test_a_weight_whose_rule_reads_the_full_gradient_accumulates_it_through_the_window():
    """DCTProjAdam's scaled residual reads the step's full G: with accumulation 2 those weights are
    not projected in their hooks but accumulate G as plain parameters do, and step at the window's
    last backward pass exactly as the standard loop with the same (staggered) refreshes."""
    standard, in_backward = make_model(dtype=torch.float64), make_model(dtype=torch.float64)
    reference = _dct(standard)
    reference.stagger_refreshes(True)          # the schedule the mode uses with accumulation > 1
    train_in_micro_batches(standard, reference, 7, 2)
    optimizer = _dct(in_backward, step_in_backward=True, accumulation_steps=2)
    train_in_micro_batches(in_backward, optimizer, 7, 2)
    assert max_rel_diff(in_backward, standard) < 1e-12
    tokens = batch(1, size=(12, 10))
    next_token_loss(in_backward, tokens[:6]).backward()
    assert all(holds_full_gradient(p) for p in in_backward.parameters() if p.grad is not None)


@pytest.mark.parametrize("kwargs, message", [
    (dict(accumulation_steps=2), r"Invalid accumulation_steps: 2 \(only with step_in_backward=True"),
    (dict(step_in_backward=True, accumulation_steps=0), r"Invalid accumulation_steps: 0"),
    (dict(step_in_backward=True, accumulation_steps=2.0), r"Invalid accumulation_steps: 2.0"),
    (dict(step_in_backward="yes"), r"step_in_backward"),
    (dict(step_in_backward=True, skip_nonfinite=True), r"Invalid skip_nonfinite: True with step_in_backward"),
])
def test_refused_combinations_name_the_key(kwargs, message):
    with pytest.raises(ValueError, match=message):
        _dct(make_model(), **kwargs)


def test_copies_resume_and_stop(tmp_path):
    """deepcopy / pickle keep the mode and step like the original; a checkpoint resumes exactly;
    stop_backward_projection() returns to ordinary steps."""
    model = make_model(dtype=torch.float64)
    optimizer = _dct(model, step_in_backward=True)
    train_in_micro_batches(model, optimizer, 3, 1)
    saved = copy.deepcopy((model.state_dict(), optimizer.state_dict()))
    train_in_micro_batches(model, optimizer, 4, 1)

    resumed = make_model(dtype=torch.float64)
    resumed.load_state_dict(saved[0])
    again = _dct(resumed, step_in_backward=True)
    again.load_state_dict(saved[1])
    train_in_micro_batches(resumed, again, 4, 1)
    assert max_rel_diff(resumed, model) == 0.0

    clone_model, clone = pickle.loads(pickle.dumps((model, optimizer)))
    assert clone.step_in_backward and clone.accumulation_steps == 1
    train_in_micro_batches(clone_model, clone, 2, 1)
    train_in_micro_batches(model, optimizer, 2, 1)
    assert max_rel_diff(clone_model, model) == 0.0

    optimizer.stop_backward_projection()
    assert not optimizer.step_in_backward
    next_token_loss(model, batch(0)).backward()
    assert all(holds_full_gradient(p) for p in model.parameters())
    optimizer.step()


def test_maximize_in_the_hooks():
    minimized, maximized = make_model(dtype=torch.float64), make_model(dtype=torch.float64)
    train_in_micro_batches(minimized, _dct(minimized, step_in_backward=True), 4, 1)
    optimizer = _dct(maximized, step_in_backward=True, maximize=True)
    for step in range(4):
        (-next_token_loss(maximized, batch(step, size=(12, 10)))).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert max_rel_diff(maximized, minimized) < 1e-12


def test_a_param_group_added_later_is_refused_not_left_unstepped():
    model = make_model()
    optimizer = _dct(model, step_in_backward=True)
    extra = nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match=r"add_param_group after construction with step_in_backward=True"):
        optimizer.add_param_group({"params": [extra]})
    assert len(optimizer.param_groups) == 1
