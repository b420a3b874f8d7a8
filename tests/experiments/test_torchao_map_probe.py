"""The torchao map probe of LOWBIT_4BIT.md §8: torchao's AdamW4bit stores its first moment with the
patched signed map (lowest level −1.0, the other 15 unchanged) and rounds a negative block maximum to it."""
import pytest
import torch

from experiments.bench.torchao_map_probe import patch_signed_map

subclass_4bit = pytest.importorskip("torchao.optim.subclass_4bit", reason="torchao is not installed")
torchao_optim = pytest.importorskip("torchao.optim")


def _first_moment_after_one_step(gradient: torch.Tensor) -> torch.Tensor:
    weight = torch.nn.Parameter(torch.zeros_like(gradient))
    optimizer = torchao_optim.AdamW4bit([weight], lr=1e-3)
    weight.grad = gradient
    optimizer.step()
    return optimizer.state[weight]["exp_avg"]


def test_patched_map_stores_a_negative_block_maximum_exactly(monkeypatch):
    monkeypatch.setattr(subclass_4bit, "get_qmap_signed", subclass_4bit.get_qmap_signed)  # restored after
    original = subclass_4bit.get_qmap_signed()
    gradient = torch.full((64, 128), 0.01)
    gradient[:, 0] = -1.0                      # every block of 128 has its largest value negative
    before = _first_moment_after_one_step(gradient).dequantize()

    patched = patch_signed_map()
    after_state = _first_moment_after_one_step(gradient)
    after = after_state.dequantize()

    assert original[0] == pytest.approx(-0.8875) and patched == (-1.0, *original[1:])
    assert after_state.qmap.tolist() == pytest.approx(list(patched))
    torch.testing.assert_close(before[:, 0], torch.full((64,), -0.1 * 0.8875))    # m = (1 − β1)·g, shrunk
    torch.testing.assert_close(after[:, 0], torch.full((64,), -0.1))              # stored exactly
