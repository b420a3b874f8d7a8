"""SLTrain's sparse support: size, shape, determinism from (seed, name), across processes."""

import hashlib
import os
import re
import subprocess
import sys

import pytest
import torch

from lowrank_optim.sltrain import sample_support, support_size
from lowrank_optim.sltrain.support import support_generator_seed, support_index_dtype

LLAMA_NAMES = (
    "model.layers.0.self_attn.q_proj",
    "model.layers.0.mlp.up_proj",
    "model.layers.1.self_attn.q_proj",
)


@pytest.mark.parametrize(
    "out_features, in_features, density, expected",
    [
        (10, 10, 0.29, 29),  # 0.29 * 100 is 28.999... in binary floating point
        (100, 100, 0.03, 300),
        (512, 512, 0.03, 7864),  # 7864.32
        (2048, 5461, 0.03, 335523),  # 335523.84
        (7, 5, 1.0, 35),
        (7, 5, 0.01, 0),
    ],
)
def test_support_size_is_floor_of_density_times_numel(out_features, in_features, density, expected):
    assert support_size(out_features, in_features, density) == expected


@pytest.mark.parametrize("out_features, in_features", [(37, 23), (64, 64), (5, 300)])
def test_support_is_sorted_distinct_in_range(out_features, in_features):
    support = sample_support(out_features, in_features, 0.1, seed=3, name="layer")
    assert support.shape == (support_size(out_features, in_features, 0.1),)
    assert support.dtype == torch.int32
    assert torch.all(support[1:] > support[:-1])  # sorted and distinct
    assert support.min() >= 0 and support.max() < out_features * in_features


def test_full_density_covers_every_entry():
    support = sample_support(6, 9, 1.0, seed=0, name="full")
    assert torch.equal(support.long(), torch.arange(54))


def test_index_dtype_is_int32_exactly_while_every_flat_index_fits():
    assert support_index_dtype(2**31) == torch.int32  # largest index 2**31 - 1
    assert support_index_dtype(2**31 + 1) == torch.int64


def test_support_is_deterministic_in_seed_and_name():
    first = sample_support(40, 50, 0.05, seed=11, name="a.attn")
    assert torch.equal(first, sample_support(40, 50, 0.05, seed=11, name="a.attn"))
    assert not torch.equal(first, sample_support(40, 50, 0.05, seed=12, name="a.attn"))
    assert not torch.equal(first, sample_support(40, 50, 0.05, seed=11, name="b.attn"))


def test_generator_seed_is_pinned():
    # First 63 bits (little-endian) of BLAKE2b-64("sltrain-support|{seed}|{name}"). A change of the
    # derivation changes every support: checkpoints still load their stored supports, but freshly
    # converted models (new ranks, new runs) would no longer match old ones, so it must not drift.
    assert support_generator_seed(0, "model.layers.0.self_attn.q_proj") == 8651223646443322127
    assert support_generator_seed(1, "model.layers.0.self_attn.q_proj") == 6880095006364655889


def _supports_digest() -> str:
    digest = hashlib.sha256()
    for name in LLAMA_NAMES:
        digest.update(sample_support(96, 80, 0.03, seed=7, name=name).numpy().tobytes())
    return digest.hexdigest()


def test_support_is_identical_across_processes():
    script = (
        "import hashlib\n"
        "from lowrank_optim.sltrain import sample_support\n"
        "digest = hashlib.sha256()\n"
        f"for name in {LLAMA_NAMES!r}:\n"
        "    digest.update(sample_support(96, 80, 0.03, seed=7, name=name).numpy().tobytes())\n"
        "print(digest.hexdigest())\n"
    )
    # Different hash salts: a support derived from Python's hash() would differ between these two.
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", script],
            env={**os.environ, "PYTHONHASHSEED": salt},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for salt in ("1", "2")
    ]
    outputs = []
    for process in processes:
        stdout, stderr = process.communicate(timeout=60)
        assert process.returncode == 0, stderr
        outputs.append(stdout.strip())
    assert outputs[0] == outputs[1] == _supports_digest()


@pytest.mark.parametrize("density", [0, 0.0, -0.1, 1.5, float("nan"), float("inf"), True, "0.1"])
def test_bad_density_is_named(density):
    with pytest.raises(ValueError, match=re.escape(f"Invalid density: {density!r}")):
        support_size(10, 10, density)


@pytest.mark.parametrize("seed", [1.5, "0", None, True])
def test_bad_seed_is_named(seed):
    with pytest.raises(ValueError, match="Invalid seed"):
        sample_support(10, 10, 0.1, seed=seed, name="x")
