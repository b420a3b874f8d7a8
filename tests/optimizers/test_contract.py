"""One contract for every optimizer build of ``tests/support/optim_db.py`` (each class in its main
configurations, alone and under the in-backward modes it allows): the same tests for all.

* a zero-gradient step at lr 0 moves nothing and creates the complete state (torchtitan's
  checkpointing builds the state that way and loads only the keys that exist after it);
* the state dict survives ``torch.load(weights_only=True)`` with every dtype, carries its format,
  loads again after a load, and another format is refused;
* resuming from a checkpoint taken before a refresh is bit-identical to the uninterrupted run;
* ``copy.deepcopy`` and ``pickle`` give an optimizer that continues the same trajectory;
* ``torch.compile(opt.step)`` equals eager;
* unknown param-group keys are refused by name; torch's keywords (SSTAdamW refuses them by name);
* ``maximize`` and ``projection_summary()``, for the builds with torch's keywords.
"""
import copy
import io
import pickle

import pytest
import torch
from support.optim_db import BUILDS, CASES, MODES, TORCH_KEYWORD_CASES, case_ids
from support.toy import batch, max_rel_diff, next_token_loss, values

from lowrank_optim.state_bytes import tensor_bytes
from lowrank_optim.state_io import STATE_FORMAT


def _build(name, mode, seed=0, **keywords):
    build = BUILDS[name]
    model = build.model(seed)
    return model, build.make(model, **MODES[mode], **keywords)


def _train(model, optimizer, steps, start=0, sign=1.0):
    for step in range(start, start + steps):
        (sign * next_token_loss(model, batch(step))).backward()
        optimizer.step()
        optimizer.zero_grad()


def _state_keys(optimizer, model):
    return [sorted(optimizer.state.get(p, {})) for p in model.parameters()]


def _saved(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _assert_same_state(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


@pytest.mark.parametrize("name, mode", CASES, ids=case_ids(CASES))
def test_a_zero_gradient_step_at_lr_0_moves_nothing_and_creates_the_complete_state(name, mode):
    model, optimizer = _build(name, mode)
    before = [values(p).clone() for p in model.parameters()]
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    for param in model.parameters():
        param.grad = torch.zeros_like(param)
    optimizer.step()
    assert all(torch.equal(values(p), q) for p, q in zip(model.parameters(), before))
    created = _state_keys(optimizer, model)

    trained_model, trained = _build(name, mode)
    _train(trained_model, trained, 4)                          # crosses a refresh (gap 3)
    assert created == _state_keys(trained, trained_model)


@pytest.mark.parametrize("name, mode", CASES, ids=case_ids(CASES))
def test_the_state_dict_survives_a_weights_only_load_with_its_dtypes(name, mode):
    model, optimizer = _build(name, mode)
    _train(model, optimizer, 2)
    original = optimizer.state_dict()
    loaded = _saved(original)
    fresh_model, fresh = _build(name, mode, seed=1)
    fresh.load_state_dict(loaded)
    restored = fresh.state_dict()
    assert original["state"].keys() == restored["state"].keys()
    for index in original["state"]:
        _assert_same_state(original["state"][index], restored["state"][index])


@pytest.mark.parametrize("name, mode", CASES, ids=case_ids(CASES))
def test_the_state_format_is_written_loaded_again_and_another_one_refused(name, mode):
    """This version loads what it saves, again after a load (torch's ``__setstate__`` adds keys to
    ``defaults`` but not to groups; the Trainer's resume loads twice) and without the key (as
    torch.distributed.checkpoint rebuilds a state dict); another format or a group lacking a key
    is refused by name."""
    model, optimizer = _build(name, mode)
    _train(model, optimizer, 2)
    saved = optimizer.state_dict()
    assert saved["state_format"] == STATE_FORMAT
    reloaded = _build(name, mode, seed=1)[1]
    reloaded.load_state_dict(saved)
    reloaded.load_state_dict(reloaded.state_dict())
    _build(name, mode, seed=1)[1].load_state_dict({k: v for k, v in saved.items() if k != "state_format"})
    with pytest.raises(ValueError, match=rf"Invalid state_dict: state_format {STATE_FORMAT + 1} \(this version of "
                                         rf"lowrank-optim loads format {STATE_FORMAT}"):
        _build(name, mode, seed=1)[1].load_state_dict({**saved, "state_format": STATE_FORMAT + 1})
    groups = [{k: v for k, v in group.items() if k != "eps"} for group in saved["param_groups"]]
    with pytest.raises(ValueError, match=r"param_groups\[0\] lacks 'eps'"):
        _build(name, mode, seed=1)[1].load_state_dict({**saved, "param_groups": groups})


@pytest.mark.parametrize("name, mode", CASES, ids=case_ids(CASES))
def test_resume_across_a_refresh_is_bit_identical(name, mode):
    model, optimizer = _build(name, mode)
    _train(model, optimizer, 2)
    checkpoint = _saved({"model": model.state_dict(), "optimizer": optimizer.state_dict()})
    _train(model, optimizer, 4, start=2)                       # refresh at step 4

    resumed_model, resumed = _build(name, mode, seed=1)
    resumed_model.load_state_dict(checkpoint["model"])
    resumed.load_state_dict(checkpoint["optimizer"])
    _train(resumed_model, resumed, 4, start=2)
    assert max_rel_diff(resumed_model, model) == 0.0


@pytest.mark.parametrize("copier", [copy.deepcopy, lambda pair: pickle.loads(pickle.dumps(pair))],
                         ids=["deepcopy", "pickle"])
@pytest.mark.parametrize("name, mode", CASES, ids=case_ids(CASES))
def test_a_copy_continues_the_same_trajectory(name, mode, copier):
    model, optimizer = _build(name, mode)
    _train(model, optimizer, 2)
    copied_model, copied = copier((model, optimizer))
    _train(model, optimizer, 4, start=2)
    _train(copied_model, copied, 4, start=2)
    assert max_rel_diff(copied_model, model) == 0.0


@pytest.mark.parametrize("name, mode", CASES, ids=case_ids(CASES))
def test_a_compiled_step_equals_the_eager_one(name, mode):
    eager_model, eager = _build(name, mode)
    compiled_model, compiled = _build(name, mode)
    step = torch.compile(compiled.step)
    _train(eager_model, eager, 5)
    for index in range(5):
        next_token_loss(compiled_model, batch(index)).backward()
        step()
        compiled.zero_grad()
    assert max_rel_diff(compiled_model, eager_model) == 0.0


@pytest.mark.parametrize("name, mode", CASES, ids=case_ids(CASES))
def test_unknown_group_keys_are_refused_by_name(name, mode):
    model, optimizer = _build(name, mode)
    extra = {"params": [torch.nn.Parameter(torch.zeros(3))], "update_proj_gapp": 50}
    with pytest.raises(ValueError, match=r"update_proj_gapp"):
        optimizer.add_param_group(extra)
    assert all(extra["params"][0] is not p for group in optimizer.param_groups for p in group["params"])


@pytest.mark.parametrize("name, mode", CASES, ids=case_ids(CASES))
def test_torch_keywords(name, mode):
    if not BUILDS[name].torch_keywords:
        with pytest.raises(TypeError, match=r"maximize"):
            _build(name, mode, maximize=False)
        return
    with pytest.raises(ValueError, match=r"Invalid fused: True"):
        _build(name, mode, fused=True)
    _, optimizer = _build(name, mode, foreach=False, fused=False, capturable=False, differentiable=False)
    group = optimizer.param_groups[0]
    assert (group["foreach"], group["fused"], group["capturable"], group["differentiable"]) == (
        False, False, False, False)


@pytest.mark.parametrize("name, mode", TORCH_KEYWORD_CASES, ids=case_ids(TORCH_KEYWORD_CASES))
def test_maximize_ascends_as_descending_the_negation(name, mode):
    up_model, up = _build(name, mode, maximize=True)
    down_model, down = _build(name, mode)
    _train(up_model, up, 4, sign=-1.0)
    _train(down_model, down, 4)
    assert max_rel_diff(up_model, down_model) == 0.0


@pytest.mark.parametrize("name, mode", TORCH_KEYWORD_CASES, ids=case_ids(TORCH_KEYWORD_CASES))
def test_the_projection_summary_reports_the_state_held(name, mode):
    model, optimizer = _build(name, mode)
    expected = [row.state_bytes for row in optimizer.projection_summary()]
    _train(model, optimizer, 1)
    rows = optimizer.projection_summary()
    params = [p for group in optimizer.param_groups for p in group["params"]]      # the summary's order
    assert [row.state_bytes for row in rows] == [tensor_bytes(optimizer.state[p]) for p in params]
    assert [row.state_bytes for row in rows] == expected           # the forecast before the first step
    assert any(row.projected for row in rows) and any(not row.projected for row in rows)
    assert str(rows).count("\n") >= len(rows)
