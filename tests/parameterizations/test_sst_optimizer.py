"""SSTAdamW: the update, the schedule (resample, re-SVD), memory, checkpoints and validation."""

import copy

import pytest
import torch
from support.sst_helpers import TinyBlock, batch, train_steps
from torch import nn

from lowrank_optim import create_optimizer, optimizer_state_bytes
from lowrank_optim.moments import Moments
from lowrank_optim.sst import SSTAdamW, SSTLinear, convert_to_sst, sst_layers
from lowrank_optim.sst.adam_update import adamw_with_step_counts_
from lowrank_optim.sst.optimizer import SST_GROUP_KEYS
from lowrank_optim.sst.resample import carry_over_columns_

RANK = 4  # attn: m=16, n=24, k=16; mlp: m=40, n=16, k=16; mlp_gate: m=6, n=40, k=6 (round of 2)


def _model(seed=0):
    torch.manual_seed(seed)
    return convert_to_sst(TinyBlock(), RANK)


def _backward(model, step=0):
    model.zero_grad()
    dtype = model.attn.s.dtype
    x, target = batch(step)
    nn.functional.mse_loss(model(x.to(dtype)), target.to(dtype)).backward()


def _snapshot(model, optimizer):
    tensors = {k: v.clone() for k, v in model.state_dict().items()}
    state = {
        id(p): {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
        for p, s in optimizer.state.items()
    }
    return tensors, state


def _assert_unchanged(model, optimizer, snapshot):
    tensors, state = snapshot
    for key, value in model.state_dict().items():
        assert torch.equal(value, tensors[key]), key
    assert set(state) == {id(p) for p in optimizer.state}
    for p, s in optimizer.state.items():
        for key, value in s.items():
            before = state[id(p)][key]
            assert torch.equal(value, before) if isinstance(value, torch.Tensor) else value == before


def test_only_the_active_columns_change_within_an_iteration():
    model = _model()
    optimizer = SSTAdamW(model.parameters(), lr=1e-2, update_interval=5)
    before = {name: (layer.U.clone(), layer.V.clone(), *layer.current_factors()) for name, layer in sst_layers(model)}
    train_steps(model, optimizer, range(4))  # one step short of the resample
    for name, layer in sst_layers(model):
        U_buffer, V_buffer, U0, s0, V0 = before[name]
        assert torch.equal(layer.U, U_buffer) and torch.equal(layer.V, V_buffer)  # frozen storage untouched
        U1, s1, V1 = layer.current_factors()
        active = layer.active_indices
        frozen = torch.ones(layer.spectral_size, dtype=torch.bool)
        frozen[active] = False
        assert torch.equal(U1[:, frozen], U0[:, frozen]) and torch.equal(V1[:, frozen], V0[:, frozen])
        assert (U1[:, active] - U0[:, active]).abs().amax(0).min() > 1e-4  # every active column moved
        assert (V1[:, active] - V0[:, active]).abs().amax(0).min() > 1e-4
        assert (s1 != s0).all() and (s1 >= 0).all()  # all singular values train
        torch.testing.assert_close(torch.linalg.vector_norm(layer.U_active, dim=0), torch.ones(RANK))
        torch.testing.assert_close(torch.linalg.vector_norm(layer.V_active, dim=0), torch.ones(RANK))


def test_singular_values_are_clamped_at_zero():
    model = _model()
    optimizer = SSTAdamW(model.parameters(), lr=1e-2, rewarmup_steps=0)
    with torch.no_grad():
        model.attn.s[-1] = 1e-5
    _backward(model)
    model.attn.s.grad[-1] = 1.0  # pushes s[-1] down by about lr = 1e-2 (first Adam step: ±lr)
    optimizer.step()
    assert model.attn.s[-1] == 0.0 and (model.attn.s[:-1] > 0).all()


def test_matches_torch_adamw_between_resamples():
    """Reference: torch.optim.AdamW on the same parameters (enhanced gradients come from the layer),
    then s ← max(s, 0) and renormalisation by hand. fp32, 6 steps: only rounding differs (≲1e-7)."""
    model = _model()
    reference = copy.deepcopy(model)
    optimizer = SSTAdamW(model.parameters(), lr=1e-2, weight_decay=0.1, update_interval=1000, rewarmup_steps=0)
    vectors = [p for n, p in reference.named_parameters() if n.endswith(("U_active", "V_active"))]
    others = [p for n, p in reference.named_parameters() if not n.endswith(("U_active", "V_active"))]
    torch_adamw = torch.optim.AdamW(
        [{"params": others}, {"params": vectors, "weight_decay": 0.0}], lr=1e-2, weight_decay=0.1
    )
    for step in range(6):
        for net, opt in ((model, optimizer), (reference, torch_adamw)):
            _backward(net, step)
            opt.step()
        with torch.no_grad():
            for _, layer in sst_layers(reference):
                layer.s.clamp_(min=0)
                layer.renormalize_active_()
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_resample_and_resvd_schedule_per_layer(monkeypatch):
    calls = []
    real_resvd = SSTLinear.resvd_
    monkeypatch.setattr(SSTLinear, "resvd_", lambda self: calls.append(self) or real_resvd(self))
    model = _model()
    optimizer = SSTAdamW(model.parameters(), lr=1e-2, update_interval=2)
    indices = []
    for step in range(12):
        train_steps(model, optimizer, range(step, step + 1))
        indices.append([layer.active_indices.clone() for _, layer in sst_layers(model)])
    for step in range(1, 12):  # active sets change exactly after steps 2, 4, ... (1-based)
        changed = any(not torch.equal(a, b) for a, b in zip(indices[step], indices[step - 1], strict=True))
        assert changed == ((step + 1) % 2 == 0), step
    # 6 resamples; a round is ⌈k/r⌉ resamples: 4 for attn and mlp (k=16), 2 for mlp_gate (k=6).
    counts = {name: sum(c is layer for c in calls) for name, layer in sst_layers(model)}
    assert counts == {"attn": 1, "mlp": 1, "mlp_gate": 3}

    calls.clear()
    optimizer = SSTAdamW(model.parameters(), lr=1e-2, update_interval=2, resvd_interval=3)
    train_steps(model, optimizer, range(12))
    assert {name: sum(c is layer for c in calls) for name, layer in sst_layers(model)} == {
        "attn": 2,
        "mlp": 2,
        "mlp_gate": 2,
    }


def test_resvd_restores_orthogonality():
    model = _model()
    optimizer = SSTAdamW(model.parameters(), lr=5e-2, update_interval=1, resvd_interval=3, rewarmup_steps=0)

    def orthogonality_error(layer):
        U, _, V = layer.current_factors()
        eye = torch.eye(layer.spectral_size)
        return max((U.mT @ U - eye).abs().max().item(), (V.mT @ V - eye).abs().max().item())

    train_steps(model, optimizer, range(2))
    assert min(orthogonality_error(layer) for _, layer in sst_layers(model)) > 1e-3  # drifted
    train_steps(model, optimizer, range(2, 3))  # third resample: re-SVD
    for _, layer in sst_layers(model):
        assert orthogonality_error(layer) < 1e-5
        assert (layer.s >= 0).all() and (layer.s[:-1] >= layer.s[1:]).all()
        for p in (layer.s, layer.U_active, layer.V_active):  # moments restart with the new basis
            state = optimizer.state[p]
            assert not state["exp_avg"].any() and not state["exp_avg_sq"].any()
            assert not state["step" if p is layer.s else "column_steps"].any()


def test_kept_pairs_keep_their_moments_and_new_pairs_start_at_zero():
    model = _model()
    optimizer = SSTAdamW(model.parameters(), lr=1e-2, update_interval=3, resvd_interval=100)
    train_steps(model, optimizer, range(2))
    previous = {name: layer.active_indices.clone() for name, layer in sst_layers(model)}
    train_steps(model, optimizer, range(2, 3))  # ends in a resample
    kept_any = new_any = False
    for name, layer in sst_layers(model):
        kept = torch.isin(layer.active_indices, previous[name])
        kept_any, new_any = kept_any or bool(kept.any()), new_any or bool((~kept).any())
        for p in (layer.U_active, layer.V_active):
            state = optimizer.state[p]
            assert torch.equal(state["column_steps"], torch.where(kept, 3, 0))
            assert (state["exp_avg"][:, kept] != 0).all(0).all() and not state["exp_avg"][:, ~kept].any()
        assert optimizer.state[layer.s]["step"] == 3  # s continues
    assert kept_any and new_any  # the draw exercised both cases


def test_carry_over_columns_moves_moments_to_the_new_slots():
    moments = torch.arange(1.0, 7.0).view(2, 3)  # columns for pairs 2, 5, 7
    state = {"exp_avg": moments.clone(), "exp_avg_sq": moments.clone() * 10, "column_steps": torch.tensor([4, 5, 6])}
    carry_over_columns_(Moments.of(state, (2, 3), "right", None), torch.tensor([2, 5, 7]), torch.tensor([7, 1, 2]),
                        spectral_size=8)
    assert torch.equal(state["exp_avg"], torch.tensor([[3.0, 0.0, 1.0], [6.0, 0.0, 4.0]]))
    assert torch.equal(state["exp_avg_sq"], torch.tensor([[30.0, 0.0, 10.0], [60.0, 0.0, 40.0]]))
    assert torch.equal(state["column_steps"], torch.tensor([6, 0, 4]))


def test_rewarmup_scales_the_learning_rate_of_young_columns():
    def update(rewarmup_steps):
        param = torch.zeros(3, 3)
        state = {"exp_avg": torch.full((3, 3), 0.1), "exp_avg_sq": torch.full((3, 3), 0.02)}
        adamw_with_step_counts_(
            param,
            torch.ones(3, 3),
            Moments.of(state, (3, 3), "right", None),
            torch.tensor([1, 2, 40]),
            lr=0.1,
            beta1=0.9,
            beta2=0.999,
            eps=1e-8,
            weight_decay=0.0,
            rewarmup_steps=rewarmup_steps,
            optimizer_step=40,
        )
        return param

    ratio = update(4) / update(0)
    torch.testing.assert_close(ratio, torch.tensor([0.25, 0.5, 1.0]).expand(3, 3))


def test_gradients_and_optimizer_state_cover_only_s_and_the_active_columns():
    model = _model()
    optimizer = SSTAdamW(model.parameters(), lr=1e-2)
    train_steps(model, optimizer, range(1))
    shapes = {"attn": (16, 24, 16), "mlp": (40, 16, 16), "mlp_gate": (6, 40, 6)}  # m, n, k
    sst_values = sum(k + (m + n) * RANK for m, n, k in shapes.values())
    plain_values = 16 + 6 + 5 * 6 + 5  # biases of attn and mlp_gate, the dense head
    grad_bytes = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    assert grad_bytes == 4 * (sst_values + plain_values)
    for _, layer in sst_layers(model):
        assert not layer.U.requires_grad and layer.U.grad is None and layer.V.grad is None
    step_counts = len(shapes) * (8 + 2 * 8 * RANK)  # int64: one for s, one per column of U_active and V_active
    assert optimizer_state_bytes(optimizer) == 2 * 4 * (sst_values + plain_values) + step_counts


def test_resume_is_bit_identical_across_a_resample_and_a_resvd(tmp_path):
    def make(seed, optimizer_seed):
        model = _model(seed)
        return model, SSTAdamW(model.parameters(), lr=1e-2, update_interval=3, resvd_interval=2, seed=optimizer_seed)

    model, optimizer = make(0, 0)
    train_steps(model, optimizer, range(10))  # resamples after steps 3, 6 (re-SVD) and 9

    interrupted, interrupted_optimizer = make(0, 0)
    train_steps(interrupted, interrupted_optimizer, range(4))
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": interrupted.state_dict(), "optimizer": interrupted_optimizer.state_dict()}, path)
    resumed, resumed_optimizer = make(123, 999)  # other weights, other generator: all must come from the file
    checkpoint = torch.load(path, weights_only=True)
    resumed.load_state_dict(checkpoint["model"])
    resumed_optimizer.load_state_dict(checkpoint["optimizer"])
    for _, layer in sst_layers(resumed):
        assert resumed_optimizer.state[layer.U_active]["column_steps"].dtype == torch.int64
        assert resumed_optimizer.state[layer.s]["step"].dtype == torch.int64
    train_steps(resumed, resumed_optimizer, range(4, 10))

    for key, value in model.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
    expected, actual = optimizer.state_dict(), resumed_optimizer.state_dict()
    assert torch.equal(actual["sst"]["generator_state"], expected["sst"]["generator_state"])
    for index, state in expected["state"].items():
        for key, value in state.items():
            got = actual["state"][index][key]
            assert (torch.equal(got, value) and got.dtype == value.dtype) if torch.is_tensor(value) else got == value


def test_deepcopy_of_model_and_optimizer_trains_identically():
    model = _model()
    optimizer = SSTAdamW(model.parameters(), lr=1e-2, update_interval=3)
    train_steps(model, optimizer, range(2))
    twin, twin_optimizer = copy.deepcopy((model, optimizer))
    train_steps(model, optimizer, range(2, 7))
    train_steps(twin, twin_optimizer, range(2, 7))
    for key, value in model.state_dict().items():
        assert torch.equal(twin.state_dict()[key], value), key


def test_closure_and_registry():
    model = _model()
    optimizer = create_optimizer("sst_adamw", model.parameters(), lr=1e-2)
    assert isinstance(optimizer, SSTAdamW)

    def closure():
        optimizer.zero_grad()
        loss = model(batch(0)[0]).square().mean()
        loss.backward()
        return loss

    before = model.attn.s.detach().clone()
    loss = optimizer.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.requires_grad
    assert not torch.equal(before, model.attn.s)


def test_a_layer_without_gradients_is_not_updated_but_still_resampled():
    model = _model()
    optimizer = SSTAdamW(model.parameters(), lr=1e-2, update_interval=2)
    train_steps(model, optimizer, range(1))
    _backward(model, 1)
    for p in model.mlp.parameters():
        p.grad = None
    factors = model.mlp.current_factors()
    indices = model.mlp.active_indices.clone()
    state = {k: v.clone() for k, v in optimizer.state[model.mlp.s].items()}
    optimizer.step()  # step 2 ends in a resample
    assert all(torch.equal(a, b) for a, b in zip(model.mlp.current_factors(), factors, strict=True))
    assert not torch.equal(model.mlp.active_indices, indices)
    assert all(torch.equal(optimizer.state[model.mlp.s][k], v) for k, v in state.items())


BAD = [
    ("lr", -1.0, r"Invalid lr: -1\.0"),
    ("betas", (0.9, 1.0), r"Invalid betas\[1\]: 1\.0"),
    ("eps", -1e-8, r"Invalid eps: -1e-08"),
    ("weight_decay", -0.1, r"Invalid weight_decay: -0\.1"),
    ("update_interval", 0, r"Invalid update_interval: 0 \(expected an integer >= 1\)"),
    ("update_interval", 2.5, r"Invalid update_interval: 2\.5"),
    ("resvd_interval", 0, r"Invalid resvd_interval: 0 \(expected an integer >= 1\)"),
    ("sampling", "uniform", r"Invalid sampling: 'uniform' \(expected one of 's', 'mixed'\)"),
    ("rewarmup_steps", -1, r"Invalid rewarmup_steps: -1 \(expected an integer >= 0\)"),
    ("rewarmup_steps", True, r"Invalid rewarmup_steps: True"),
]


@pytest.mark.parametrize("key,value,message", BAD, ids=[f"{k}={v!r}" for k, v, _ in BAD])
def test_rejects_hyperparameters(key, value, message):
    model = _model()
    with pytest.raises(ValueError, match=message):
        SSTAdamW(model.parameters(), **{key: value})
    with pytest.raises(ValueError, match=message):  # per-group override is validated too
        SSTAdamW([{"params": list(model.parameters()), key: value}])


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"seed": -1}, r"Invalid seed: -1 \(expected an integer >= 0\)"),
        ({"seed": "0"}, r"Invalid seed: '0'"),
        ({"skip_nonfinite": 1}, r"Invalid skip_nonfinite: 1 \(expected True or False\)"),
    ],
)
def test_rejects_optimizer_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SSTAdamW(_model().parameters(), **kwargs)


def test_rejects_an_sst_layer_given_in_part():
    model = _model()
    with pytest.raises(ValueError, match=r"Invalid params: SST layer attn has U_active, s .* but not V_active"):
        SSTAdamW([(n, p) for n, p in model.named_parameters() if n != "attn.V_active"])
    split = [
        {"params": [model.mlp.s, model.mlp.U_active]},
        {"params": [model.mlp.V_active]},
    ]
    with pytest.raises(
        ValueError,
        match=r"SST layer SSTLinear\(in_features=16, out_features=40.*\) at "
        r"param_groups\[0\]\['params'\]\[0\] has U_active, s",
    ):
        SSTAdamW(split)


def test_a_rejected_group_is_not_added():
    model = _model()
    optimizer = SSTAdamW(model.head.parameters())
    with pytest.raises(ValueError, match="but not U_active, V_active"):
        optimizer.add_param_group({"params": [model.attn.s]})
    with pytest.raises(ValueError, match="Invalid sampling"):
        optimizer.add_param_group({"params": list(model.attn.parameters()), "sampling": "x"})
    assert len(optimizer.param_groups) == 1


def test_rejects_complex_parameters_and_sparse_gradients():
    with pytest.raises(ValueError, match=r"parameter param_groups\[0\]\['params'\]\[0\] \(shape \(2,\)\): complex"):
        SSTAdamW([nn.Parameter(torch.zeros(2, dtype=torch.complex64))])
    embedding = nn.Embedding(10, 4, sparse=True)
    optimizer = SSTAdamW(embedding.named_parameters())
    embedding(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match=r"parameter weight \(shape \(10, 4\)\): sparse gradients"):
        optimizer.step()


def test_rejects_partial_gradients_before_changing_anything():
    model = _model()
    optimizer = SSTAdamW(model.named_parameters(), lr=1e-2)
    _backward(model)
    model.mlp_gate.U_active.grad = None
    snapshot = _snapshot(model, optimizer)
    with pytest.raises(RuntimeError, match=r"SST layer mlp_gate: U_active has no gradient"):
        optimizer.step()
    _assert_unchanged(model, optimizer, snapshot)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nonfinite_gradient_before_a_resample_raises_and_changes_nothing(dtype):
    model = _model().to(dtype)
    optimizer = SSTAdamW(model.named_parameters(), lr=1e-2, update_interval=2)
    _backward(model, 0)
    optimizer.step()
    _backward(model, 1)
    model.mlp.V_active.grad[0, 0] = float("nan")
    snapshot = _snapshot(model, optimizer)
    with pytest.raises(FloatingPointError, match=r"SST layer mlp: non-finite gradient of V_active on a step"):
        optimizer.step()
    _assert_unchanged(model, optimizer, snapshot)


def test_skip_nonfinite_skips_the_whole_step():
    model = _model()
    optimizer = SSTAdamW(model.parameters(), lr=1e-2, update_interval=2, skip_nonfinite=True)
    train_steps(model, optimizer, range(1))
    _backward(model, 1)
    model.head.weight.grad[0, 0] = float("inf")
    snapshot = _snapshot(model, optimizer)
    with pytest.warns(RuntimeWarning, match=r"step skipped \(1 skipped so far\)"):
        optimizer.step()
    _assert_unchanged(model, optimizer, snapshot)
    assert optimizer.skipped_steps == 1 and optimizer.state_dict()["sst"]["step"] == 1


def test_load_state_dict_requires_the_sst_entry():
    model = _model()
    optimizer = SSTAdamW(model.parameters())
    state_dict = torch.optim.AdamW(model.parameters()).state_dict()
    with pytest.raises(ValueError, match=r"Invalid state_dict: no 'sst' entry"):
        optimizer.load_state_dict(state_dict)


def test_a_saved_group_must_carry_the_constructor_keys():
    """The keys the state-format check asks of a saved group (the contract test loads, reloads
    and refuses state dicts of every optimizer)."""
    assert set(SSTAdamW(_model().parameters()).defaults) == set(SST_GROUP_KEYS)


def test_parameters_replaced_by_the_model_are_refused():
    model = _model()
    stale = list(model.parameters())
    model.load_state_dict(copy.deepcopy(model.state_dict()), assign=True)
    with pytest.raises(RuntimeError, match="which has replaced it by a new tensor"):
        SSTAdamW(stale)
