"""Run folders: a run never writes into another run's folder, never overwrites a checkpoint, never
repeats a metrics row; ``--keep_last``; ``--save_every 0`` / ``--eval_every 0``; Ctrl-C."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from support.cli import refusal

from experiments.checkpoint import list_checkpoints
from experiments.logging_utils import METRICS_FILE
from experiments.pretrain import LOSS_PLOT, main
from experiments.run_folder import prune_checkpoints

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("token_cache")


def micro_flags(cache_dir: Path, steps: int = 4, save_every: int = 2, eval_every: int = 2) -> list[str]:
    return [
        "--model_config", "llama_micro", "--optimizer", "adamw", "--lr", "3e-3", "--max_length", "32",
        "--batch_size", "4", "--num_training_steps", str(steps), "--eval_every", str(eval_every),
        "--eval_tokens", "256", "--save_every", str(save_every), "--log_every", "1", "--wandb_mode", "disabled",
        "--device", "cpu", "--cache_dir", str(cache_dir),
    ]  # fmt: skip


def rows(folder: Path) -> list[dict]:
    lines = (folder / METRICS_FILE).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def repeated(folder: Path) -> list[tuple[int, str]]:
    """``(step, key)`` pairs logged more than once in the folder's metrics.jsonl."""
    counts = Counter((row["step"], key) for row in rows(folder) for key in row if key != "step")
    return [pair for pair, count in counts.items() if count > 1]


def digest(folder: Path) -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(folder.iterdir())}


def test_resume_under_a_new_run_name_leaves_the_old_run_untouched(cache_dir, tmp_path, monkeypatch):
    """The issue's command: ``--continue_from runs/t/model_2 --run_name t_resumed`` once wrote into runs/t."""
    monkeypatch.chdir(tmp_path)
    main([*micro_flags(cache_dir), "--run_name", "t"])
    old = tmp_path / "runs" / "t"
    before = {"model_4": digest(old / "model_4"), METRICS_FILE: (old / METRICS_FILE).read_text()}

    main(["--continue_from", str(old / "model_2"), "--run_name", "t_resumed"])
    assert {"model_4": digest(old / "model_4"), METRICS_FILE: (old / METRICS_FILE).read_text()} == before
    new = tmp_path / "runs" / "t_resumed"
    assert [step for step, _ in list_checkpoints(new)] == [4]
    assert sorted({row["step"] for row in rows(new)}) == [3, 4]  # it continues from step 2
    assert repeated(new) == [] and repeated(old) == []
    # the same values as the uninterrupted run (identical, not merely close)
    old_losses = {row["step"]: row["val/loss"] for row in rows(old) if "val/loss" in row and row["step"] > 2}
    assert {row["step"]: row["val/loss"] for row in rows(new) if "val/loss" in row} == old_losses


def test_resuming_into_a_folder_with_later_checkpoints_is_refused(cache_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    main([*micro_flags(cache_dir), "--run_name", "t"])
    old = tmp_path / "runs" / "t"
    before = digest(old / "model_4")
    assert refusal(["--continue_from", str(old / "model_2")], capsys) == (
        f"error: --continue_from: {old} has checkpoints after model_2 (model_4) that resuming into it would "
        f"overwrite; resume from its latest (--continue_from {old}) or into a new folder (add --run_name NAME)"
    )
    assert digest(old / "model_4") == before


def test_a_fresh_run_into_a_run_folder_is_refused(cache_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    main([*micro_flags(cache_dir), "--run_name", "t"])
    assert refusal([*micro_flags(cache_dir), "--run_name", "t"], capsys) == (
        "error: --run_name: runs/t already holds a run (config.json, metrics.jsonl, model_2, model_4); resume it "
        "with --continue_from runs/t, or pick another --run_name / --save_dir"
    )
    other = tmp_path / "other"
    main([*micro_flags(cache_dir), "--save_dir", str(other), "--num_training_steps", "2"])
    line = refusal(["--continue_from", "runs/t/model_2", "--save_dir", str(other)], capsys)
    assert line.startswith(f"error: --save_dir: {other} holds another run (")


def test_resume_in_place_after_a_crash_continues_metrics_without_repeats(cache_dir, tmp_path):
    """A run that died after logging steps 3-4 but before saving model_4 is resumed in its folder:
    the rows after model_2 are logged again, once."""
    folder = tmp_path / "run"
    main([*micro_flags(cache_dir), "--save_dir", str(folder)])
    uninterrupted = rows(folder)
    for path in (folder / "model_4").iterdir():  # as if the process died before this save
        path.unlink()
    (folder / "model_4").rmdir()

    main(["--continue_from", str(folder)])
    assert repeated(folder) == []

    def losses(records):  # throughput and memory differ between processes; the losses are identical
        return [{k: v for k, v in r.items() if k in ("step", "train/loss", "val/loss")} for r in records]

    assert losses(rows(folder)) == losses(uninterrupted)
    assert [step for step, _ in list_checkpoints(folder)] == [2, 4]


@pytest.mark.parametrize(("keep", "expected"), [(2, [5, 6]), (1, [6]), (0, [1, 2, 3, 4, 5, 6])])
def test_keep_last_deletes_the_oldest_and_never_the_newest(keep, expected, cache_dir, tmp_path):
    folder = tmp_path / "run"
    main([*micro_flags(cache_dir, steps=6, save_every=1), "--save_dir", str(folder), "--keep_last", str(keep)])
    assert [step for step, _ in list_checkpoints(folder)] == expected


def test_prune_checkpoints_keeps_the_newest(tmp_path):
    for step in (10, 2, 30):
        (tmp_path / f"model_{step}").mkdir()
        (tmp_path / f"model_{step}" / "config.json").write_text("{}")
    assert [path.name for path in prune_checkpoints(tmp_path, 1)] == ["model_2", "model_10"]
    assert [step for step, _ in list_checkpoints(tmp_path)] == [30]
    assert prune_checkpoints(tmp_path, 0) == [] and prune_checkpoints(tmp_path, 1) == []


def test_zero_periods_mean_only_at_the_end(cache_dir, tmp_path):
    folder = tmp_path / "run"
    main([*micro_flags(cache_dir, steps=3, save_every=0, eval_every=0), "--save_dir", str(folder)])
    assert [step for step, _ in list_checkpoints(folder)] == [3]
    assert [row["step"] for row in rows(folder) if "val/loss" in row] == [3]


def test_ctrl_c_saves_a_checkpoint_and_the_plot_and_exits_with_one_line(cache_dir, tmp_path):
    folder = tmp_path / "run"
    argv = [*micro_flags(cache_dir, steps=100_000, save_every=0, eval_every=0), "--save_dir", str(folder)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen(
        [sys.executable, "-m", "experiments.pretrain", *argv],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not ((folder / METRICS_FILE).exists() and len(rows(folder)) >= 3):
            assert child.poll() is None and time.monotonic() < deadline, "the run did not start training"
            time.sleep(0.05)
        child.send_signal(signal.SIGINT)
        _, stderr = child.communicate(timeout=120)
    finally:
        child.kill()
    assert child.returncode == 130
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    checkpoints = list_checkpoints(folder)
    assert len(checkpoints) == 1
    step, checkpoint = checkpoints[0]
    assert last == (
        f"interrupted: stopped at step {step} of 100000; checkpoint {checkpoint}, plot {folder / LOSS_PLOT}; resume "
        f"with --continue_from {folder}"
    )
    assert (folder / LOSS_PLOT).stat().st_size > 0
    assert max(row["step"] for row in rows(folder)) == step
