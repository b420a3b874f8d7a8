"""``projection_summary()``: one row per parameter, bytes equal to what the state really holds."""
import torch
from support.toy import make_model, projected_groups, train

from lowrank_optim import DCTProjAdam, GaLoreAdamW, optimizer_state_bytes
from lowrank_optim.state_bytes import tensor_bytes


def test_rows_before_and_after_the_first_step_agree_with_the_state():
    model = make_model(d=16, hidden=40)
    optimizer = DCTProjAdam(model.named_parameters(), rank=4, bias_correction="slot")
    before = optimizer.projection_summary()
    assert [row.name for row in before] == [name for name, _ in model.named_parameters()]
    by_name = {row.name: row for row in before}
    assert by_name["up.weight"].projected and by_name["up.weight"].side == "right" and by_name["up.weight"].rank == 4
    assert by_name["down.weight"].side == "left"
    assert not by_name["embed.weight"].projected and not by_name["head.weight"].projected
    assert by_name["embed.weight"].rank is None and by_name["embed.weight"].side is None
    train(model, optimizer, 1)
    after = optimizer.projection_summary()
    assert [row.state_bytes for row in after] == [row.state_bytes for row in before]
    assert after.state_bytes == optimizer_state_bytes(optimizer)
    params = dict(model.named_parameters())
    assert by_name["up.weight"].state_bytes == tensor_bytes(optimizer.state[params["up.weight"]])


def test_galore_rows_count_the_projection_matrix():
    model = make_model(d=16, hidden=40)
    optimizer = GaLoreAdamW(projected_groups(model, 4))
    expected = [row.state_bytes for row in optimizer.projection_summary()]
    train(model, optimizer, 1)
    assert [row.state_bytes for row in optimizer.projection_summary()] == expected
    up = next(row for row in optimizer.projection_summary() if row.shape == (40, 16))
    assert up.state_bytes == 2 * 40 * 4 * 4 + 16 * 4 * 4         # moments m×r and P n×r, fp32


def test_the_table_is_readable():
    model = make_model(d=16, hidden=40)
    text = str(DCTProjAdam(model.named_parameters(), rank=4).projection_summary())
    lines = text.splitlines()
    assert lines[0].split() == ["parameter", "shape", "projected", "rank", "side", "state", "bytes"]
    assert any(line.startswith("up.weight") and "40×16" in line and " yes " in line and "right" in line
               for line in lines)
    assert lines[-1].startswith("total: 8 parameters, 2 projected")


def test_meta_device_models_are_summarised_without_allocating():
    with torch.device("meta"):
        model = make_model(d=64, hidden=256, vocab=1000)
    summary = DCTProjAdam(model.named_parameters()).projection_summary()
    up = next(row for row in summary if row.name == "up.weight")
    assert up.rank == 16 and up.state_bytes == 2 * 256 * 16 * 4 + 16 * 8 + 4
