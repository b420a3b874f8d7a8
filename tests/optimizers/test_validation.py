"""Every hyperparameter error names the value; bad gradients leave everything untouched."""
import pickle

import pytest
import torch
from support.toy import make_model, projected_groups

import lowrank_optim
from lowrank_optim import DCTProjAdam, GaLoreAdamW
from lowrank_optim.validation import InvalidHyperparameter

BAD_COMMON = [
    ("lr", -1.0, r"Invalid lr: -1\.0"),
    ("lr", float("nan"), r"Invalid lr: nan"),
    ("betas", (0.9, 1.0), r"Invalid betas\[1\]: 1\.0"),
    ("betas", (-0.1, 0.9), r"Invalid betas\[0\]: -0\.1"),
    ("betas", 0.9, r"Invalid betas: 0\.9"),
    ("eps", -1e-8, r"Invalid eps: -1e-08"),
    ("weight_decay", -0.1, r"Invalid weight_decay: -0\.1"),
    ("update_proj_gap", 0, r"Invalid update_proj_gap: 0"),
    ("update_proj_gap", 2.5, r"Invalid update_proj_gap: 2\.5"),
    ("scale", 0.0, r"Invalid scale: 0\.0"),
    ("moments", "rotate", r"Invalid moments: 'rotate'"),
    ("moments_dtype", torch.int32, r"Invalid moments_dtype: torch\.int32"),
]
BAD_DCT = BAD_COMMON + [
    ("rank", 0, r"Invalid rank: 0"),
    ("rank", 1.5, r"Invalid rank: 1\.5"),
    ("rank", True, r"Invalid rank: True"),
    ("score", "l3", r"Invalid score: 'l3'"),
    ("proj_side", "top", r"Invalid proj_side: 'top'"),
    ("transform", "fast", r"Invalid transform: 'fast'"),
]
BAD_GALORE = BAD_COMMON + [
    ("rank", 0.5, r"Invalid rank: 0\.5"),
    ("proj_type", "full", r"Invalid proj_type: 'full'"),
    ("correct_bias", "yes", r"Invalid correct_bias: 'yes'"),
]


@pytest.mark.parametrize("key,value,message", BAD_DCT, ids=[f"{k}={v!r}" for k, v, _ in BAD_DCT])
def test_dct_rejects(key, value, message):
    with pytest.raises(ValueError, match=message):
        DCTProjAdam(make_model().parameters(), **{key: value})
    with pytest.raises(ValueError, match=message):     # per-group override is validated too
        DCTProjAdam([{"params": list(make_model().parameters()), key: value}])


@pytest.mark.parametrize("key,value,message", BAD_GALORE, ids=[f"{k}={v!r}" for k, v, _ in BAD_GALORE])
def test_galore_rejects(key, value, message):
    groups = projected_groups(make_model(), 4)
    groups[0][key] = value
    with pytest.raises(ValueError, match=message):
        GaLoreAdamW(groups)


def test_skip_nonfinite_must_be_bool():
    with pytest.raises(ValueError, match="Invalid skip_nonfinite: 1"):
        DCTProjAdam(make_model().parameters(), skip_nonfinite=1)


def test_a_rejected_group_is_not_added():
    optimizer = DCTProjAdam([torch.nn.Parameter(torch.zeros(3))])
    with pytest.raises(ValueError, match="Invalid score"):
        optimizer.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3))], "score": "x"})
    assert len(optimizer.param_groups) == 1


def _snapshot(model, optimizer):
    params = [p.detach().clone() for p in model.parameters()]
    state = {id(p): {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
             for p, s in optimizer.state.items()}
    return params, state


def _assert_unchanged(model, optimizer, snapshot):
    params, state = snapshot
    for p, before in zip(model.parameters(), params):
        assert torch.equal(p, before)
    assert set(state) == {id(p) for p in optimizer.state}
    for p, s in optimizer.state.items():
        for key, value in s.items():
            assert torch.equal(value, state[id(p)][key]) if isinstance(value, torch.Tensor) \
                else value == state[id(p)][key]


def _backward(model, poison=None):
    model.zero_grad()
    model(torch.arange(12).view(2, 6)).square().mean().backward()
    if poison is not None:
        poison.grad[0, 0] = float("nan")


@pytest.mark.parametrize("make", [
    lambda m: DCTProjAdam(m.named_parameters(), rank=0.5, update_proj_gap=2),
    lambda m: GaLoreAdamW(projected_groups(m, 4, update_proj_gap=2)),
], ids=["dct", "galore"])
def test_nonfinite_gradient_at_refresh_raises_and_changes_nothing(make):
    model = make_model()
    optimizer = make(model)
    _backward(model)
    optimizer.step()
    _backward(model)
    optimizer.step()                                # step 2 of 2: next step refreshes
    _backward(model, poison=model.down.weight)
    snapshot = _snapshot(model, optimizer)
    named = r"parameter (down\.weight|param_groups\[0\]\['params'\]\[1\]) \(shape \(12, 40\)\)"
    with pytest.raises(FloatingPointError, match=named):
        optimizer.step()
    _assert_unchanged(model, optimizer, snapshot)


def test_svd_failure_raises_naming_the_parameter_and_changes_nothing(monkeypatch):
    """The second SVD of the step fails: the first layer's refresh must not be applied either."""
    model = make_model()
    optimizer = GaLoreAdamW(projected_groups(model, 4))
    _backward(model)
    snapshot = _snapshot(model, optimizer)
    real_svd, calls = torch.linalg.svd, []

    def svd_failing_on_second_call(matrix, full_matrices=True):
        calls.append(tuple(matrix.shape))
        if len(calls) == 2:
            raise torch.linalg.LinAlgError("The algorithm failed to converge")
        return real_svd(matrix, full_matrices=full_matrices)

    monkeypatch.setattr(torch.linalg, "svd", svd_failing_on_second_call)
    with pytest.raises(RuntimeError, match=r"param_groups\[0\]\['params'\]\[1\] .*subspace refresh failed"):
        optimizer.step()
    assert calls == [(40, 12), (12, 40)]
    _assert_unchanged(model, optimizer, snapshot)


def test_skip_nonfinite_skips_the_whole_step():
    model = make_model()
    optimizer = DCTProjAdam(model.parameters(), skip_nonfinite=True)
    _backward(model)
    optimizer.step()
    _backward(model, poison=model.up.weight)
    snapshot = _snapshot(model, optimizer)
    with pytest.warns(RuntimeWarning, match=r"step skipped \(1 skipped so far\)"):
        optimizer.step()
    _assert_unchanged(model, optimizer, snapshot)
    assert optimizer.skipped_steps == 1


@pytest.mark.parametrize("make", [DCTProjAdam, GaLoreAdamW], ids=["dct", "galore"])
def test_sparse_and_complex_gradients_are_rejected(make):
    dense = torch.nn.Parameter(torch.zeros(4, 3))
    optimizer = make([dense])
    dense.grad = torch.zeros(4, 3).to_sparse()
    with pytest.raises(RuntimeError, match=r"parameter param_groups\[0\]\['params'\]\[0\] \(shape \(4, 3\)\): sparse"):
        optimizer.step()
    assert torch.count_nonzero(dense) == 0
    with pytest.raises(ValueError, match="complex parameters are not supported"):
        make([torch.nn.Parameter(torch.zeros(2, dtype=torch.complex64))])


def test_closure_is_called_with_grad_enabled():
    model = make_model()
    optimizer = DCTProjAdam(model.parameters())

    def closure():
        optimizer.zero_grad()
        loss = model(torch.arange(6).view(1, 6)).square().mean()
        loss.backward()
        return loss

    before = model.up.weight.detach().clone()
    loss = optimizer.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.requires_grad
    assert not torch.equal(before, model.up.weight)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_skip_nonfinite_handles_every_float_dtype(dtype):
    weight = torch.nn.Parameter(torch.ones(8, 4, dtype=dtype))
    optimizer = DCTProjAdam([weight], skip_nonfinite=True)
    weight.grad = torch.full((8, 4), 60000.0, dtype=dtype)   # finite; its fp16 norm would overflow
    optimizer.step()
    assert optimizer.skipped_steps == 0
    weight.grad[0, 0] = float("inf")
    with pytest.warns(RuntimeWarning, match="step skipped"):
        optimizer.step()
    assert optimizer.skipped_steps == 1


CARRIED = [({"lr": -1.0}, "lr", -1.0), ({"betas": (0.9, 1.0)}, "betas", (0.9, 1.0)),
           ({"update_proj_gap": 0}, "update_proj_gap", 0), ({"score": "l3"}, "score", "l3"),
           ({"fused": True}, "fused", True)]


@pytest.mark.parametrize(("kwargs", "key", "value"), CARRIED)
def test_errors_carry_the_key_and_the_value(kwargs, key, value):
    with pytest.raises(InvalidHyperparameter) as error:
        DCTProjAdam(make_model().parameters(), **kwargs)
    assert isinstance(error.value, ValueError)
    assert (error.value.key, error.value.value) == (key, value)
    assert str(error.value).startswith(f"Invalid {key}")
    copy = pickle.loads(pickle.dumps(error.value))       # e.g. from a worker process
    assert (type(copy), copy.key, copy.value, str(copy)) == (InvalidHyperparameter, key, value, str(error.value))


def test_an_unknown_group_key_is_the_key_of_the_error():
    with pytest.raises(InvalidHyperparameter) as error:
        DCTProjAdam([{"params": list(make_model().parameters()), "update_proj_gapp": 3}])
    assert (error.value.key, error.value.value) == ("update_proj_gapp", 3)


def _linear_model():
    return torch.nn.Sequential(torch.nn.Linear(8, 8))


@pytest.mark.parametrize("build, key, value", [
    (lambda: DCTProjAdam(make_model().parameters(), rank=0), "rank", 0),
    (lambda: DCTProjAdam(make_model().parameters(), moment_bits=3), "moment_bits", 3),
    (lambda: DCTProjAdam(make_model().parameters(), moment_block_size=100), "moment_block_size", 100),
    (lambda: DCTProjAdam(make_model().parameters(), backend="gpu"), "backend", "gpu"),
    (lambda: DCTProjAdam(make_model().parameters(), accumulation_steps=2), "accumulation_steps", 2),
    (lambda: DCTProjAdam(make_model().parameters(), step_in_backward=True, skip_nonfinite=True, residual="none"),
     "skip_nonfinite", True),
    (lambda: lowrank_optim.GaLoreAdamW8bit(make_model().parameters(), amsgrad=True), "amsgrad", True),
    (lambda: lowrank_optim.lowrank_param_groups(_linear_model(), target_modules=("attn",)), "target_modules",
     ("attn",)),
    (lambda: lowrank_optim.convert_to_sst(_linear_model(), rank=9, target_modules=("0",)), "rank", 9),
    (lambda: lowrank_optim.SSTAdamW(make_model().parameters(), sampling="x"), "sampling", "x"),
    (lambda: lowrank_optim.clip_grad_norm_(DCTProjAdam(make_model().parameters()), -1.0), "max_norm", -1.0),
])
def test_library_errors_outside_validation_carry_their_key(build, key, value):
    """The training script names the flag from ``.key``, never from the message's text."""
    with pytest.raises(InvalidHyperparameter) as error:
        build()
    assert (error.value.key, error.value.value) == (key, value)
    assert str(error.value).startswith(f"Invalid {key}: ")
