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


def test_probe_runs_compare_and_records_itself_as_the_command(monkeypatch, tmp_path):
    """The probe's results name the probe, not ``compare``, as the command that made them."""
    from experiments.bench import torchao_map_probe

    monkeypatch.setattr(subclass_4bit, "get_qmap_signed", subclass_4bit.get_qmap_signed)  # restored after
    torchao_map_probe.main(["--methods", "torchao_adamw4bit", "--model_config", "llama_micro",
                            "--num_training_steps", "2", "--batch_size", "2", "--max_length", "16",
                            "--eval_every", "2", "--eval_tokens", "256", "--out", str(tmp_path / "out"),
                            "--runs_dir", str(tmp_path / "runs")])
    assert subclass_4bit.get_qmap_signed()[0] == -1.0
    assert "Command: `python -m experiments.bench.torchao_map_probe --methods torchao_adamw4bit " \
        in (tmp_path / "out" / "results.md").read_text(encoding="utf-8")
