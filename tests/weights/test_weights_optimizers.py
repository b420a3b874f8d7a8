"""The optimizers on int8 weights (issue #23, stage 2): every update of an int8 weight is
``W ← SR(a·Ŵ − b·ΔW)`` through its plan (``weight_store="int8"``).

* each int8 build of the contract registry, in each of its modes, resumes bit for bit (codes,
  scales and optimizer state) from a checkpoint read with ``torch.load(weights_only=True)``;
* the plans record the store, and the int8 weights of a plain group take the single-tensor path;
* stochastic rounding is what makes small steps move: at a learning rate far below half a
  quantization step, the optimizer moves an int8 weight as far as the fp32 run moves its float
  twin, while round-to-nearest would write back the very codes it started from;
* training a toy language model with int8 weights lowers the loss about as much as with float
  weights (fp32 and bf16);
* what cannot work is refused by name.
"""
import io

import pytest
import torch
from support.optim_db import BUILDS, CASES, MODES, case_ids
from support.toy import batch, make_model, next_token_loss
from torch import nn

from lowrank_optim import APOLLOMini, DCTProjAdam, SSTAdamW, convert_to_sst
from lowrank_optim.weights import (
    dequantize_weight,
    int8_storage,
    is_int8_weight,
    quantize_model_weights,
    quantize_weight,
)

INT8_CASES = [(name, mode) for name, mode in CASES if BUILDS[name].int8]


def _build(name, mode, seed=0):
    build = BUILDS[name]
    model = build.model(seed)
    return model, build.make(model, **MODES[mode])


def _train(model, optimizer, steps, start=0):
    for step in range(start, start + steps):
        next_token_loss(model, batch(step)).backward()
        optimizer.step()
        optimizer.zero_grad()


def _saved(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _assert_equal_tree(a, b, path=""):
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            _assert_equal_tree(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for index, (x, y) in enumerate(zip(a, b)):
            _assert_equal_tree(x, y, f"{path}[{index}]")
    else:
        assert a == b, path


def test_the_int8_builds_cover_every_optimizer_and_mode():
    names = {name for name, _ in INT8_CASES}
    modes = {mode for _, mode in INT8_CASES}
    assert {"dct_defaults_int8", "galore_int8", "apollo_mini_int8", "sst_int8"} <= names
    assert modes == {"standard", "backward_projection", "step_in_backward"}


@pytest.mark.parametrize("name, mode", INT8_CASES, ids=case_ids(INT8_CASES))
def test_resume_is_bit_identical_in_codes_scales_and_state(name, mode):
    model, optimizer = _build(name, mode)
    _train(model, optimizer, 2)
    checkpoint = _saved({"model": model.state_dict(), "optimizer": optimizer.state_dict()})
    assert any(key.endswith(".int8_codes") for key in checkpoint["model"])
    _train(model, optimizer, 4, start=2)                       # crosses a refresh (gap 3)

    resumed_model, resumed = _build(name, mode, seed=1)
    resumed_model.load_state_dict(checkpoint["model"])
    resumed.load_state_dict(checkpoint["optimizer"])
    _train(resumed_model, resumed, 4, start=2)
    _assert_equal_tree(resumed_model.state_dict(), model.state_dict())
    _assert_equal_tree(resumed.state_dict()["state"], optimizer.state_dict()["state"])


def test_the_plan_records_the_weight_store():
    model = make_model(d=64, hidden=256)
    quantize_model_weights(model, include_head=True)
    optimizer = DCTProjAdam(model.named_parameters(), rank=16)
    stores = {name: optimizer.plan_of(p).weight_store for name, p in model.named_parameters()}
    assert stores == {"embed.weight": "float", "up.weight": "int8", "up.bias": "float", "down.weight": "int8",
                      "down.bias": "float", "norm.weight": "float", "norm.bias": "float", "head.weight": "int8"}
    assert optimizer.plan_of(model.up.weight).projected and not optimizer.plan_of(model.head.weight).projected
    assert all(optimizer.plan_of(p).stochastic_round == is_int8_weight(p) for p in model.parameters())


def test_an_int8_weight_in_a_foreach_group_steps_alone_and_the_float_ones_together(monkeypatch):
    """int8 weights cannot take ``torch._foreach_*``: they take the single-tensor path, the other
    plain parameters of the group still the multi-tensor one."""
    import lowrank_optim.plain_adamw as plain_adamw

    model = make_model(d=64, hidden=256)
    quantize_model_weights(model, include_head=True)
    calls = {"foreach": [], "single": []}
    foreach, single = plain_adamw.foreach_adamw_, plain_adamw.single_tensor_adamw_
    monkeypatch.setattr(plain_adamw, "foreach_adamw_",
                        lambda params, *a, **k: calls["foreach"].append(len(params)) or foreach(params, *a, **k))
    monkeypatch.setattr(plain_adamw, "single_tensor_adamw_",
                        lambda param, *a, **k: calls["single"].append(is_int8_weight(param)) or single(param, *a, **k))
    optimizer = DCTProjAdam(model.named_parameters(), rank=16, foreach=True)
    _train(model, optimizer, 1)
    assert calls == {"foreach": [5], "single": [True]}     # embed, 2 biases, norm weight and bias; the head


# ----------------------------------------------------------------------------- small steps
LR = 1e-5          # the Adam step ≈ lr per value, ~ 1/100 of a quantization step (≈ 1e-3 here)


def _regression(model: nn.Module, step: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(300 + step)
    x = torch.randn(64, 48, generator=generator)
    target = x @ torch.linspace(-1, 1, 48 * 32, dtype=torch.float32).view(48, 32)
    return nn.functional.mse_loss(model(x), target)


def _fit(model: nn.Module, steps: int) -> None:
    optimizer = DCTProjAdam([{"params": list(model.parameters()), "rank": None}], lr=LR)
    for step in range(steps):
        _regression(model, step).backward()
        optimizer.step()
        optimizer.zero_grad()


def test_stochastic_rounding_moves_an_int8_weight_by_steps_far_below_half_a_quantization_step():
    torch.manual_seed(0)
    reference = nn.Linear(48, 32, bias=False)
    start = quantize_weight(reference.weight.detach())
    int8_model = nn.Linear(48, 32, bias=False)
    int8_model.weight = nn.Parameter(quantize_weight(reference.weight.detach()))
    with torch.no_grad():                      # both runs start from the same Ŵ
        reference.weight.copy_(dequantize_weight(start, torch.float32))
    codes_before = int8_storage(int8_model.weight)[0].clone()
    steps = 400
    _fit(reference, 1)
    # round to nearest writes the codes it started from: an update of ~lr never reaches half a step
    assert torch.equal(int8_storage(quantize_weight(reference.weight.detach()))[0], codes_before)
    _fit(reference, steps - 1)
    _fit(int8_model, steps)

    float_move = reference.weight.detach() - dequantize_weight(start, torch.float32)
    int8_move = dequantize_weight(int8_model.weight, torch.float32) - dequantize_weight(start, torch.float32)
    step_size = int8_storage(start)[1].max().item()
    assert LR < step_size / 50                # each Adam step (≈ lr per value) is below 1/50 of a quantization step
    assert (int8_storage(int8_model.weight)[0] != codes_before).float().mean() > 0.05
    # unbiased: the int8 displacement follows the fp32 one (noise ~ one step per moved code, averaged over rows)
    cosine = nn.functional.cosine_similarity(int8_move.flatten(), float_move.flatten(), dim=0)
    gain = (int8_move * float_move).sum() / float_move.square().sum()      # 1 when unbiased
    assert cosine > 0.6                       # measured 0.83 (gain 0.96, 83% of the codes moved)
    assert 0.8 < gain < 1.2


# ------------------------------------------------------------------------------------ quality
STEPS = 150


def _toy_loss_drop(dtype: torch.dtype, int8: bool, make) -> tuple[float, float]:
    model = make_model(seed=0, dtype=dtype, d=64, hidden=256)
    if int8:
        quantize_model_weights(model, include_head=True)
    optimizer = make(model)
    first = None
    for step in range(STEPS):
        loss = next_token_loss(model, batch(step % 8))
        first = loss.item() if first is None else first
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        final = sum(next_token_loss(model, batch(step)).item() for step in range(8)) / 8
    return first, final


QUALITY = {
    "dct_8bit": lambda model: DCTProjAdam(model.named_parameters(), lr=3e-3, rank=16, moment_bits=8,
                                          update_proj_gap=50),
    "apollo_mini": lambda model: APOLLOMini(model.named_parameters(), lr=3e-3, update_proj_gap=50),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(QUALITY))
def test_int8_weights_lower_the_loss_about_as_much_as_float_weights(name, dtype):
    """Memorising 8 batches of a toy LM: the int8 run's loss drop is within 10% of the float run's
    (bf16 float weights round to nearest, as by default)."""
    start, float_final = _toy_loss_drop(dtype, False, QUALITY[name])
    _, int8_final = _toy_loss_drop(dtype, True, QUALITY[name])
    assert start - float_final > 0.5
    assert start - int8_final > 0.9 * (start - float_final)


# --------------------------------------------------------------------------------- refusals
def test_sst_factors_stay_float_and_an_int8_head_steps_through_the_plain_path():
    model = convert_to_sst(make_model(d=64, hidden=256), rank=4, target_modules=("up", "down"))
    assert quantize_model_weights(model, None, include_head=True) == ["head.weight"]
    optimizer = SSTAdamW(model.parameters(), lr=3e-3, update_interval=3)
    codes = int8_storage(model.head.weight)[0].clone()
    _train(model, optimizer, 2)
    assert not torch.equal(int8_storage(model.head.weight)[0], codes)


def test_torch_adamw_fails_on_int8_weights_which_is_why_the_training_script_refuses_it():
    model = make_model(d=64, hidden=256)
    quantize_model_weights(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    next_token_loss(model, batch(0)).backward()
    with pytest.raises(NotImplementedError):
        optimizer.step()
