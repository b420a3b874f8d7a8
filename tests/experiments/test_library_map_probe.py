"""The library map probe of LOWBIT_4BIT.md §9: the library's 4-bit first moment on torchao's signed map
(16 levels, +0.8875 among them), its second moment and the 8-bit maps unchanged."""
import pytest
import torch

from experiments.bench import library_map_probe
from experiments.bench.lowbit_ablation import TORCHAO_SIGNED_4BIT_LEVELS
from lowrank_optim.moments.base import Moments
from lowrank_optim.quantization import MIN_QUANTIZED_NUMEL, maps, reference


@pytest.fixture
def patched(monkeypatch):
    """The probe's patch, undone after the test with the codebooks it built."""
    monkeypatch.setattr(maps, "quantization_map", maps.quantization_map)
    monkeypatch.setattr(reference, "quantization_map", reference.quantization_map)
    maps._codebook.cache_clear()
    yield library_map_probe.patch_signed_4bit_map
    maps._codebook.cache_clear()


def _first_moment_after_one_step(gradient: torch.Tensor) -> torch.Tensor:
    moments = Moments.of({}, tuple(gradient.shape), None, 4)
    moments.create(torch.float32, gradient.device)
    moments.step("torch", gradient, beta1=0.9, beta2=0.999, eps=1e-8, bias_correction1=0.1,
                 bias_correction2=0.001, step=1)
    return moments.load()[0]


def test_patched_library_stores_a_first_moment_on_torchaos_levels(patched):
    unsigned_before = maps.quantization_map(4, False)
    rows = -(-MIN_QUANTIZED_NUMEL // 128)          # large enough to be quantized
    gradient = torch.full((rows, 128), 0.01)
    gradient[:, 0] = 1.0                        # every block's absmax: m = 0.1
    gradient[:, 1] = 0.88                       # 0.88 of it: nearest library level 1.0, torchao's 0.8875
    before = _first_moment_after_one_step(gradient)

    maps._codebook.cache_clear()                # a fresh process, as the probe runs in
    patched()
    after = _first_moment_after_one_step(gradient)

    assert maps.codebook(4, True).levels.tolist() == pytest.approx(TORCHAO_SIGNED_4BIT_LEVELS.tolist())
    assert maps.codebook(4, True).fill_code == 7                        # the level 0: exact slot transport
    torch.testing.assert_close(maps.quantization_map(4, False), unsigned_before, rtol=0, atol=0)
    torch.testing.assert_close(before[:, 1], torch.full((rows,), 0.1))
    torch.testing.assert_close(after[:, 1], torch.full((rows,), 0.1 * 0.8875))


def test_patch_refuses_once_a_codebook_is_cached(patched):
    maps.codebook(4, True)
    with pytest.raises(RuntimeError, match="patch the map first"):
        patched()


def test_probe_runs_compare_and_records_itself_as_the_command(patched, tmp_path):
    """The probe patches the map (the fixture undoes it) and names itself as the command."""
    library_map_probe.main(["--methods", "adamw_lib_4bit", "--model_config", "llama_micro",
                            "--num_training_steps", "2", "--batch_size", "2", "--max_length", "16",
                            "--eval_every", "2", "--eval_tokens", "256", "--out", str(tmp_path / "out"),
                            "--runs_dir", str(tmp_path / "runs")])
    assert maps.quantization_map(4, True).numel() == 16
    assert "Command: `python -m experiments.bench.library_map_probe --methods adamw_lib_4bit " \
        in (tmp_path / "out" / "results.md").read_text(encoding="utf-8")
