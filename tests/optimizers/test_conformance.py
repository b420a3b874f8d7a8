"""The torch.optim contract, as PyTorch's generic optimizer suite holds a drop-in to it: copies and
pickles that step, torch's common keywords, exact param-group keys, docstrings, warnings.

Each test here failed on the pre-v2 engine (defects 1, 4, 5, 7 and 8 of the engine-v2 issue)."""
import copy
import io
import pickle
import warnings

import pytest
import torch
from support.toy import loss_of, make_model, max_rel_diff, projected_groups, train, twin

from lowrank_optim import DCTProjAdam, GaLoreAdamW, SSTAdamW
from lowrank_optim.engine import ProjectedAdamW


def _dct(params, **kwargs):
    return DCTProjAdam(params, lr=3e-3, rank=0.5, update_proj_gap=3, **kwargs)


def _galore_groups(model, **kwargs):
    return GaLoreAdamW(projected_groups(model, 4, update_proj_gap=3), lr=3e-3, **kwargs)


BUILDS = {"dct": lambda model, **kw: _dct(model.named_parameters(), **kw), "galore": _galore_groups}


def _pickled(optimizer):
    return pickle.loads(pickle.dumps(optimizer))


def _torch_saved(optimizer):
    buffer = io.BytesIO()
    torch.save(optimizer, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("copier", [copy.deepcopy, _pickled, _torch_saved], ids=["deepcopy", "pickle", "torch.save"])
@pytest.mark.parametrize("name", list(BUILDS))
def test_a_copy_of_the_optimizer_steps_like_the_original(name, copier):
    """Defect 1: instance attributes set in __init__ (skip_nonfinite, skipped_steps) were lost."""
    model = make_model()
    optimizer = BUILDS[name](model, skip_nonfinite=True)
    train(model, optimizer, 4)                       # crosses a refresh
    pair = copier({"model": model, "optimizer": optimizer})
    copied_model, copied = pair["model"], pair["optimizer"]
    assert copied.skip_nonfinite is True and copied.skipped_steps == 0
    train(model, optimizer, 5, start=4)
    train(copied_model, copied, 5, start=4)
    assert max_rel_diff(copied_model, model) == 0.0
    assert copied.state_dict()["skipped_steps"] == 0


@pytest.mark.parametrize("name", list(BUILDS))
def test_unknown_group_keys_name_the_key_and_list_the_accepted_ones(name):
    """Defect 4: update_proj_gapp=50 used to train silently at the default gap."""
    model = make_model()
    with pytest.raises(ValueError, match=r"'update_proj_gapp'.*accepted keys: .*update_proj_gap"):
        BUILDS[name](model).add_param_group({"params": [torch.nn.Parameter(torch.zeros(3))], "update_proj_gapp": 50})
    with pytest.raises(ValueError, match=r"Invalid param group key 'projection'"):
        DCTProjAdam([{"params": list(model.parameters()), "projection": "svd"}])
    with pytest.raises(ValueError, match=r"Invalid param group key 'targets'"):
        DCTProjAdam([{"params": list(model.parameters()), "targets": "all"}])


def test_sst_refuses_unknown_group_keys_too():
    with pytest.raises(ValueError, match=r"'update_intervall'.*SSTAdamW"):
        SSTAdamW([{"params": [torch.nn.Parameter(torch.zeros(3))], "update_intervall": 5}])


def test_scheduler_keys_are_accepted_in_groups():
    model = make_model()
    optimizer = _dct(model.parameters())
    torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 10)
    DCTProjAdam(optimizer.param_groups)          # groups carrying initial_lr build a new optimizer


@pytest.mark.parametrize("name", list(BUILDS))
@pytest.mark.parametrize("keyword, bad", [("fused", True), ("capturable", True), ("differentiable", True),
                                          ("maximize", "yes"), ("foreach", 1)])
def test_torch_keywords_that_cannot_be_honoured_are_refused(name, keyword, bad):
    """Defect 5: the keywords raised TypeError even as False."""
    with pytest.raises(ValueError, match=rf"Invalid {keyword}: {bad!r}"):
        BUILDS[name](make_model(), **{keyword: bad})


@pytest.mark.parametrize("name", list(BUILDS))
def test_torch_keywords_are_accepted_and_stored_like_torch(name):
    optimizer = BUILDS[name](make_model(), foreach=False, fused=False, maximize=False, capturable=False,
                             differentiable=False)
    group = optimizer.param_groups[0]
    assert (group["foreach"], group["fused"], group["maximize"], group["capturable"], group["differentiable"]) == (
        False, False, False, False, False)


@pytest.mark.parametrize("name", list(BUILDS))
def test_foreach_false_matches_the_multi_tensor_path(name):
    model = make_model()
    single = twin(model)
    train(model, BUILDS[name](model), 5)
    train(single, BUILDS[name](single, foreach=False), 5)
    # The two paths round the AdamW step differently (m/denom/bc1 vs m/denom·(−η/bc1)): ulps.
    assert max_rel_diff(single, model) < 1e-6


@pytest.mark.parametrize("name", list(BUILDS))
def test_maximize_ascends_the_objective_exactly_as_descending_its_negation(name):
    maximizing, minimizing = make_model(), make_model()
    up = BUILDS[name](maximizing, maximize=True)
    down = BUILDS[name](minimizing)
    for step in range(5):
        up.zero_grad()
        (-loss_of(maximizing, step)).backward()        # maximize −f ...
        up.step()
        down.zero_grad()
        loss_of(minimizing, step).backward()           # ... is minimize f: the same gradients, negated twice
        down.step()
    assert max_rel_diff(maximizing, minimizing) == 0.0


def test_maximize_never_writes_the_gradient():
    model = make_model()
    optimizer = _dct(model.named_parameters(), maximize=True)
    loss_of(model, 0).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    optimizer.step()
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))


@pytest.mark.parametrize("cls", [DCTProjAdam, GaLoreAdamW])
def test_help_shows_the_class_docstring_with_math_and_args(cls):
    """Defect 7: help() showed the base class's docstring."""
    doc = cls.__doc__
    assert doc is not ProjectedAdamW.__doc__ and doc is not None
    assert r"\begin{aligned}" in doc and "Args:" in doc and "arXiv" in doc
    assert "update_proj_gap" in doc and "default" in doc


def test_galore_without_a_rank_group_warns_that_it_is_plain_adamw():
    """Defect 8: GaLoreAdamW(model.parameters()) was plain AdamW without a word."""
    with pytest.warns(UserWarning, match=r"no param group has a rank.*lowrank_param_groups"):
        GaLoreAdamW(make_model().parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _galore_groups(make_model())


def test_a_rejected_construction_names_the_key_before_anything_is_built():
    with pytest.raises(ValueError, match=r"Invalid projector: 'qr'"):
        GaLoreAdamW([{"params": [torch.nn.Parameter(torch.zeros(4, 4))], "rank": 2}], projector="qr")
