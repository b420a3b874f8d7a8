"""``experiments.pretrain --fsdp`` under ``torchrun`` (2 CPU processes, gloo): FSDP2 training,
sharded checkpoints (torch.distributed.checkpoint) and exact resume, against the DDP run."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from experiments.checkpoint import SHARDED_DIR
from experiments.distributed import check_fsdp_supported, setup_distributed
from experiments.logging_utils import METRICS_FILE, read_metrics

REPO_ROOT = Path(__file__).resolve().parents[2]


def _torchrun(save_dir: Path, cache_dir: Path, *flags: str) -> None:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "experiments.pretrain",
        "--model_config", "llama_micro", "--optimizer", "dct_adamw", "--rank", "8", "--update_proj_gap", "2",
        "--max_length", "32", "--batch_size", "2", "--total_batch_size", "8", "--num_training_steps", "4",
        "--eval_every", "2", "--eval_tokens", "1024", "--save_every", "2", "--wandb_mode", "disabled",
        "--device", "cpu", "--cache_dir", str(cache_dir), "--save_dir", str(save_dir), *flags,
    ]
    completed = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]


def _losses(save_dir: Path, key: str) -> dict[int, float]:
    return {row["step"]: row[key] for row in read_metrics(save_dir / METRICS_FILE) if key in row}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fsdp_runs")
    cache_dir = root / "cache"
    dirs = {name: root / name for name in ("fsdp", "resumed", "ddp")}
    _torchrun(dirs["fsdp"], cache_dir, "--fsdp")
    _torchrun(dirs["resumed"], cache_dir, "--continue_from", str(dirs["fsdp"] / "model_2"))
    _torchrun(dirs["ddp"], cache_dir)
    return dirs


def test_fsdp_checkpoints_are_sharded(runs):
    for step in (2, 4):
        folder = runs["fsdp"] / f"model_{step}"
        assert sorted(p.name for p in (folder / SHARDED_DIR).glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
        assert (folder / "training_state.pt").is_file() and not (folder / "model.pt").exists()


def test_fsdp_resume_from_a_sharded_checkpoint_equals_uninterrupted(runs):
    for key in ("train/loss", "val/loss"):
        expected = {step: loss for step, loss in _losses(runs["fsdp"], key).items() if step > 2}
        assert _losses(runs["resumed"], key) == expected


def test_fsdp_trains_like_ddp(runs):
    for key in ("train/loss", "val/loss"):
        fsdp, ddp = _losses(runs["fsdp"], key), _losses(runs["ddp"], key)
        assert fsdp.keys() == ddp.keys() and len(fsdp) >= 2
        assert all(math.isclose(fsdp[s], ddp[s], rel_tol=1e-5) for s in fsdp), (fsdp, ddp)  # reduction order


@pytest.mark.parametrize("optimizer, parameterization", [("sst_adamw", "sst"), ("adamw", "sltrain"),
                                                         ("galore_torch_adamw", "dense")])
def test_fsdp_refuses_what_it_cannot_shard(optimizer, parameterization):
    with pytest.raises(ValueError, match=f"--fsdp: trains .*got optimizer '{optimizer}'"):
        check_fsdp_supported(optimizer, parameterization)


def test_fsdp_outside_torchrun_is_an_error(monkeypatch):
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(ValueError, match="--fsdp: needs a process group: launch with torchrun"):
        setup_distributed("cpu", fsdp=True)
