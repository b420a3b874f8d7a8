"""The simulated schemes of experiments/bench/lowbit_ablation.py: the ``floor`` map is the ``lin``
map's lowest level without its rounding; the ``tao`` map rounds to torchao's signed 4-bit levels."""
import torch

from experiments.bench.lowbit_ablation import fake


def test_floor_raises_the_values_below_a_sixteenth_of_their_block_absmax_and_keeps_the_rest():
    v = torch.rand(3, 256, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).pow(4)
    floored = fake(v, "block:128:floor", "flat", signed=False)
    absmax = v.view(3, 2, 128).amax(dim=-1).repeat_interleave(128, dim=1)
    low = v < absmax / 16
    assert low.any() and (~low).any()
    torch.testing.assert_close(floored[low], (absmax / 16)[low], rtol=0, atol=0)
    torch.testing.assert_close(floored[~low], v[~low], rtol=0, atol=0)


def test_the_linear_map_stores_a_value_far_below_its_floor_at_the_floor():
    v = torch.tensor([1.0, 1e-4, 0.5], dtype=torch.float64)
    rounded = fake(v, "block:128:lin", "flat", signed=False)
    floored = fake(v, "block:128:floor", "flat", signed=False)
    assert rounded[1] == floored[1] == 1 / 16


def test_the_tao_map_rounds_the_first_moment_to_its_nearest_level_and_keeps_a_positive_absmax():
    m = torch.tensor([1.0, 0.8, -0.9, -0.5, 0.0], dtype=torch.float64)
    rounded = fake(m, "block:128:tao", "flat", signed=True)
    torch.testing.assert_close(rounded, torch.tensor([1.0, 0.8875, -0.8875, -0.4375, 0.0], dtype=torch.float64))
