"""Flags, config round trips, resolution and learning-rate schedules of ``experiments``."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from experiments.args import build_parser, config_to_argv, parse_config  # noqa: E402
from experiments.config import (  # noqa: E402
    TrainConfig,
    check_values,
    flag_fields,
    parse_number,
    parse_token_count,
    resolve,
)
from experiments.errors import UsageError  # noqa: E402
from experiments.methods import available_methods  # noqa: E402
from experiments.schedulers import WarmupSchedule, build_scheduler  # noqa: E402


def test_no_flags_is_the_default_main_run():
    config = parse_config([])
    assert config == TrainConfig()
    assert config.optimizer == "dct_adamw"
    assert config.model_config == "llama_tiny"
    assert config.dataset == "shakespeare"


def test_galore_flag_names_and_alias():
    config = parse_config(
        [
            "--model_config",
            "llama_60m",
            "--optimizer",
            "galore_adamw",
            "--lr",
            "0.01",
            "--rank",
            "128",
            "--update_proj_gap",
            "200",
            "--galore_scale",
            "0.25",
            "--proj_type",
            "std",
            "--batch_size",
            "64",
            "--total_batch_size",
            "512",
            "--max_length",
            "256",
            "--num_training_steps",
            "10000",
            "--warmup_steps",
            "1000",
            "--dtype",
            "bfloat16",
            "--grad_clipping",
            "0.0",
            "--eval_every",
            "1000",
            "--save_every",
            "1000",
            "--weight_decay",
            "0.0",
            "--scheduler",
            "cosine",
            "--min_lr_ratio",
            "0.1",
        ]
    )
    assert (config.rank, config.scale, config.total_batch_size, config.dtype) == (128, 0.25, 512, "bfloat16")
    assert parse_config(["--scale", "0.5"]).scale == 0.5


def test_rank_accepts_int_or_fraction():
    assert parse_number("32") == 32 and isinstance(parse_number("32"), int)
    assert parse_number("0.25") == 0.25
    assert parse_config(["--rank", "0.25"]).rank == 0.25


def test_token_counts():
    assert parse_token_count("100M") == 100_000_000
    assert parse_token_count("1.5B") == 1_500_000_000
    assert parse_token_count("64K") == 64_000
    assert parse_token_count("4096") == 4096


def test_config_round_trips_through_json_and_argv(tmp_path):
    config = TrainConfig(
        optimizer="galore_adamw",
        lr=0.0123,
        rank=0.25,
        betas=[0.9, 0.95],
        eps=1e-7,
        score="l1",
        target_modules=["attn"],
        optimizer_kwargs={"moments_dtype": None, "transform": "matmul"},
        max_train_tokens="10M",
        save_dir=str(tmp_path / "run"),
    )
    config.save_json(tmp_path / "config.json")
    assert TrainConfig.load_json(tmp_path / "config.json") == config
    assert parse_config(config_to_argv(config)) == config
    resolved = resolve(config, world_size=1)
    resolved.save_json(tmp_path / "resolved.json")
    assert TrainConfig.load_json(tmp_path / "resolved.json") == resolved


def test_unknown_config_key_is_rejected():
    with pytest.raises(ValueError, match="unknown config keys"):
        TrainConfig.from_dict({"learning_rate": 1.0})


def test_resolve_derives_accumulation_steps_and_warmup():
    config = resolve(TrainConfig(batch_size=4, total_batch_size=32, num_training_steps=500), world_size=2)
    assert (config.gradient_accumulation, config.world_size, config.warmup_steps) == (4, 2, 50)
    assert config.save_dir.endswith(config.run_name) and config.cache_dir
    budget = resolve(TrainConfig(batch_size=8, max_length=128, max_train_tokens="1M"), world_size=1)
    assert budget.num_training_steps == -(-1_000_000 // (8 * 128))
    with pytest.raises(UsageError, match="--total_batch_size: expected a multiple of"):
        resolve(TrainConfig(batch_size=3, total_batch_size=8), world_size=1)


def test_continue_from_uses_saved_config_and_explicit_overrides(tmp_path):
    folder = tmp_path / "run" / "model_10"
    folder.mkdir(parents=True)
    saved = resolve(TrainConfig(optimizer="adamw", lr=0.02, save_dir=str(tmp_path / "run")), world_size=1)
    saved.save_json(folder / "config.json")
    resumed = parse_config(["--continue_from", str(folder), "--num_training_steps", "999"])
    assert resumed.lr == 0.02 and resumed.optimizer == "adamw" and resumed.run_name == saved.run_name
    assert resumed.num_training_steps == 999 and resumed.continue_from == str(folder)
    # A save_dir resolves to its latest checkpoint.
    assert parse_config(["--continue_from", str(tmp_path / "run")]).lr == 0.02


def test_every_flag_has_help_and_parser_covers_all_fields():
    actions = {action.dest: action for action in build_parser()._actions if action.dest != "help"}
    flag_names = {f.name for f in dataclasses.fields(TrainConfig) if not f.metadata.get("derived")}
    assert set(actions) == flag_names
    assert all(action.help for action in actions.values())


def test_every_numeric_flag_declares_the_values_it_accepts():
    numeric = [f.name for f in flag_fields() if f.metadata.get("type") in (int, float, parse_number, parse_token_count)]
    assert len(numeric) > 20 and all("valid" in f.metadata for f in flag_fields() if f.name in numeric)
    check_values(TrainConfig())  # the defaults pass
    with pytest.raises(UsageError, match=r"^--target_modules: expected a list of values, got \[\]$"):
        check_values(TrainConfig(target_modules=[]))
    with pytest.raises(UsageError, match=r"^--fsdp: expected a bool value, got 'yes'$"):
        check_values(TrainConfig(fsdp="yes"))


@pytest.mark.parametrize("name", ["cosine", "linear", "constant"])
def test_schedule_warms_up_then_decays_to_min_ratio(name):
    schedule = WarmupSchedule(name, warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    assert schedule(0) == pytest.approx(1 / 11)
    assert schedule(10) == pytest.approx(1.0)
    end = {"cosine": 0.1, "linear": 0.1, "constant": 1.0}[name]
    assert schedule(110) == pytest.approx(end)
    values = [schedule(step) for step in range(10, 111)]
    assert all(a >= b - 1e-12 for a, b in zip(values, values[1:], strict=False))


def test_scheduler_state_loads_with_weights_only(tmp_path):
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1.0)
    scheduler = build_scheduler(optimizer, "cosine", 5, 50, 0.1)
    for _ in range(7):
        optimizer.step()
        scheduler.step()
    torch.save(scheduler.state_dict(), tmp_path / "s.pt")
    fresh = build_scheduler(torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1.0), "cosine", 5, 50, 0.1)
    fresh.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    assert fresh.get_last_lr() == scheduler.get_last_lr()


def test_scheduler_rejects_bad_values():
    with pytest.raises(ValueError, match="unknown scheduler 'step'"):
        WarmupSchedule("step", 0, 10, 0.1)
    with pytest.raises(ValueError, match="warmup_steps 20"):
        WarmupSchedule("cosine", 20, 10, 0.1)


def test_help_is_grouped_and_says_each_default_once(monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    text = build_parser().format_help()
    lines = text.splitlines()
    assert len(lines) < 130, len(lines)  # 192 lines before the groups and the shorter texts
    for section in ("model:", "optimizer:", "evaluation and checkpoints:", "logging:"):
        assert section in lines
    flat = " ".join(text.split())
    assert "(default: none)" not in flat and "default: none" not in flat
    assert all(line.count("(default") <= 1 for line in flat.split("--"))
    assert "--fsdp, --no-fsdp" in flat and "--step_in_backward, --no-step_in_backward" in flat
    assert "[STEP_IN_BACKWARD]" not in text and "[FSDP]" not in text
    assert f"one of {', '.join(available_methods())} (default dct_adamw)" in flat
    assert "steps between validations; 0: only the final one (default 100)" in flat
    assert "steps between checkpoints; 0: only the final one (default 100)" in flat


@pytest.mark.parametrize(
    ("argv", "expected"),
    [([], False), (["--fsdp"], True), (["--no-fsdp"], False), (["--fsdp", "false"], False), (["--fsdp=True"], True),
     (["--fsdp", "--no-fsdp"], False)],
)
def test_switches_take_no_value_a_negation_or_an_explicit_value(argv, expected):
    assert parse_config(argv).fsdp is expected


def test_a_switch_set_to_true_round_trips_through_argv():
    config = TrainConfig(activation_checkpointing=True, backward_projection=True, optimizer="dct_adamw")
    assert parse_config(config_to_argv(config)) == config


def test_resume_continues_in_the_checkpoint_folder_unless_renamed(tmp_path):
    saved = resolve(TrainConfig(optimizer="adamw", save_dir="somewhere/else"), world_size=1)
    folder = tmp_path / "moved_run" / "model_10"
    folder.mkdir(parents=True)
    saved.save_json(folder / "config.json")
    assert parse_config(["--continue_from", str(folder)]).save_dir == str(tmp_path / "moved_run")
    renamed = parse_config(["--continue_from", str(folder), "--run_name", "t_resumed"])
    assert renamed.save_dir is None and resolve(renamed, world_size=1).save_dir == str(Path("runs") / "t_resumed")
    explicit = parse_config(["--continue_from", str(folder), "--save_dir", str(tmp_path / "new")])
    assert explicit.save_dir == str(tmp_path / "new")
