"""The optimizer's per-parameter API (``plan_of``, ``refresh_due``, ``gradient_projection``,
``step_parameter``, ``stagger_refreshes``): what the in-backward modes are built on, from outside
the class. Stepping every parameter alone is the ordinary step, bit for bit."""
import pytest
import torch
from support.toy import loss_of, make_model, twin

from lowrank_optim import DCTProjAdam, GaLoreAdamW
from lowrank_optim.planning import ParameterPlan


def _optimizers(model):
    return {
        "dct": lambda m: DCTProjAdam(m.named_parameters(), lr=1e-2, rank=4, update_proj_gap=2, foreach=False),
        "galore": lambda m: GaLoreAdamW([{"params": [m.up.weight, m.down.weight], "rank": 4},
                                         {"params": [p for n, p in m.named_parameters()
                                                     if n not in ("up.weight", "down.weight")]}],
                                        lr=1e-2, update_proj_gap=2, foreach=False),
    }


@pytest.mark.parametrize("name", ["dct", "galore"])
def test_stepping_each_parameter_alone_is_the_ordinary_step(name):
    model = make_model()
    alone = twin(model)
    build = _optimizers(model)[name]
    ordinary, per_parameter = build(model), build(alone)     # foreach=False: plain steps one tensor at a time
    for step in range(5):                      # refreshes at steps 0, 2, 4
        for m, optimizer in ((model, ordinary), (alone, per_parameter)):
            optimizer.zero_grad()
            loss_of(m, step).backward()
        ordinary.step()
        for param in reversed(list(alone.parameters())):       # any order
            per_parameter.step_parameter(param)
    for a, b in zip(model.parameters(), alone.parameters()):
        assert torch.equal(a, b)


def test_the_plan_and_the_refresh_schedule_are_public():
    model = make_model()
    optimizer = DCTProjAdam(model.named_parameters(), rank=4, update_proj_gap=3)
    plan = optimizer.plan_of(model.up.weight)
    assert isinstance(plan, ParameterPlan) and plan.projected and plan.rank == 4 and plan.side == "right"
    assert not optimizer.plan_of(model.embed.weight).projected
    assert optimizer.refresh_due(model.up.weight)                 # no subspace yet
    assert optimizer.gradient_projection(model.up.weight) is None
    assert optimizer.gradient_projection(model.embed.weight) is None     # plain
    due = []
    for step in range(6):
        optimizer.zero_grad()
        loss_of(model, step).backward()
        due.append(optimizer.refresh_due(model.up.weight))
        optimizer.step()
    assert due == [True, False, False, True, False, False]


def test_gradient_projection_is_the_projection_into_the_current_subspace():
    model = make_model()
    optimizer = DCTProjAdam(model.named_parameters(), rank=4, update_proj_gap=10)
    loss_of(model, 0).backward()
    optimizer.step()
    grad = torch.randn_like(model.up.weight)
    plan = optimizer.plan_of(model.up.weight)
    expected = plan.projector.project(grad, {"indices": optimizer.state[model.up.weight]["proj_indices"]}, plan.side)
    assert torch.equal(optimizer.gradient_projection(model.up.weight)(grad), expected)


def test_staggered_refreshes_spread_the_phases_over_the_gap():
    model = make_model()
    optimizer = DCTProjAdam(model.named_parameters(), rank=4, update_proj_gap=4)
    projected = [p for p in model.parameters() if optimizer.plan_of(p).projected]
    assert [optimizer.plan_of(p).refresh_phase for p in projected] == [0, 0]
    optimizer.stagger_refreshes(True)
    assert [optimizer.plan_of(p).refresh_phase for p in projected] == [0, 2]
    optimizer.stagger_refreshes(False)
    assert [optimizer.plan_of(p).refresh_phase for p in projected] == [0, 0]
