"""User mistakes end ``python -m experiments.pretrain`` with one line ``error: <flag or file>: ...``.

Each mistake runs ``main(argv)`` in-process and checks the exit status (2) and the whole of stderr:
exactly one line, the message. Most are refused by the up-front checks before any data or model
is built; the few found while building use the micro LLaMA. Two cases run the real command in a
subprocess, end to end.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support.cli import refusal
from torch import nn

from experiments import methods
from experiments.errors import UsageError
from experiments.methods import available_methods, info_for
from experiments.pretrain import main

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("mistakes")


def tiny_flags(workdir: Path, name: str = "run") -> list[str]:
    """A 2-step run of the micro LLaMA, no evaluation before the end, no checkpoints."""
    return [
        "--model_config", "llama_micro", "--optimizer", "adamw", "--max_length", "32", "--batch_size", "4",
        "--num_training_steps", "2", "--eval_every", "0", "--eval_tokens", "256", "--save_every", "0",
        "--wandb_mode", "disabled", "--device", "cpu", "--cache_dir", str(workdir / "cache"),
        "--save_dir", str(workdir / name),
    ]  # fmt: skip


FLAG_MISTAKES = [
    (["--batch_size", "0"], "error: --batch_size: expected an integer >= 1, got 0"),
    (["--max_length", "0"], "error: --max_length: expected an integer >= 2, got 0"),
    (["--max_length", "5000"], "error: --max_length: expected at most the 1024 positions (max_position_embeddings) "
     "of model config 'llama_micro', got 5000"),
    (["--num_training_steps", "-5"], "error: --num_training_steps: expected an integer >= 1, got -5"),
    (["--warmup_steps", "50"], "error: --warmup_steps: expected at most the 2 training steps, got 50"),
    (["--total_batch_size", "6"], "error: --total_batch_size: expected a multiple of batch_size x world_size "
     "= 4 x 1 = 4, got 6"),
    (["--max_train_tokens", "abc"], "error: --max_train_tokens: expected a token count such as 4096, 64K, 100M or "
     "1.5B, got 'abc'"),
    (["--max_train_tokens=-1M"], "error: --max_train_tokens: expected a positive token count, got '-1M'"),
    (["--eval_tokens", "0"], "error: --eval_tokens: expected an integer >= 1, got 0"),
    (["--lr", "nan"], "error: --lr: expected a finite number > 0, got nan"),
    (["--lr", "-1"], "error: --lr: expected a finite number > 0, got -1.0"),
    (["--plain_lr", "0"], "error: --plain_lr: expected a finite number > 0, got 0.0"),
    # tiny_flags' adamw trains model.parameters() in one group: no plain group for --plain_lr to set
    (["--plain_lr", "1e-3"], "error: --plain_lr: sets the plain param group of an optimizer with GaLore's groups "
     f"({', '.join(name for name in available_methods() if info_for(name).projection_keys)}); got optimizer "
     "'adamw', which trains every parameter in one group at --lr"),
    (["--weight_decay", "-0.1"], "error: --weight_decay: expected a finite number >= 0, got -0.1"),
    (["--betas", "0.9", "1.0"], "error: --betas: expected a finite number in [0, 1), got 1.0"),
    (["--eps", "-1"], "error: --eps: expected a finite number >= 0, got -1.0"),
    (["--grad_clipping", "-1"], "error: --grad_clipping: expected a finite number >= 0, got -1.0"),
    (["--min_lr_ratio", "2"], "error: --min_lr_ratio: expected a finite number in [0, 1], got 2.0"),
    (["--rank", "1.5"], "error: --rank: expected an integer >= 1 or a finite number in (0, 1], got 1.5"),
    (["--update_proj_gap", "0"], "error: --update_proj_gap: expected an integer >= 1, got 0"),
    (["--galore_scale", "0"], "error: --scale: expected a finite number > 0, got 0.0"),
    (["--density", "1.5"], "error: --density: expected a finite number in (0, 1], got 1.5"),
    (["--alpha", "0"], "error: --alpha: expected a finite number > 0, got 0.0"),
    (["--sst_interval", "0"], "error: --sst_interval: expected an integer >= 1, got 0"),
    (["--seed", "-1"], "error: --seed: expected an integer >= 0, got -1"),
    (["--eval_every", "-1"], "error: --eval_every: expected an integer >= 0, got -1"),
    (["--log_every", "0"], "error: --log_every: expected an integer >= 1, got 0"),
    (["--optimizer", "adam_w"], "error: --optimizer: unknown optimizer: expected one of "
     f"{', '.join(available_methods())}, got 'adam_w' (did you mean 'adamw'?)"),
    (["--optimizer", "sltrain"], "error: --optimizer: unknown optimizer: expected one of "
     f"{', '.join(available_methods())}, got 'sltrain'; sltrain is a parameterization, not an optimizer: pass "
     "--parameterization sltrain (with --optimizer adamw, for instance)"),
    (["--dataset", "wiki"], "error: --dataset: unknown dataset: expected one of shakespeare, c4, got 'wiki'"),
    (["--parameterization", "lora"], "error: --parameterization: unknown parameterization: expected one of auto, "
     "dense, sst, sltrain, got 'lora'"),
    (["--model_config", "llama_tiniest"], "error: --model_config: no such file, and not a name in "
     "experiments/configs/: expected one of llama_130m, llama_1b, llama_350m, llama_60m, llama_7b, llama_micro, "
     "llama_tiny, got 'llama_tiniest' (did you mean 'llama_tiny'?)"),
    (["--fsdp", "--optimizer", "sst_adamw"], "error: --fsdp: trains the optimizers adamw, apollo_adamw, apollo_mini, "
     "dct_adamw, galore_adamw with the dense parameterization; got optimizer 'sst_adamw', parameterization 'sst' "
     "(use DDP for those)"),
    (["--optimizer_kwargs", '{"betas": [0.9]}'], "error: --optimizer_kwargs: betas: expected 2 values, got 1: [0.9]"),
    (["--backward_projection"], "error: --backward_projection: needs the optimizer dct_adamw or galore_adamw on the "
     "dense parameterization; got optimizer 'adamw', parameterization 'dense'"),
    # APOLLO's update scales the full gradient: --step_in_backward keeps it, --backward_projection alone frees it
    *[(["--backward_projection", "--optimizer", name], f"error: --backward_projection: {name}'s update scales each "
       "step's full gradient, which --backward_projection frees in the backward pass; train with the standard loop, "
       "or with --step_in_backward --grad_clipping 0 (whose hooks still have it)")
      for name in ("apollo_adamw", "apollo_mini")],
    (["--step_in_backward", "--grad_clipping", "0"], "error: --step_in_backward: needs the optimizer apollo_adamw or "
     "apollo_mini or dct_adamw or galore_adamw on the dense parameterization; got optimizer 'adamw', parameterization "
     "'dense'"),
    (["--step_in_backward", "--grad_clipping", "0", "--optimizer", "dct_adamw", "--parameterization", "sltrain"],
     "error: --step_in_backward: needs the optimizer apollo_adamw or apollo_mini or dct_adamw or galore_adamw on the "
     "dense parameterization; got optimizer 'dct_adamw', parameterization 'sltrain'"),
    (["--step_in_backward", "--grad_clipping", "0", "--optimizer", "dct_adamw", "--fsdp"], "error: "
     "--step_in_backward: cannot be combined with --fsdp in this script yet (the optimizers step under FSDP2 in its "
     "hooks, docs/memory-modes.md, but the script does not drive FSDP2's no-sync accumulation for it); under "
     "torchrun without --fsdp the optimizer all-reduces the projected gradients itself"),
    (["--step_in_backward", "--optimizer", "dct_adamw"], "error: --step_in_backward: cannot be combined with "
     "--grad_clipping 1 (clipping is on by default): clipping needs the global gradient norm before any update, but "
     "this mode updates each parameter inside the backward pass; pass --grad_clipping 0 to train without clipping, "
     "or use --backward_projection alone to clip"),
    (["--step_in_backward", "--backward_projection", "--optimizer", "galore_adamw", "--grad_clipping", "0.5"],
     "error: --step_in_backward: cannot be combined with --grad_clipping 0.5 (clipping is on by default): clipping "
     "needs the global gradient norm before any update, but this mode updates each parameter inside the backward "
     "pass; pass --grad_clipping 0 to train without clipping, or use --backward_projection alone to clip"),
    (["--tokenizer", "bpe:abc"], "error: --tokenizer: expected bpe or bpe:<vocabulary size> such as bpe:4096, "
     "got 'bpe:abc'"),
    # int8 weights: only the library's optimizers write them (torch.optim.AdamW fails at param.mul_), not under FSDP2
    (["--weight_bits", "8"], "error: --weight_bits: 8 needs an optimizer that updates int8 weights (stochastic "
     "rounding through lowrank_optim.weights): "
     f"{', '.join(name for name in available_methods() if info_for(name).int8_weights)}; got 'adamw' "
     "(AdamW (torch.optim)), which cannot write into them"),
    (["--weight_bits", "8", "--optimizer", "dct_adamw", "--fsdp"], "error: --weight_bits: 8 cannot be combined with "
     "--fsdp (FSDP2-sharded int8 weights are not supported: the rounding noise of a shard's rows would need their "
     "global offset); under torchrun without --fsdp the replicas use DDP"),
]  # fmt: skip


@pytest.mark.parametrize(("flags", "message"), FLAG_MISTAKES, ids=[" ".join(flags) for flags, _ in FLAG_MISTAKES])
def test_a_flag_out_of_range_or_unknown_is_one_line(flags, message, workdir, capsys):
    assert refusal([*tiny_flags(workdir), *flags], capsys) == message
    assert not (workdir / "run").exists()  # refused before anything was written


def test_cuda_without_a_gpu_is_refused(workdir, capsys, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert refusal([*tiny_flags(workdir), "--device", "cuda"], capsys) == (
        "error: --device: cuda was asked for but torch sees no CUDA device; expected auto or cpu here"
    )


def test_fsdp_outside_torchrun_is_refused(workdir, capsys, monkeypatch):
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    assert refusal([*tiny_flags(workdir), "--fsdp"], capsys) == (
        "error: --fsdp: needs a process group: launch with torchrun (--nproc_per_node N, 1 included)"
    )


BUILD_MISTAKES = [
    (["--batch_size", "1000000"], r"error: --batch_size: the [\d,]+ training tokens are too few for a global batch "
     r"of 1000000 sequences \(batch_size x world_size\) of length 32; expected a smaller batch_size or max_length"),
    (["--eval_tokens", "10"], r"error: --eval_tokens: 10 tokens give 0 validation sequences of length 32; expected "
     r"at least one per rank \(1\): eval_tokens >= max_length x world_size"),
    (["--optimizer_kwargs", '{"foo": 1}'], r"error: --optimizer_kwargs: unknown key 'foo' for --optimizer adamw "
     r"\(AdamW\); accepted keys: lr, betas, eps, weight_decay, amsgrad, .*"),
    (["--optimizer", "dct_adamw", "--optimizer_kwargs", '{"rnk": 4}'], r"error: --optimizer_kwargs: unknown key "
     r"'rnk' for --optimizer dct_adamw \(DCTProjAdam\); accepted keys: lr, .*\brank\b.* \(did you mean 'rank'\?\)"),
    (["--optimizer", "galore_adamw", "--rank", "0.25"], r"error: --rank: Invalid rank: 0\.25 \(expected an "),
    (["--optimizer", "sst_adamw", "--rank", "1000"], r"error: --rank: Invalid rank: 1000 \(expected an integer "),
    (["--optimizer", "dct_adamw", "--target_modules", "zzz"], r"error: --target_modules: Invalid target_modules: "
     r"\('zzz',\) match"),
    (["--optimizer", "dct_adamw", "--optimizer_kwargs", '{"residual": "big"}'], r"error: --optimizer_kwargs: "
     r"Invalid residual: 'big' \(expected one of"),
    (["--tokenizer", "bpe:100"], r"error: --tokenizer: expected a BPE vocabulary size of at least 258, got 100"),
    # the residual the user asks for needs the full gradient the mode frees (the library's ValueError)
    (["--optimizer", "dct_adamw", "--backward_projection", "--rank", "8", "--optimizer_kwargs",
      '{"residual": "scaled"}'],
     r"error: --optimizer_kwargs: parameter layers\.0\.attn\.q_proj"
     r"\.weight \(shape \(32, 32\)\): residual='scaled' needs each step's full gradient, which "
     r"backward_projection=True frees in the backward pass; pass residual='none' \(or step_in_backward=True, where "
     r"the last hook of a window has it"),
    (["--optimizer", "dct_adamw", "--step_in_backward", "--grad_clipping", "0", "--optimizer_kwargs",
      '{"skip_nonfinite": true}'], r"error: --optimizer_kwargs: Invalid skip_nonfinite: True with step_in_backward"),
    # SST replaced every target linear by its factors (which stay in --dtype): nothing dense is left
    (["--optimizer", "sst_adamw", "--weight_bits", "8"], r"error: --weight_bits: 8 finds no weight to store in int8: "
     r"Invalid target_modules: 'all-linear' matches no nn\.Linear of the model"),
]  # fmt: skip


@pytest.mark.parametrize(("flags", "pattern"), BUILD_MISTAKES, ids=[" ".join(flags) for flags, _ in BUILD_MISTAKES])
def test_a_mistake_found_while_building_is_one_line(flags, pattern, workdir, capsys):
    assert re.fullmatch(pattern + r".*", refusal([*tiny_flags(workdir), *flags], capsys))


class _Wrapped(nn.Module):
    """A parameterization that wraps the model instead of changing it in place."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.inner = model

    def forward(self, input_ids):
        return self.inner(input_ids)


def test_activation_checkpointing_that_cannot_reach_the_layers_is_refused(workdir, capsys, monkeypatch):
    """SST and SLTrain replace linears in place (the Llama keeps its flag); a parameterization that
    wrapped the model would hide it, and the flag is refused rather than silently ignored."""
    monkeypatch.setitem(methods.PARAMETERIZATIONS, "sltrain", lambda model, config: _Wrapped(model))
    flags = [*tiny_flags(workdir, "wrapped"), "--parameterization", "sltrain", "--activation_checkpointing"]
    assert refusal(flags, capsys) == (
        "error: --activation_checkpointing: cannot reach the decoder layers of the model that parameterization "
        "'sltrain' built (_Wrapped, not the LLaMA of --model_impl native); train without --activation_checkpointing"
    )
    assert not (workdir / "wrapped").exists()


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_a_bad_model_config_file_names_the_file(workdir, capsys):
    sizes = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4}
    cases = {
        "{hidden_size: 32": "is not valid JSON (Expecting property name enclosed in double quotes: line 1 column 2 "
        "(char 1)); expected a LLaMA config",
        "[1, 2]": "expected a JSON object of LLaMA settings, got list",
        json.dumps({"hidden_size": 32}): "lacks vocab_size, intermediate_size, num_hidden_layers, num_attention_heads; "
        "a LLaMA config needs vocab_size, hidden_size, intermediate_size, num_hidden_layers, num_attention_heads",
        json.dumps({**sizes, "vocab_size": None, "hidden_size": -32}): "hidden_size: expected a positive integer, "
        "got -32",
        json.dumps({**sizes, "vocab_size": None, "hidden_size": 30}): "hidden_size 30 is not divisible by "
        "num_attention_heads 4",
    }
    for index, (text, message) in enumerate(cases.items()):
        path = _write(workdir / f"model_{index}.json", text)
        line = refusal([*tiny_flags(workdir), "--model_config", str(path)], capsys)
        assert line == f"error: {path}: {message}"
    small_vocab = _write(workdir / "small_vocab.json", json.dumps({**sizes, "vocab_size": 100}))
    assert refusal([*tiny_flags(workdir), "--model_config", str(small_vocab)], capsys) == (
        f"error: --model_config: vocab_size 100 of '{small_vocab}' is smaller than the tokenizer's 259; "
        "expected a config with vocab_size null or at least the tokenizer's"
    )


def test_a_directory_flag_naming_a_file_is_refused(workdir, capsys):
    afile = _write(workdir / "a_file", "x")
    assert refusal([*tiny_flags(workdir), "--save_dir", str(afile)], capsys) == (
        f"error: --save_dir: {afile} is a file; expected a directory (or a path to create one at)"
    )


@pytest.fixture(scope="module")
def checkpoint(workdir) -> Path:
    """``model_2`` of a finished 2-step run."""
    main([*tiny_flags(workdir, "saved"), "--save_every", "2"])
    return workdir / "saved" / "model_2"


def damaged(checkpoint: Path, name: str, damage) -> Path:
    """A copy of ``checkpoint`` with ``damage(folder)`` applied."""
    folder = checkpoint.parents[1] / "damaged" / name / checkpoint.name
    shutil.copytree(checkpoint, folder)
    damage(folder)
    return folder


def truncate(name: str):
    def damage(folder: Path) -> None:
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[: len(data) // 2])

    return damage


def test_a_truncated_checkpoint_file_is_named_not_a_zip_reader_traceback(checkpoint, capsys):
    for name in ("model.pt", "optimizer.pt"):
        folder = damaged(checkpoint, f"truncated_{name}", truncate(name))
        line = refusal(["--continue_from", str(folder), "--num_training_steps", "4"], capsys)
        assert line.startswith(
            f"error: {folder / name}: cannot be loaded with torch.load(weights_only=True): truncated, corrupt or not "
            "a checkpoint file ("
        )
        assert line.endswith("); resume from another checkpoint")


def test_missing_or_corrupt_checkpoint_pieces_are_named(checkpoint, workdir, capsys):
    def resume(folder: Path, *flags: str) -> str:
        return refusal(["--continue_from", str(folder), "--num_training_steps", "4", *flags], capsys)

    nowhere = workdir / "nowhere"
    assert resume(nowhere) == (
        f"error: --continue_from: expected a checkpoint folder model_<step> or a save_dir holding one; {nowhere} "
        "does not exist"
    )
    folder = damaged(checkpoint, "no_optimizer", lambda f: (f / "optimizer.pt").unlink())
    assert resume(folder) == (
        f"error: {folder}: is an incomplete checkpoint: optimizer.pt missing (expected model.pt, optimizer.pt, "
        "training_state.pt, config.json)"
    )
    folder = damaged(checkpoint, "bad_config", lambda f: _write(f / "config.json", "{oops"))
    assert resume(folder) == (
        f"error: {folder / 'config.json'}: is not valid JSON (Expecting property name enclosed in double quotes: "
        "line 1 column 2 (char 1)); expected a saved run config"
    )
    folder = damaged(checkpoint, "unknown_key", lambda f: _write(f / "config.json", '{"learning_rate": 1}'))
    assert resume(folder) == (
        f"error: {folder / 'config.json'}: unknown config keys ['learning_rate']; expected the flags of "
        "experiments/config.py"
    )
    saved = json.loads((checkpoint / "config.json").read_text())
    folder = damaged(checkpoint, "bad_value", lambda f: _write(f / "config.json", json.dumps({**saved, "lr": "1"})))
    assert resume(folder) == f"error: {folder / 'config.json'}: --lr: expected a finite number > 0, got '1'"
    folder = damaged(checkpoint, "sharded", lambda f: (f / "sharded").mkdir())
    assert resume(folder) == (
        f"error: {folder}: is a sharded checkpoint (an FSDP2 run): resume it with --fsdp under torchrun"
    )
    assert resume(checkpoint, "--fsdp") == (
        f"error: {checkpoint}: is not sharded (a DDP or single-process run): resume it without --fsdp"
    )


def test_resuming_with_flags_that_do_not_fit_the_checkpoint(checkpoint, capsys):
    def resume(*flags: str) -> str:
        return refusal(["--continue_from", str(checkpoint), *flags], capsys)

    assert resume() == (
        f"error: --num_training_steps: expected more than the 2 steps that {checkpoint} has trained, got 2: "
        "nothing is left to train"
    )
    line = resume("--num_training_steps", "4", "--model_config", "llama_tiny")
    assert line.startswith(
        f"error: {checkpoint / 'model.pt'}: does not fit this run's Llama (RuntimeError: Error(s) in loading "
        "state_dict for Llama: Missing key(s) in state_dict: "
    )
    line = resume("--num_training_steps", "4", "--optimizer", "dct_adamw")
    assert re.fullmatch(
        re.escape(f"error: {checkpoint / 'optimizer.pt'}: does not fit this run's DCTProjAdam (ValueError: Invalid "
                  "state_dict: param_groups[0] lacks 'backend', 'basis', ") + r".*"
        + re.escape("); resume with the model and optimizer flags of the saved run"), line)
    assert resume("--optimizer", "galore_torch_adamw") == (
        "error: --continue_from: runs of galore_torch_adamw cannot be resumed: its optimizer state holds Python "
        "objects, which torch.load(weights_only=True) refuses"
    )


def test_argparse_keeps_its_own_usage_and_error_lines(capsys):
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["--optimizer_kwargs", "{bad"])
    assert exit_info.value.code == 2
    usage, error = capsys.readouterr().err.strip().rsplit("\n", 1)
    assert usage.startswith("usage: python -m experiments.pretrain")
    assert error == (
        "python -m experiments.pretrain: error: argument --optimizer_kwargs: expected a JSON object such as "
        """'{"residual": "none"}': Expecting property name enclosed in double quotes: line 1 column 2 (char 1) """
        "in '{bad'"
    )


def test_a_bug_keeps_its_traceback(workdir, monkeypatch):
    def broken(*args, **kwargs):
        raise ValueError("a bug, not a user mistake")

    monkeypatch.setattr("experiments.pretrain.build_run", broken)
    with pytest.raises(ValueError, match="a bug, not a user mistake") as error_info:
        main(tiny_flags(workdir))
    assert not isinstance(error_info.value, UsageError)


def run_command(*flags: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "experiments.pretrain", *flags]
    return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)


def test_end_to_end_a_flag_mistake_prints_one_line_and_exits_2(workdir):
    completed = run_command(*tiny_flags(workdir, "subprocess"), "--batch_size", "0")
    assert (completed.returncode, completed.stderr) == (2, "error: --batch_size: expected an integer >= 1, got 0\n")


def test_end_to_end_a_truncated_checkpoint_prints_one_line_and_exits_2(checkpoint):
    folder = damaged(checkpoint, "subprocess", truncate("model.pt"))
    completed = run_command("--continue_from", str(folder), "--num_training_steps", "4")
    assert completed.returncode == 2 and completed.stderr.count("\n") == 1, completed.stderr
    assert completed.stderr.startswith(f"error: {folder / 'model.pt'}: cannot be loaded with torch.load(")
