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
from torch.utils.checkpoint import checkpoint as torch_checkpoint

REPO_ROOT = Path(__file__).resolve().parents[2]

import experiments.model  # noqa: E402
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
from experiments.config import TrainConfig, resolve  # noqa: E402
from experiments.distributed import setup_distributed  # noqa: E402
from experiments.logging_utils import METRICS_FILE, read_metrics  # noqa: E402
from experiments.methods import available_methods  # noqa: E402
from experiments.pretrain import LOSS_PLOT, build_run, train, train_step  # noqa: E402

# The library's optimizers this suite expects; each is skipped while it is not registered.
EXPECTED_OPTIMIZERS = ("adamw", "galore_adamw", "dct_adamw", "sst_adamw", "galore_torch_adamw")
PROJECTED = ("galore_adamw", "dct_adamw")
# galore_torch and apollo-torch keep Python projector objects in their state: torch.load(weights_only=True) fails.
NOT_RESUMABLE = ("galore_torch_adamw", "apollo_torch_adamw", "apollo_torch_mini")


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
# --step_in_backward needs clipping off (it is on by default); accumulation 2 (batch 4 of 8).
STEP_IN_BACKWARD = {"step_in_backward": True, "grad_clipping": 0.0}
RUN_CASES += [(f"{name}_step_in_backward", {"optimizer": name, **STEP_IN_BACKWARD}) for name in PROJECTED]
# APOLLO scales the full gradient: --step_in_backward accumulates it through the window (accumulation 2 here);
# APOLLO-Mini with 8-bit moments and per-parameter steps is the memory recipe; the DCT variant by its key.
APOLLO = ("apollo_adamw", "apollo_mini")
RUN_CASES += [(f"{name}_step_in_backward", {"optimizer": name, **STEP_IN_BACKWARD}) for name in APOLLO]
RUN_CASES += [
    ("apollo_mini_8bit_step_in_backward", {"optimizer": "apollo_mini", "optimizer_kwargs": {"moment_bits": 8},
                                           **STEP_IN_BACKWARD}),
    ("apollo_adamw_dct", {"optimizer": "apollo_adamw", "optimizer_kwargs": {"proj": "dct"}}),
]
# --weight_bits 8: every library optimizer writes int8 weights, in every mode it has (SST keeps its factors
# in --dtype: with --target_modules attn the MLP linears stay dense and are stored in int8)
INT8 = {"weight_bits": 8}
RUN_CASES += [(f"{name}_int8", {"optimizer": name, **INT8})
              for name in ("dct_adamw", "galore_adamw", "galore_adamw8bit", "apollo_adamw", "apollo_mini", "adamw8bit")]
RUN_CASES += [
    ("sst_adamw_int8", {"optimizer": "sst_adamw", "target_modules": ["attn"], **INT8}),
    ("galore_adamw_backward_projection_int8", {"optimizer": "galore_adamw", "backward_projection": True, **INT8}),
    ("dct_adamw_step_in_backward_int8", {"optimizer": "dct_adamw", **STEP_IN_BACKWARD, **INT8}),
]


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
    ("dct_adamw_step_in_backward", {"optimizer": "dct_adamw", **STEP_IN_BACKWARD}),
    ("galore_adamw_step_in_backward", {"optimizer": "galore_adamw", **STEP_IN_BACKWARD}),
    # accumulation 1: dct_adamw keeps its scaled residual (its residual_norm state is resumed too)
    ("dct_adamw_step_in_backward_accumulation_1", {"optimizer": "dct_adamw", "total_batch_size": 4,
                                                   **STEP_IN_BACKWARD}),
    # APOLLO's subspace state is a seed: the resumed run draws the same projections
    ("apollo_adamw", {"optimizer": "apollo_adamw"}),
    ("apollo_mini_step_in_backward", {"optimizer": "apollo_mini", **STEP_IN_BACKWARD}),
    # int8 weights: codes and scales are plain tensors of the model checkpoint, the noise is seeded by name and step
    ("dct_adamw_int8", {"optimizer": "dct_adamw", **INT8}),
    ("dct_adamw_backward_projection_int8", {"optimizer": "dct_adamw", "backward_projection": True, **INT8}),
    # the README's leanest run: int8 weights, APOLLO-Mini with 8-bit moments, steps in the backward pass
    ("apollo_mini_8bit_step_in_backward_int8", {"optimizer": "apollo_mini", "optimizer_kwargs": {"moment_bits": 8},
                                                **STEP_IN_BACKWARD, **INT8}),
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
    if overrides.get("weight_bits") == 8:      # the int8 weights as codes and scales, plain tensors
        codes = [k for k in uninterrupted_state if k.endswith(".int8_codes")]
        assert codes and all(uninterrupted_state[k].dtype == torch.int8 for k in codes)


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


TORCHRUN_MODES = {
    "ddp": [],
    "backward_projection": ["--optimizer", "dct_adamw", "--backward_projection"],
    "step_in_backward": ["--optimizer", "dct_adamw", "--step_in_backward", "--grad_clipping", "0"],
}


@pytest.mark.parametrize("mode", list(TORCHRUN_MODES.values()), ids=list(TORCHRUN_MODES))
def test_torchrun_two_processes_match_one_process_with_accumulation(tmp_path, cache_dir, mode):
    """Plain DDP, and --backward_projection / --step_in_backward, where the optimizer all-reduces the
    projected gradients itself (no DDP wrapper; under --step_in_backward each parameter's hook
    all-reduces its window's gradient): accumulation 2 on each of 2 ranks equals 1 process
    (accumulation 4)."""
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


# ---- --step_in_backward: the same trajectory as the modes it replaces ----


def _final_weights(save_dir: Path, step: int = 6) -> dict[str, torch.Tensor]:
    return torch.load(Path(save_dir) / f"model_{step}" / MODEL_FILE, weights_only=True)


def _assert_same_run(run: Path, reference: Path, tolerance: float) -> None:
    """Train and validation losses and final weights of ``run`` equal ``reference``'s: bitwise when
    ``tolerance`` is 0, else within ``tolerance`` (relative for losses, absolute for weights)."""
    for key in ("train/loss", "val/loss"):
        got, expected = losses(run, key), losses(reference, key)
        assert got.keys() == expected.keys()
        if tolerance == 0:
            assert got == expected
        else:
            assert all(math.isclose(got[s], expected[s], rel_tol=tolerance) for s in got), (got, expected)
    weights, expected = _final_weights(run), _final_weights(reference)
    if tolerance == 0:
        assert all(torch.equal(weights[k], expected[k]) for k in expected)
    else:
        assert max((weights[k] - expected[k]).abs().max().item() for k in expected) <= tolerance


def _six_steps(save_dir: Path, cache_dir: Path, **overrides) -> Path:
    """dct_adamw, refreshes every 2 steps, no clipping, every loss logged, weights saved at step 6."""
    values = dict(optimizer="dct_adamw", grad_clipping=0.0, log_every=1, save_every=6, **overrides)
    train(micro_config(save_dir, cache_dir, **values))
    return save_dir


def test_step_in_backward_with_accumulation_follows_backward_projection(tmp_path, cache_dir):
    """Accumulation 2 (batch 4 of 8), float32 (the script's default dtype): --step_in_backward
    equals --backward_projection, which it implies (residual off, the same staggered refreshes,
    the same projected accumulators), bitwise when the reference steps its plain parameters one
    by one (``foreach: false``) as the hooks do. With torch's default multi-tensor (foreach)
    AdamW for the plain parameters (norms, embedding, head) the reference rounds some of their
    updates differently by an ulp, which then reaches every weight through the gradients: 1e-6
    covers that (measured: 1.2e-7 on the weights after 6 steps)."""
    in_backward = _six_steps(tmp_path / "in_backward", cache_dir, step_in_backward=True)
    assert TrainConfig.load_json(in_backward / "config.json").gradient_accumulation == 2
    per_parameter = _six_steps(tmp_path / "per_parameter", cache_dir, backward_projection=True,
                               optimizer_kwargs={"foreach": False})
    _assert_same_run(in_backward, per_parameter, tolerance=0)
    default = _six_steps(tmp_path / "default", cache_dir, backward_projection=True)
    _assert_same_run(in_backward, default, tolerance=1e-6)
    both_flags = _six_steps(tmp_path / "both_flags", cache_dir, step_in_backward=True, backward_projection=True)
    _assert_same_run(both_flags, in_backward, tolerance=0)


def test_step_in_backward_without_accumulation_follows_the_plain_run(tmp_path, cache_dir):
    """Accumulation 1 (batch 4 of 4): dct_adamw keeps its default scaled residual (the hook has the
    step's full gradient) and the unstaggered refreshes, so the run is the ordinary one without
    any backward flag: bitwise against plain AdamW stepped per parameter, within 1e-6 against the
    default foreach path (the same ulp-level rounding as in the test above)."""
    in_backward = _six_steps(tmp_path / "in_backward", cache_dir, total_batch_size=4, step_in_backward=True)
    assert TrainConfig.load_json(in_backward / "config.json").gradient_accumulation == 1
    per_parameter = _six_steps(tmp_path / "per_parameter", cache_dir, total_batch_size=4,
                               optimizer_kwargs={"foreach": False})
    _assert_same_run(in_backward, per_parameter, tolerance=0)
    default = _six_steps(tmp_path / "default", cache_dir, total_batch_size=4)
    _assert_same_run(in_backward, default, tolerance=1e-6)


@pytest.mark.parametrize("total_batch_size, residual", [(8, "none"), (4, "scaled")], ids=["accumulation_2",
                                                                                          "accumulation_1"])
def test_step_in_backward_builds_the_mode_and_leaves_no_gradient(total_batch_size, residual, tmp_path, cache_dir):
    """The run's optimizer steps in the backward pass with the script's accumulation (residual off
    only when accumulating), the model is not wrapped, and after a train step no gradient and no
    projected accumulator is left."""
    config = resolve(micro_config(tmp_path / "run", cache_dir, optimizer="dct_adamw", total_batch_size=total_batch_size,
                                  **STEP_IN_BACKWARD), world_size=1)
    context = setup_distributed("cpu")
    run = build_run(config, context)
    optimizer = run.optimizer
    assert (optimizer.step_in_backward, optimizer.backward_projection) == (True, True)
    assert optimizer.accumulation_steps == config.gradient_accumulation == total_batch_size // 4
    assert {group["residual"] for group in optimizer.param_groups} == {residual}
    assert run.wrapped is run.model
    before = [p.detach().clone() for p in run.model.parameters()]
    for _ in range(2):
        train_step(run.wrapped, run.data.train, optimizer, config, run.data.tokenizer.pad_id, context)
        assert all(p.grad is None for p in run.model.parameters())
    assert all(not torch.equal(a, p) for a, p in zip(before, run.model.parameters()))


# ---- --activation_checkpointing: the same run, less activation memory ----

CHECKPOINTING_CASES = [
    ("adamw", {"optimizer": "adamw"}),
    ("dct_adamw", {"optimizer": "dct_adamw"}),
    ("sst_adamw", {"optimizer": "sst_adamw"}),
    ("sltrain", {"optimizer": "adamw", "parameterization": "sltrain"}),
    ("dct_adamw_step_in_backward", {"optimizer": "dct_adamw", **STEP_IN_BACKWARD}),
]


@pytest.mark.parametrize(("case", "overrides"), CHECKPOINTING_CASES, ids=[case for case, _ in CHECKPOINTING_CASES])
def test_activation_checkpointing_reproduces_the_run_bitwise(case, overrides, tmp_path, cache_dir, monkeypatch):
    """Six float32 steps (accumulation 2, clipping on unless --step_in_backward, which needs it off)
    with --activation_checkpointing equal the run without it bitwise: train and validation losses
    and the final weights. The non-reentrant checkpoint recomputes each decoder layer with the same
    inputs and weights (the CPU kernels are deterministic, and no layer draws random numbers), so
    the backward pass sees the same saved tensors and runs the same operations in the same order.
    Under --step_in_backward each parameter's hook still fires once its gradient is complete, and a
    layer is recomputed before any of its own parameters is stepped. SST and SLTrain check that
    their autograd Functions recompute inside the checkpoint."""
    require_registered(overrides["optimizer"])
    values = dict(log_every=1, save_every=6, **overrides)
    reference, checkpointed = tmp_path / "reference", tmp_path / "checkpointed"
    train(micro_config(reference, cache_dir, **values))
    calls = []

    def counted_checkpoint(function, *args, **kwargs):
        calls.append(kwargs.get("use_reentrant"))
        return torch_checkpoint(function, *args, **kwargs)

    monkeypatch.setattr(experiments.model, "checkpoint", counted_checkpoint)
    train(micro_config(checkpointed, cache_dir, activation_checkpointing=True, **values))
    # every micro-batch of the 6 steps ran its 2 layers under the non-reentrant checkpoint
    assert len(calls) == 6 * 2 * 2 and set(calls) == {False}
    assert TrainConfig.load_json(checkpointed / "config.json").activation_checkpointing is True
    assert TrainConfig.load_json(reference / "config.json").activation_checkpointing is False
    _assert_same_run(checkpointed, reference, tolerance=0)


@pytest.mark.parametrize("parameterization", ["dense", "sltrain"])
def test_activation_checkpointing_sets_the_native_llama_attribute(parameterization, tmp_path, cache_dir):
    """The flag reaches the native Llama, also under a parameterization that replaces its linears
    in place; without the flag it stays off."""
    context = setup_distributed("cpu")
    for flag in (False, True):
        config = resolve(micro_config(tmp_path / "run", cache_dir, parameterization=parameterization,
                                      activation_checkpointing=flag), world_size=1)
        assert build_run(config, context).model.activation_checkpointing is flag


def test_activation_checkpointing_turns_on_hugging_face_gradient_checkpointing(tmp_path, cache_dir):
    """--model_impl hf: the flag turns on HF's activation (gradient) checkpointing, non-reentrant, and a train step
    then gives the loss and weights of the run without it (bitwise, as for the native model)."""
    pytest.importorskip("transformers")
    context = setup_distributed("cpu")
    runs = {}
    for flag in (False, True):
        config = resolve(micro_config(tmp_path / "run", cache_dir, model_impl="hf", activation_checkpointing=flag),
                         world_size=1)
        run = build_run(config, context)
        hf = run.model.hf  # transformers 5 renamed is_gradient_checkpointing (a deprecated alias now)
        assert getattr(hf, "is_activation_checkpointing", None) is flag or hf.is_gradient_checkpointing is flag
        assert hf.model.layers[0].training  # HF checkpoints only in training mode
        loss = train_step(run.wrapped, run.data.train, run.optimizer, config, run.data.tokenizer.pad_id, context)
        runs[flag] = (loss, [p.detach().clone() for p in run.model.parameters()])
    assert torch.equal(runs[True][0], runs[False][0])
    assert all(torch.equal(a, b) for a, b in zip(runs[True][1], runs[False][1]))


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_threads_flag_auto_takes_the_free_cores_and_respects_omp(restore_threads, monkeypatch):
    from experiments.pretrain import configure_threads

    cpu = torch.device("cpu")
    assert configure_threads(TrainConfig(threads=1), cpu) == 1
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    torch.set_num_threads(4)
    monkeypatch.setattr(os, "getloadavg", lambda: (3.2, 0.0, 0.0))  # three of four cores busy
    assert configure_threads(TrainConfig(), cpu) == 1
    torch.set_num_threads(4)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.9, 0.0, 0.0))
    assert configure_threads(TrainConfig(), cpu) == 3
    torch.set_num_threads(4)
    monkeypatch.setenv("OMP_NUM_THREADS", "4")  # the user's choice stays
    assert configure_threads(TrainConfig(), cpu) == 4
