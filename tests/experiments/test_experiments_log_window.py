"""The step loop reads training metrics back from the device only at log steps (``--log_every``)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import experiments.pretrain as pretrain
from experiments.config import TrainConfig
from experiments.distributed import DistributedContext
from experiments.log_window import LogWindow
from experiments.logging_utils import METRICS_FILE, read_metrics
from experiments.methods import available_methods
from experiments.pretrain import logs_after, train

SINGLE_PROCESS = DistributedContext(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


def test_log_steps_are_every_log_every_plus_first_eval_checkpoint_and_last():
    config = TrainConfig(log_every=4, eval_every=6, save_every=5, num_training_steps=13)
    assert [step for step in range(1, 14) if logs_after(step, config)] == [1, 4, 5, 6, 8, 10, 12, 13]
    never = TrainConfig(log_every=100, eval_every=0, save_every=0, num_training_steps=7)
    assert [step for step in range(1, 8) if logs_after(step, never)] == [1, 7]


def test_window_means_the_loss_and_times_all_but_the_warm_up_step():
    window = LogWindow(torch.device("cpu"))
    window.add(torch.tensor(4.0), tokens=100)
    window.end_warmup()
    window.add(torch.tensor(2.0), tokens=100)
    window.note_refresh(2, {"proj/captured": torch.tensor(0.25)})
    window.note_refresh(3, {})  # a step without a refresh leaves the last one in place
    window.add(torch.tensor(3.0), tokens=100)
    summary = window.close(SINGLE_PROCESS)
    assert summary.loss == 3.0 and summary.tokens_per_second > 0
    assert summary.projection == {"proj/captured": 0.25, "proj/refresh_step": 2}
    assert window.timed_tokens == 200  # the first step is warm-up
    window.reset()
    window.add(torch.tensor(1.0), tokens=50)
    assert window.close(SINGLE_PROCESS).projection == {}
    assert window.timed_tokens == 250 and window.run_tokens_per_second() == 250 / window.timed_seconds
    assert math.isnan(LogWindow(torch.device("cpu")).run_tokens_per_second())


def micro_run(save_dir: Path, cache_dir: Path, log_every: int) -> list[dict]:
    train(
        TrainConfig(
            model_config="llama_micro",
            optimizer="dct_adamw",
            rank=8,
            update_proj_gap=3,
            max_length=32,
            batch_size=4,
            num_training_steps=8,
            log_every=log_every,
            eval_every=0,
            eval_tokens=512,
            save_every=0,
            save_dir=str(save_dir),
            cache_dir=str(cache_dir),
            wandb_mode="disabled",
            device="cpu",
        )
    )
    return [record for record in read_metrics(save_dir / METRICS_FILE) if "train/loss" in record]


def test_logged_loss_is_the_mean_over_the_window_and_reads_happen_at_log_steps_only(tmp_path, monkeypatch):
    if "dct_adamw" not in available_methods():
        pytest.skip("optimizer 'dct_adamw' is not registered in lowrank_optim yet")
    every_step = {record["step"]: record for record in micro_run(tmp_path / "every", tmp_path / "cache", 1)}
    assert sorted(every_step) == list(range(1, 9))

    reads = {"close": 0, "state_bytes": 0}
    close, state_bytes = LogWindow.close, pretrain.optimizer_state_bytes

    def counted_close(self, context):
        reads["close"] += 1
        return close(self, context)

    def counted_state_bytes(optimizer):
        reads["state_bytes"] += 1
        return state_bytes(optimizer)

    monkeypatch.setattr(LogWindow, "close", counted_close)
    monkeypatch.setattr(pretrain, "optimizer_state_bytes", counted_state_bytes)
    windows = micro_run(tmp_path / "windows", tmp_path / "cache", 4)
    assert [record["step"] for record in windows] == [1, 4, 8]
    assert reads == {"close": 3, "state_bytes": 3 + 1}  # one per log, and the run's summary

    for record, steps in zip(windows, ([1], [2, 3, 4], [5, 6, 7, 8]), strict=True):
        mean = sum(every_step[step]["train/loss"] for step in steps) / len(steps)
        assert record["train/loss"] == pytest.approx(mean, rel=1e-6)  # a float32 sum on the device
        assert record["optimizer/state_bytes"] == every_step[steps[-1]]["optimizer/state_bytes"] > 0
        refreshes = [step for step in steps if "proj/captured" in every_step[step]]
        if refreshes:  # the latest refresh of the window, with its step
            assert record["proj/refresh_step"] == refreshes[-1]
            assert record["proj/captured"] == every_step[refreshes[-1]]["proj/captured"]
        else:
            assert "proj/captured" not in record
    assert any("proj/refresh_step" in record for record in windows)
