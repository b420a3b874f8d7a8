"""``backward_projection=True``: gradients projected inside the backward pass, exact accumulation,
staggered refreshes, clipping by what the optimizer uses, one clock, refusals."""
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
    twin,
)
from torch import nn

from lowrank_optim import DCTProjAdam, GaLoreAdamW, clip_grad_norm_
from lowrank_optim.gradient_stand_ins import ProjectedGradient

GAP = 3


def _dct(model, **kwargs):
    return DCTProjAdam(model.named_parameters(), lr=3e-3, rank=4, update_proj_gap=GAP, residual="none",
                       weight_decay=0.01, **kwargs)


def _galore(model, **kwargs):
    return GaLoreAdamW(projected_groups(model, 4, update_proj_gap=GAP, scale=0.5), lr=3e-3, weight_decay=0.01,
                       **kwargs)


BUILDS = {"dct": _dct, "galore": _galore}


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-10), (torch.float32, 1e-6)])
@pytest.mark.parametrize("name", list(BUILDS))
def test_accumulation_equals_one_step_on_the_whole_batch(name, dtype, tolerance):
    """10 steps across staggered refreshes (gap 3): accumulation 3 and 2 against one micro-batch."""
    whole, split_three, split_two = (make_model(dtype=dtype) for _ in range(3))
    train_in_micro_batches(whole, BUILDS[name](whole, backward_projection=True), 10, 1)
    for model, k in ((split_three, 3), (split_two, 2)):
        train_in_micro_batches(model, BUILDS[name](model, backward_projection=True), 10, k)
        assert max_rel_diff(model, whole) < tolerance


@pytest.mark.parametrize("name", list(BUILDS))
def test_one_projected_weight_follows_the_standard_loop_exactly(name):
    """With one projected weight the staggered schedule is the standard one (offset 0): the mode
    changes where R is computed, not the trajectory."""
    def build(model, **kwargs):
        weights = [model.up.weight]
        rest = [p for p in model.parameters() if p is not model.up.weight]
        groups = [{"params": weights, "rank": 4}, {"params": rest, "rank": None}]
        cls = DCTProjAdam if name == "dct" else GaLoreAdamW
        extra = {"residual": "none"} if name == "dct" else {}
        return cls(groups, lr=3e-3, update_proj_gap=GAP, **extra, **kwargs)

    standard, mode = make_model(dtype=torch.float64), make_model(dtype=torch.float64)
    train_in_micro_batches(standard, build(standard), 8, 2)
    train_in_micro_batches(mode, build(mode, backward_projection=True), 8, 2)
    assert max_rel_diff(mode, standard) < 1e-12


@pytest.mark.parametrize("name", list(BUILDS))
def test_full_gradients_are_freed_and_refreshes_are_staggered(name):
    model = make_model()
    optimizer = BUILDS[name](model, backward_projection=True)
    projected = {"up.weight", "down.weight"}
    full_per_step = []
    for step in range(7):
        next_token_loss(model, batch(step)).backward()
        names = {n for n, p in model.named_parameters() if holds_full_gradient(p)}
        full_per_step.append(len(projected & names))
        assert names >= {n for n, _ in model.named_parameters()} - projected      # plain gradients stay
        optimizer.step()
        optimizer.zero_grad()
    # step 1: no subspace yet (both full); then at most ⌈2/3⌉ = 1 refreshing weight per step
    assert full_per_step[0] == 2 and max(full_per_step[1:]) == 1 and min(full_per_step[1:]) == 0


@pytest.mark.parametrize("name", list(BUILDS))
def test_one_clock_whatever_the_accumulation(name):
    model = make_model()
    optimizer = BUILDS[name](model, backward_projection=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    _run_with_scheduler = 5
    for step in range(_run_with_scheduler):
        for part in batch(step, size=(12, 10)).chunk(4):
            next_token_loss(model, part).backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    assert {state["step"] for state in optimizer.state.values()} == {5}
    assert optimizer.param_groups[0]["lr"] == pytest.approx(3e-3 / 6)


@pytest.mark.parametrize("name", list(BUILDS))
def test_clipping_uses_the_projected_gradients(name):
    """clip_grad_norm_ scales what the step reads: the accumulators and the plain gradients;
    the norm it returns is theirs, computed with no second backward."""
    model = make_model()
    optimizer = BUILDS[name](model, backward_projection=True)
    train_in_micro_batches(model, optimizer, 2, 1)  # past the first step: subspaces exist
    next_token_loss(model, batch(5)).backward()
    used = [t.clone() for t in optimizer.gradients_in_use()]
    assert len(used) == len(list(model.parameters()))
    expected = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in used]))
    total = clip_grad_norm_(optimizer, 0.1 * float(expected))
    torch.testing.assert_close(total, expected)
    clipped = optimizer.gradients_in_use()
    ratio = 0.1 * float(expected) / (float(expected) + 1e-6)
    for before, after in zip(used, clipped):
        torch.testing.assert_close(after, before * ratio)


def test_outside_the_mode_the_library_clip_is_torchs():
    model, reference = make_model(), make_model()
    optimizer = _dct(model)
    next_token_loss(model, batch(0)).backward()
    next_token_loss(reference, batch(0)).backward()
    torch.testing.assert_close(clip_grad_norm_(optimizer, 0.5), torch.nn.utils.clip_grad_norm_(
        reference.parameters(), 0.5))
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad)


def test_zero_grad_drops_the_accumulated_projections():
    model = make_model()
    optimizer = _dct(model, backward_projection=True)
    train_in_micro_batches(model, optimizer, 2, 1)
    next_token_loss(model, batch(3)).backward()
    assert optimizer.gradients_in_use() and any(isinstance(p.grad, ProjectedGradient) for p in model.parameters())
    optimizer.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.step()                                              # no gradient at all: nothing moves
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_resume_and_copies_keep_the_mode(tmp_path):
    model = make_model()
    optimizer = _dct(model, backward_projection=True)
    train_in_micro_batches(model, optimizer, 4, 2)
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, tmp_path / "ckpt.pt")
    copied_model, copied = pickle.loads(pickle.dumps((model, optimizer)))
    deep_model, deep = copy.deepcopy((model, optimizer))
    train_in_micro_batches(model, optimizer, 5, 2)

    restored_model = make_model(seed=9)
    restored = _dct(restored_model, backward_projection=True)
    checkpoint = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    restored_model.load_state_dict(checkpoint["model"])
    restored.load_state_dict(checkpoint["optimizer"])
    for other_model, other in ((restored_model, restored), (copied_model, copied), (deep_model, deep)):
        train_in_micro_batches(other_model, other, 5, 2)
        assert max_rel_diff(other_model, model) == 0.0
        next_token_loss(other_model, batch(0)).backward()                   # the copy's own parameters are hooked:
        projected = {isinstance(other_model.up.weight.grad, ProjectedGradient),
                     isinstance(other_model.down.weight.grad, ProjectedGradient)}
        assert projected == {True, False}                          # one projected, one refreshing (step 10)
        other.zero_grad()


@pytest.mark.parametrize("kwargs, message", [
    ({"residual": "scaled"}, r"residual='scaled' needs each step's full gradient"),
    ({"process_group": object(), "backward_projection": False}, r"Invalid process_group"),
])
def test_refused_combinations_name_the_key(kwargs, message):
    model = make_model()
    with pytest.raises(ValueError, match=message):
        DCTProjAdam(model.named_parameters(), rank=4, **{"backward_projection": True, **kwargs})


def test_maximize_in_the_mode():
    up, down = make_model(dtype=torch.float64), make_model(dtype=torch.float64)
    ascend, descend = _dct(up, backward_projection=True, maximize=True), _dct(down, backward_projection=True)
    for step in range(5):
        (-next_token_loss(up, batch(step))).backward()
        ascend.step()
        ascend.zero_grad()
        next_token_loss(down, batch(step)).backward()
        descend.step()
        descend.zero_grad()
    assert max_rel_diff(up, down) == 0.0


def test_fsdp2_parameters_are_refused_without_step_in_backward(tmp_path):
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
    try:
        layer = fully_shard(nn.Linear(64, 128))
        with pytest.raises(ValueError, match=r"backward_projection=True without step_in_backward is not supported with "
                           r"FSDP2-sharded parameters: FSDP2 reduce-scatters the full unsharded gradient"):
            DCTProjAdam(layer.named_parameters(), rank=8, residual="none", backward_projection=True)
    finally:
        dist.destroy_process_group()


def test_twin_models_do_not_share_hooks():
    model = make_model()
    other = twin(model)
    _dct(model, backward_projection=True)
    next_token_loss(other, batch(0)).backward()
    assert holds_full_gradient(other.up.weight)


def test_a_second_optimizer_on_hooked_parameters_is_refused_until_the_first_stops():
    model = make_model()
    first = _dct(model, backward_projection=True)
    refused = r"up\.weight.*already projected in the backward pass.*stop_backward_projection"
    with pytest.raises(ValueError, match=refused):
        _dct(model, backward_projection=True)
    first.stop_backward_projection()
    next_token_loss(model, batch(0)).backward()
    assert holds_full_gradient(model.up.weight)                   # full gradients again
    model.zero_grad()
    _dct(model, backward_projection=True)
