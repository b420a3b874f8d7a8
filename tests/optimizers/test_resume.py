"""state_dict → torch.save → torch.load(weights_only=True) → resume is bit-identical."""
import pytest
import torch
from support.toy import make_model, projected_groups, train, twin

from lowrank_optim import DCTProjAdam, GaLoreAdamW


def _dct(model, **kwargs):
    return DCTProjAdam(model.named_parameters(), lr=3e-3, rank=0.5, update_proj_gap=4, **kwargs)


def _galore(model, **kwargs):
    return GaLoreAdamW(projected_groups(model, 4, update_proj_gap=4), lr=3e-3, **kwargs)


@pytest.mark.parametrize("build", [_dct, _galore], ids=["dct", "galore"])
@pytest.mark.parametrize("moments", ["keep", "transport"])
def test_resume_is_bit_identical(tmp_path, build, moments):
    model = make_model()
    optimizer = build(model, moments=moments)
    train(model, optimizer, 6)                       # crosses a refresh (steps 0 and 4)
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, tmp_path / "ckpt.pt")
    uninterrupted = train(model, optimizer, 7, start=6)

    restored_model = make_model(seed=123)
    restored = build(restored_model, moments=moments)
    checkpoint = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    restored_model.load_state_dict(checkpoint["model"])
    restored.load_state_dict(checkpoint["optimizer"])
    resumed = train(restored_model, restored, 7, start=6)

    assert resumed == uninterrupted
    for p, q in zip(model.parameters(), restored_model.parameters()):
        assert torch.equal(p, q)


def test_indices_and_fp32_moments_keep_their_dtype_on_load_into_bf16_params():
    model = make_model(dtype=torch.bfloat16, d=280, hidden=300, vocab=64)
    optimizer = DCTProjAdam(model.named_parameters(), rank=0.9, moments_dtype=torch.float32)
    train(model, optimizer, 2)
    state = optimizer.state_dict()
    indices = optimizer.state[model.up.weight]["proj_indices"]
    assert indices.max() > 256          # would be rounded by a bf16 cast
    fresh = DCTProjAdam(twin(model).named_parameters(), rank=0.9, moments_dtype=torch.float32)
    fresh.load_state_dict(state)
    loaded = fresh.state[fresh.param_groups[0]["params"][1]]
    assert loaded["proj_indices"].dtype == torch.int64
    assert torch.equal(loaded["proj_indices"], indices)
    assert loaded["exp_avg"].dtype == torch.float32
    assert torch.equal(loaded["exp_avg"], optimizer.state[model.up.weight]["exp_avg"])


def test_skipped_steps_counter_survives_a_round_trip():
    model = make_model()
    optimizer = DCTProjAdam(model.parameters(), skip_nonfinite=True)
    model(torch.zeros(1, 3, dtype=torch.long)).sum().mul(float("nan")).backward()
    with pytest.warns(RuntimeWarning, match="step skipped"):
        optimizer.step()
    fresh = DCTProjAdam(twin(model).parameters(), skip_nonfinite=True)
    fresh.load_state_dict(optimizer.state_dict())
    assert fresh.skipped_steps == 1
