"""Sweep YAML files, the offline sweep runner, and the results comparison script."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]

from experiments.methods import info_for  # noqa: E402
from experiments.results import compare  # noqa: E402
from experiments.sweep import expand_grid, load_sweep, main, pretrain_argv  # noqa: E402

SWEEPS = sorted((REPO_ROOT / "experiments" / "sweeps").glob("*.yaml"))


def test_there_are_sweeps():
    assert {path.name for path in SWEEPS} >= {"lowrank_grid.yaml", "adamw_lr.yaml"}


@pytest.mark.parametrize("path", SWEEPS, ids=[path.name for path in SWEEPS])
def test_sweep_yaml_is_a_wandb_grid_over_pretrain_flags(path):
    raw = yaml.safe_load(path.read_text())
    # The keys `wandb sweep` reads: a grid, a metric the script logs, and a command that runs the module.
    assert raw["method"] == "grid"
    assert raw["metric"] == {"name": "val/loss", "goal": "minimize"}
    assert raw["command"] == ["${env}", "${interpreter}", "-m", "experiments.pretrain", "${args}"]
    sweep = load_sweep(path)  # every parameter is a flag of experiments.pretrain
    grid = expand_grid(sweep)
    sizes = [len(spec.get("values", [None])) for spec in sweep["parameters"].values()]
    assert len(grid) == math.prod(sizes) > 1
    assert len({json.dumps(point, sort_keys=True) for point in grid}) == len(grid)


def test_main_grid_covers_lr_rank_gap_and_optimizer():
    parameters = load_sweep(REPO_ROOT / "experiments" / "sweeps" / "lowrank_grid.yaml")["parameters"]
    for name in ("optimizer", "lr", "rank", "update_proj_gap"):
        assert len(parameters[name]["values"]) >= 2


def test_bad_sweeps_are_rejected(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("method: bayes\nparameters: {lr: {values: [1]}}\n")
    with pytest.raises(ValueError, match="grids only"):
        load_sweep(path)
    path.write_text("method: grid\nparameters: {learning_rate: {values: [1]}}\n")
    with pytest.raises(ValueError, match="'learning_rate' is not a flag"):
        load_sweep(path)
    path.write_text("method: grid\nparameters: {lr: {min: 0.1, max: 1}}\n")
    with pytest.raises(ValueError, match="needs 'value' or 'values'"):
        load_sweep(path)


def test_offline_runner_runs_every_grid_point(tmp_path):
    sweep = {
        "program": "experiments/pretrain.py",
        "method": "grid",
        "metric": {"name": "val/loss", "goal": "minimize"},
        "parameters": {
            "lr": {"values": [0.001, 0.01]},
            "optimizer": {"value": "adamw"},
            "model_config": {"value": "llama_micro"},
            "num_training_steps": {"value": 2},
        },
    }
    path = tmp_path / "micro.yaml"
    path.write_text(yaml.safe_dump(sweep))
    assert pretrain_argv({"lr": 0.01, "rank": 8}) == ["--lr=0.01", "--rank=8"]
    runs_dir = tmp_path / "runs"
    main(
        [
            str(path),
            "--runs_dir",
            str(runs_dir),
            "--wandb_mode",
            "disabled",
            "--",
            "--max_length",
            "32",
            "--batch_size",
            "2",
            "--eval_tokens",
            "256",
            "--save_every",
            "0",
            "--cache_dir",
            str(tmp_path / "cache"),
            "--device",
            "cpu",
        ]
    )
    summary = (runs_dir / "summary.md").read_text()
    assert "| lr=0.001 | 0 |" in summary and "| lr=0.01 | 0 |" in summary
    assert (runs_dir / "lr=0.01" / "metrics.jsonl").exists()


def test_compare_writes_table_and_plot(tmp_path):
    methods = ["adamw", "galore_torch_adamw", "sst"]
    compare.main(
        [
            "--methods",
            *methods,
            "--model_config",
            "llama_micro",
            "--num_training_steps",
            "4",
            "--batch_size",
            "4",
            "--max_length",
            "32",
            "--rank",
            "8",
            "--eval_every",
            "2",
            "--eval_tokens",
            "512",
            "--lr_factors",
            "0.5",
            "1",
            "--out",
            str(tmp_path / "out"),
            "--runs_dir",
            str(tmp_path / "runs"),
        ]
    )
    table = (tmp_path / "out" / "results.md").read_text()
    rows = json.loads((tmp_path / "out" / "results.json").read_text())
    ran = [row["key"] for row in rows]
    assert ran[:2] == ["adamw", "galore_torch_adamw"]
    assert "| AdamW (full rank) |" in table and "| galore_torch GaLoreAdamW (peer) |" in table
    assert "1.00x" in table  # optimizer state relative to AdamW
    for row in rows:
        assert len(row["lr_sweep"]) == 2 and row["curve"][-1][0] == 4
        assert row["final_val_loss"] == min(loss for _, loss in row["lr_sweep"])
    assert (tmp_path / "out" / "val_loss.png").stat().st_size > 0


def test_runner_commands_carry_each_flag_once(capsys):
    """The YAML's wandb_mode (online) and step count give way to the runner's --wandb_mode and the
    flags after "--" instead of appearing twice in a command."""
    main([str(REPO_ROOT / "experiments" / "sweeps" / "adamw_lr.yaml"), "--dry_run", "--wandb_mode", "disabled",
          "--", "--num_training_steps", "20", "--galore_scale", "0.5"])
    commands = [line.split("] ", 1)[1].split() for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    assert len(commands) == 4
    for command in commands:
        flags = [word.split("=", 1)[0] for word in command if word.startswith("--")]
        assert len(flags) == len(set(flags)), flags
        assert "--wandb_mode=disabled" in command and "--wandb_mode=online" not in command
        assert "--num_training_steps=500" not in command and command[-4:] == [
            "--num_training_steps", "20", "--galore_scale", "0.5"]


@pytest.mark.parametrize("key", [key for key in compare.METHODS if key.endswith("_int8")])
def test_compare_int8_methods_differ_from_their_base_only_by_weight_bits(key):
    base, int8 = compare.METHODS[key.removesuffix("_int8")], compare.METHODS[key]
    assert (int8.optimizer, int8.lr) == (base.optimizer, base.lr)
    assert int8.overrides == {**base.overrides, "weight_bits": 8}
    assert int8.title.startswith(base.title) and int8.title.endswith("int8 weights")
    assert info_for(int8.optimizer).int8_weights      # else --weight_bits 8 refuses the optimizer


def test_compare_int8_method_trains_with_int8_weights(tmp_path):
    compare.main(["--methods", "adamw_lib_int8", "--model_config", "llama_micro", "--num_training_steps", "2",
                  "--batch_size", "2", "--max_length", "16", "--eval_every", "2", "--eval_tokens", "256",
                  "--out", str(tmp_path / "out"), "--runs_dir", str(tmp_path / "runs")])
    (run,) = (tmp_path / "runs").iterdir()
    assert json.loads((run / "config.json").read_text())["weight_bits"] == 8
    (row,) = json.loads((tmp_path / "out" / "results.json").read_text())
    assert math.isfinite(row["final_val_loss"])


def test_compare_keeps_a_methods_plain_lr_while_lr_factors_scale_its_lr(tmp_path):
    """``apollo_mini_plain_lr`` overrides --plain_lr: each run of the sweep gets it as it is, beside the
    scaled --lr."""
    compare.main(["--methods", "apollo_mini_plain_lr", "--model_config", "llama_micro", "--num_training_steps", "2",
                  "--batch_size", "4", "--max_length", "32", "--eval_every", "0", "--eval_tokens", "512",
                  "--lr_factors", "0.5", "--out", str(tmp_path / "out"), "--runs_dir", str(tmp_path / "runs")])
    method = compare.METHODS["apollo_mini_plain_lr"]
    run_name = f"apollo_mini_plain_lr-lr{compare.format_lr(method.lr / 2)}-seed0"
    saved = json.loads((tmp_path / "runs" / run_name / "config.json").read_text())
    assert (saved["optimizer"], saved["lr"], saved["plain_lr"]) == ("apollo_mini", method.lr / 2, 1e-2)


def test_compare_dtype_flag_reaches_each_run_config(tmp_path):
    """--dtype bfloat16 reaches every run's config.json, the int8 run's (bf16 row scales) included;
    without the flag the runs keep float32."""
    compare.main(["--methods", "adamw_lib", "adamw_lib_int8", "--model_config", "llama_micro",
                  "--num_training_steps", "2", "--batch_size", "2", "--max_length", "16", "--eval_every", "2",
                  "--eval_tokens", "256", "--dtype", "bfloat16", "--out", str(tmp_path / "out"),
                  "--runs_dir", str(tmp_path / "runs")])
    configs = [json.loads((run / "config.json").read_text()) for run in sorted((tmp_path / "runs").iterdir())]
    assert [(config["dtype"], config["weight_bits"]) for config in configs] == [("bfloat16", None), ("bfloat16", 8)]
    assert "bfloat16 weights" in (tmp_path / "out" / "results.md").read_text()
    parser = argparse.ArgumentParser()
    compare.add_budget_flags(parser)
    assert compare.base_config(parser.parse_args([])).dtype == "float32"


@pytest.mark.parametrize("lr, text", [(1e-3, "1e-03"), (1.5e-3, "1.5e-03"), (2e-3, "2e-03"), (3.33e-3, "3.33e-03"),
                                      (0.01, "1e-02")])
def test_compare_names_each_lr_of_a_sweep_apart(lr, text):
    # one significant digit printed 1.5e-3 as 2e-03: two factors of a sweep shared a run folder's name
    assert compare.format_lr(lr) == text
