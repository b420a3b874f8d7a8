"""End-to-end training runs of ``experiments.pretrain`` on CPU with the micro LLaMA.

Optimizers the library has not registered yet are skipped with a reason, not failed.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]

from experiments.args import parse_config  # noqa: E402
from experiments.checkpoint import (  # noqa: E402
    CONFIG_FILE,
    MODEL_FILE,
    OPTIMIZER_FILE,
    TEMPORARY_PREFIX,
    TRAINING_STATE_FILE,
    list_checkpoints,
    load_checkpoint,
)
from experiments.config import TrainConfig  # noqa: E402
from experiments.logging_utils import METRICS_FILE, read_metrics  # noqa: E402
from experiments.methods import available_methods  # noqa: E402
from experiments.pretrain import LOSS_PLOT, train  # noqa: E402

# The library's optimizers this suite expects; each is skipped while it is not registered.
EXPECTED_OPTIMIZERS = ("adamw", "galore_adamw", "dct_adamw", "sst_adamw", "galore_torch_adamw")
PROJECTED = ("galore_adamw", "dct_adamw")
# galore_torch keeps a Python projector object in its state: torch.load(weights_only=True) fails.
NOT_RESUMABLE = ("galore_torch_adamw",)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("token_cache")


def micro_config(save_dir: Path, cache_dir: Path, **overrides) -> TrainConfig:
    """A run of a few seconds: 2-layer width-32 LLaMA, 32-token sequences, byte tokenizer."""
    values = dict(
        model_config="llama_micro",
        optimizer="adamw",
        lr=3e-3,
        rank=8,
        update_proj_gap=2,
        sst_interval=2,
        max_length=32,
        batch_size=4,
        total_batch_size=8,
        num_training_steps=6,
        eval_every=3,
        eval_tokens=1024,
        save_every=0,
        save_dir=str(save_dir),
        cache_dir=str(cache_dir),
        wandb_mode="disabled",
        device="cpu",
    )
    values.update(overrides)
    return TrainConfig(**values)


def require_registered(optimizer: str) -> None:
    if optimizer not in available_methods():
        pytest.skip(f"optimizer {optimizer!r} is not registered in lowrank_optim yet")


def losses(save_dir: Path, key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in read_metrics(Path(save_dir) / METRICS_FILE) if key in r}


RUN_CASES = [(name, {"optimizer": name}) for name in sorted(set(available_methods()) | set(EXPECTED_OPTIMIZERS))]
RUN_CASES.append(("sltrain", {"optimizer": "adamw", "parameterization": "sltrain"}))
RUN_CASES += [(f"{name}_backward_projection", {"optimizer": name, "backward_projection": True}) for name in PROJECTED]


@pytest.mark.parametrize(("case", "overrides"), RUN_CASES, ids=[case for case, _ in RUN_CASES])
def test_few_step_run(case, overrides, tmp_path, cache_dir):
    require_registered(overrides["optimizer"])
    config = micro_config(tmp_path / "run", cache_dir, **overrides)
    result = train(config)
    train_losses = losses(tmp_path / "run", "train/loss")
    assert sorted(train_losses) == [1, 3, 6]  # the first, evaluation and last steps (log_every 10)
    assert all(math.isfinite(loss) for loss in train_losses.values())
    assert train_losses[6] < train_losses[1]
    assert sorted(losses(tmp_path / "run", "val/loss")) == [3, 6]
    assert math.isfinite(result.final_val_loss) and result.optimizer_state_bytes > 0
    records = read_metrics(tmp_path / "run" / METRICS_FILE)
    assert {"lr", "throughput/tokens_per_s", "memory/peak_bytes", "optimizer/state_bytes"} <= set(records[0])
    if overrides["optimizer"] in PROJECTED:
        refreshes = [r for r in records if "proj/captured" in r]
        assert refreshes, "projected optimizers log their projection health at refresh steps"
        assert all(0.0 <= r["proj/captured"] <= 1.0 + 1e-6 for r in refreshes)
    assert (tmp_path / "run" / LOSS_PLOT).stat().st_size > 0


RESUME_CASES = [
    ("adamw", {"optimizer": "adamw"}),
    ("galore_adamw", {"optimizer": "galore_adamw"}),
    ("dct_adamw", {"optimizer": "dct_adamw", "moments": "transport"}),
    ("sst_adamw", {"optimizer": "sst_adamw"}),
    ("sltrain", {"optimizer": "adamw", "parameterization": "sltrain"}),
    ("dct_adamw_backward_projection", {"optimizer": "dct_adamw", "backward_projection": True}),
    ("galore_adamw_backward_projection", {"optimizer": "galore_adamw", "backward_projection": True}),
]


@pytest.mark.parametrize(("case", "overrides"), RESUME_CASES, ids=[case for case, _ in RESUME_CASES])
def test_resume_reproduces_the_uninterrupted_losses(case, overrides, tmp_path, cache_dir):
    require_registered(overrides["optimizer"])
    full = tmp_path / "full"
    train(micro_config(full, cache_dir, num_training_steps=8, eval_every=2, save_every=4, **overrides))
    assert [step for step, _ in list_checkpoints(full)] == [4, 8]
    state = load_checkpoint(full / "model_4")  # weights_only=True throughout
    assert set(state["training_state"]) == {"progress", "scheduler", "data", "rng"}

    resumed_dir = tmp_path / "resumed"
    train(parse_config(["--continue_from", str(full / "model_4"), "--save_dir", str(resumed_dir)]))
    for key in ("train/loss", "val/loss"):
        expected = {step: loss for step, loss in losses(full, key).items() if step > 4}
        assert losses(resumed_dir, key) == expected  # identical values, not merely close
    resumed_state = torch.load(resumed_dir / "model_8" / MODEL_FILE, weights_only=True)
    uninterrupted_state = torch.load(full / "model_8" / MODEL_FILE, weights_only=True)
    assert all(torch.equal(resumed_state[k], uninterrupted_state[k]) for k in uninterrupted_state)


KILL_SCRIPT = """
import pathlib, sys, time
import experiments.checkpoint as checkpoint
from experiments.pretrain import main

marker = pathlib.Path(sys.argv[1])
publish = checkpoint.publish

def publish_slowly(temporary, final):
    if final.name == "model_4":  # every file is written, the folder is not renamed yet
        marker.write_text(str(temporary))
        time.sleep(120)
    publish(temporary, final)

checkpoint.publish = publish_slowly
main(sys.argv[2:])
"""


def test_sigkill_during_a_save_leaves_no_partial_checkpoint_and_resume_works(tmp_path, cache_dir):
    save_dir = tmp_path / "run"
    config = micro_config(save_dir, cache_dir, num_training_steps=6, save_every=2, eval_every=2)
    argv = [
        "--model_config",
        config.model_config,
        "--optimizer",
        "adamw",
        "--lr",
        str(config.lr),
        "--max_length",
        "32",
        "--batch_size",
        "4",
        "--total_batch_size",
        "8",
        "--num_training_steps",
        "6",
        "--eval_every",
        "2",
        "--eval_tokens",
        "1024",
        "--save_every",
        "2",
        "--save_dir",
        str(save_dir),
        "--cache_dir",
        str(cache_dir),
        "--wandb_mode",
        "disabled",
        "--device",
        "cpu",
    ]
    marker = tmp_path / "saving"
    log = tmp_path / "child.log"
    with log.open("w") as output:
        child = subprocess.Popen(
            [sys.executable, "-c", KILL_SCRIPT, str(marker), *argv], cwd=REPO_ROOT, stdout=output, stderr=output
        )
        try:
            deadline = time.monotonic() + 120
            while not marker.exists():
                assert child.poll() is None, f"the run ended before its second save:\n{log.read_text()[-3000:]}"
                assert time.monotonic() < deadline, "timed out waiting for the second save"
                time.sleep(0.05)
            os.kill(child.pid, signal.SIGKILL)
        finally:
            child.kill()
            child.wait()
    assert child.returncode == -signal.SIGKILL

    assert [step for step, _ in list_checkpoints(save_dir)] == [2]  # model_4 never appeared
    assert list(save_dir.glob(f"{TEMPORARY_PREFIX}4-*")), "the interrupted save stays hidden in its temp folder"
    complete = save_dir / "model_2"
    assert {p.name for p in complete.iterdir()} == {MODEL_FILE, OPTIMIZER_FILE, TRAINING_STATE_FILE, CONFIG_FILE}
    assert load_checkpoint(complete)["training_state"]["progress"]["step"] == 2

    train(parse_config(["--continue_from", str(save_dir)]))  # a save_dir resumes from its latest checkpoint
    assert [step for step, _ in list_checkpoints(save_dir)] == [2, 4, 6]
    assert not list(save_dir.glob(f"{TEMPORARY_PREFIX}*"))
    reference = tmp_path / "reference"
    train(dataclasses.replace(config, save_dir=str(reference)))
    assert losses(save_dir, "train/loss") == losses(reference, "train/loss")  # steps 3-4 were redone exactly


def test_wandb_offline_run_files_appear_in_the_run_dir(tmp_path, cache_dir):
    pytest.importorskip("wandb")
    save_dir = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "experiments.pretrain",
        "--model_config",
        "llama_micro",
        "--optimizer",
        "adamw",
        "--max_length",
        "32",
        "--batch_size",
        "4",
        "--num_training_steps",
        "3",
        "--eval_every",
        "3",
        "--eval_tokens",
        "512",
        "--save_every",
        "0",
        "--save_dir",
        str(save_dir),
        "--cache_dir",
        str(cache_dir),
        "--wandb_mode",
        "offline",
        "--device",
        "cpu",
    ]
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    completed = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert completed.returncode == 0, completed.stderr[-3000:]
    runs = list((save_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert [p.stat().st_size > 0 for p in runs[0].glob("run-*.wandb")] == [True]
    assert "final val loss" in completed.stdout


@pytest.mark.parametrize("mode", [[], ["--optimizer", "dct_adamw", "--backward_projection"]],
                         ids=["ddp", "backward_projection"])
def test_torchrun_two_processes_match_one_process_with_accumulation(tmp_path, cache_dir, mode):
    """Plain DDP, and --backward_projection, where the optimizer all-reduces the projected
    gradients itself (no DDP wrapper): accumulation 2 on each of 2 ranks equals 1 process."""
    common = [
        "--model_config",
        "llama_micro",
        "--optimizer",
        "adamw",
        *mode,
        "--max_length",
        "32",
        "--batch_size",
        "2",
        "--total_batch_size",
        "8",
        "--num_training_steps",
        "3",
        "--eval_every",
        "3",
        "--eval_tokens",
        "1024",
        "--save_every",
        "3",
        "--cache_dir",
        str(cache_dir),
        "--wandb_mode",
        "disabled",
        "--device",
        "cpu",
    ]
    ddp_dir = tmp_path / "ddp"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "experiments.pretrain",
        *common,
        "--save_dir",
        str(ddp_dir),
    ]
    completed = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    ddp_config = TrainConfig.load_json(ddp_dir / "model_3" / CONFIG_FILE)
    assert (ddp_config.world_size, ddp_config.gradient_accumulation) == (2, 2)

    single_dir = tmp_path / "single"
    train(parse_config([*common, "--save_dir", str(single_dir)]))
    for key in ("train/loss", "val/loss"):
        ddp, single = losses(ddp_dir, key), losses(single_dir, key)
        assert ddp.keys() == single.keys()
        assert all(math.isclose(ddp[s], single[s], rel_tol=1e-5) for s in ddp)  # reduction order differs
