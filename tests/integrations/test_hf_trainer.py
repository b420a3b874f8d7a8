"""The optimizers inside a real transformers.Trainer: factories, accumulation + clipping + cosine
schedule, bit-identical resume from a checkpoint, and the logging callback. A tiny random LLaMA
(hidden 32, 2 layers, vocab 64), random token sequences, CPU, no download."""
import math
import subprocess
import sys

import pytest
import torch

from lowrank_optim import DCTProjAdam, convert_to_sst, lowrank_param_groups

transformers = pytest.importorskip("transformers")

from lowrank_optim.integrations.transformers import (  # noqa: E402
    TRAINER_FACTORIES,
    APOLLOAdamWFactory,
    APOLLOMiniFactory,
    ClipInOptimizerCallback,
    DCTProjAdamFactory,
    GaLoreAdamWFactory,
    add_lowrank_optim_callback,
    trainer_optimizer,
    unwrap_optimizer,
)

RANK = 8
OPTIMIZERS = {      # name -> (kwargs, convert the model first with SST)
    "adamw": ({"lr": 1e-3}, False),
    "apollo_adamw": ({"lr": 1e-3, "rank": RANK, "update_proj_gap": 3}, False),
    "apollo_mini": ({"lr": 1e-3, "update_proj_gap": 3}, False),
    "dct_adamw": ({"lr": 1e-2, "rank": RANK, "update_proj_gap": 3}, False),
    "galore_adamw": ({"lr": 1e-2, "rank": RANK, "update_proj_gap": 3}, False),
    "galore_adamw8bit": ({"lr": 1e-2, "rank": RANK, "update_proj_gap": 3}, False),
    "sst_adamw": ({"lr": 1e-2, "update_interval": 3}, True),
}


def tiny_llama(sst=False, seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32)
    model = transformers.LlamaForCausalLM(config)
    return convert_to_sst(model, rank=4) if sst else model


class TokenSequences(torch.utils.data.Dataset):
    """``count`` fixed random sequences of 16 tokens, labels = inputs (the model shifts them)."""

    def __init__(self, count=24):
        self.tokens = torch.randint(0, 64, (count, 16), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.tokens)

    def __getitem__(self, index):
        return {"input_ids": self.tokens[index], "labels": self.tokens[index]}


def training_args(tmp_path, **overrides):
    defaults = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=6, logging_steps=1,
                    save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
                    dataloader_num_workers=0)
    return transformers.TrainingArguments(**{**defaults, **overrides})


def make_trainer(model, args, name, callbacks=None):
    kwargs, _ = OPTIMIZERS[name]
    return transformers.Trainer(model=model, args=args, train_dataset=TokenSequences(), callbacks=callbacks,
                                optimizer_cls_and_kwargs=trainer_optimizer(name, **kwargs))


def test_the_library_imports_without_transformers():
    blocked = "import sys; sys.modules['transformers'] = None; import lowrank_optim, lowrank_optim.integrations"
    subprocess.run([sys.executable, "-c", blocked], check=True)


def test_registry_covers_the_library_and_names_unknown_optimizers():
    assert set(TRAINER_FACTORIES) == set(OPTIMIZERS)
    known = "adamw, apollo_adamw, apollo_mini, dct_adamw, galore_adamw, galore_adamw8bit, sst_adamw"
    with pytest.raises(ValueError, match=rf"Invalid name: 'galore' \(known: {known}"):
        trainer_optimizer("galore")


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_each_factory_trains_named_trainable_parameters(tmp_path, name):
    _, sst = OPTIMIZERS[name]
    model = tiny_llama(sst=sst)
    model.model.norm.weight.requires_grad_(False)                 # frozen: not given to the optimizer
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = make_trainer(model, training_args(tmp_path), name)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 6 and all(math.isfinite(loss) for loss in losses)

    optimizer = unwrap_optimizer(trainer.optimizer)
    assert type(optimizer).__name__ == {"adamw": "AdamW", "dct_adamw": "DCTProjAdam", "apollo_adamw": "APOLLOAdamW",
                                        "apollo_mini": "APOLLOMini",
                                        "galore_adamw": "GaLoreAdamW", "galore_adamw8bit": "GaLoreAdamW8bit",
                                        "sst_adamw": "SSTAdamW"}[name]
    given = [n for group in optimizer.param_groups for n in group["param_names"]]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(given) == sorted(trainable) and "model.norm.weight" not in given
    params = dict(model.named_parameters())
    assert all(not torch.equal(params[n], before[n]) for n in given)

    def moment_shape(parameter_name):
        return tuple(optimizer.state[params[parameter_name]]["exp_avg"].shape)

    if name in ("dct_adamw", "galore_adamw", "galore_adamw8bit"):      # q_proj 32x32, up_proj 64x32: moments of rank 8
        assert moment_shape("model.layers.0.self_attn.q_proj.weight") in {(32, RANK), (RANK, 32)}
        assert moment_shape("model.layers.1.mlp.up_proj.weight") == (64, RANK)
        for dense in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.0.input_layernorm.weight"):
            assert moment_shape(dense) == tuple(params[dense].shape)
    if name in ("apollo_adamw", "apollo_mini"):      # APOLLO: moments of the rank-r projection (Mini: rank 1)
        rank = RANK if name == "apollo_adamw" else 1
        assert moment_shape("model.layers.0.self_attn.q_proj.weight") in {(32, rank), (rank, 32)}
        assert moment_shape("model.layers.1.mlp.up_proj.weight") == (64, rank)
        for dense in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.0.input_layernorm.weight"):
            assert moment_shape(dense) == tuple(params[dense].shape)
    if name == "sst_adamw":                          # only the active pairs have moments
        assert moment_shape("model.layers.0.mlp.up_proj.U_active") == (64, 4)
        assert "model.layers.0.mlp.up_proj.U" not in given


def test_galore_defaults_and_dct_target_modules():
    model = tiny_llama()
    linears = [f"model.layers.{i}.{n}.weight" for i in range(2) for n in
               ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    galore = GaLoreAdamWFactory()(model, lr=1e-2).param_groups
    assert galore[0]["param_names"] == linears and "rank" not in galore[1]
    assert {k: galore[0][k] for k in ("rank", "update_proj_gap", "scale", "proj_type")} == {
        "rank": 128, "update_proj_gap": 200, "scale": 0.25, "proj_type": "std"}
    kwargs = {"lr": 1e-2, "target_modules": r".*\.mlp\..*"}
    dct = DCTProjAdamFactory()(model, **kwargs).param_groups
    assert dct[0]["param_names"] == [n for n in linears if ".mlp." in n] and dct[1]["rank"] is None
    assert "target_modules" in kwargs                      # the Trainer's kwargs are not consumed
    assert "lm_head.weight" not in DCTProjAdamFactory()(model, lr=1e-2, target_modules="all-linear"
                                                        ).param_groups[0]["param_names"]
    default = DCTProjAdamFactory()(model, lr=1e-2, rank=8).param_groups    # the embedding table: a plain group
    assert default[1]["param_names"] == ["model.embed_tokens.weight"] and default[1]["rank"] is None
    assert "model.embed_tokens.weight" not in default[0]["param_names"]


def test_apollo_factories_take_dct_layout_and_their_own_defaults():
    model = tiny_llama()
    groups = APOLLOAdamWFactory()(model, lr=1e-2, target_modules=r".*\.mlp\..*").param_groups
    assert all(".mlp." in n for n in groups[0]["param_names"]) and groups[1]["rank"] is None
    assert (groups[0]["rank"], groups[0]["scale"], groups[0]["scale_type"]) == (0.25, 1.0, "channel")
    mini = APOLLOMiniFactory()(model, lr=1e-2).param_groups              # the embedding table: a plain group
    assert mini[1]["param_names"] == ["model.embed_tokens.weight"] and mini[1]["rank"] is None
    assert (mini[0]["rank"], mini[0]["scale"], mini[0]["scale_type"]) == (1, 128.0, "tensor")


def test_factories_refuse_a_model_without_sst_layers_and_a_missing_lr(tmp_path):
    trainer = make_trainer(tiny_llama(), training_args(tmp_path), "sst_adamw")
    with pytest.raises(ValueError, match=r"Invalid model: a LlamaForCausalLM without SSTLinear layers .*convert_to_s"):
        trainer.train()
    trainer = transformers.Trainer(model=tiny_llama(), args=training_args(tmp_path, learning_rate=1e-2),
                                   train_dataset=TokenSequences(),
                                   optimizer_cls_and_kwargs=trainer_optimizer("dct_adamw", rank=RANK))
    with pytest.raises(ValueError, match=r"Invalid kwargs: \{'rank': 8\} has no 'lr' \(the Trainer does not pass "
                                         r"TrainingArguments.learning_rate"):
        trainer.train()


class GradientNorms(transformers.TrainerCallback):
    """The global gradient norm the optimizer is handed (after Trainer's clipping)."""

    def __init__(self):
        self.norms = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        self.norms.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item())


@pytest.mark.parametrize("name", ["dct_adamw", "galore_adamw", "sst_adamw"])
def test_accumulation_clipping_cosine_and_bit_identical_resume(tmp_path, name):
    # 24 sequences / batch 2 = 12 micro-batches = 6 steps an epoch: the checkpoint at step 4 is mid-epoch,
    # refreshes (gap 3: steps 1, 4, 7) and SST resamples (after steps 3, 6) fall on both sides of it.
    _, sst = OPTIMIZERS[name]
    args = training_args(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=8,
                         max_grad_norm=0.05, lr_scheduler_type="cosine", warmup_steps=2,
                         save_strategy="steps", save_steps=4)
    norms = GradientNorms()
    uninterrupted = tiny_llama(sst=sst)
    trainer = make_trainer(uninterrupted, args, name, callbacks=[norms])
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert all(entry["grad_norm"] > 0.05 for entry in logged)      # pre-clip norms: clipping was active
    assert max(norms.norms) <= 0.05 * (1 + 1e-4) and len(norms.norms) == 8
    lrs = [entry["learning_rate"] for entry in logged]      # the lr each step used: warmup 0, lr/2, then cosine
    assert lrs[0] == 0 and lrs[2] == pytest.approx(OPTIMIZERS[name][0]["lr"]) and lrs[2] > lrs[5] > lrs[7] > 0

    resumed = tiny_llama(sst=sst, seed=1)                          # other initial weights: all come from the checkpoint
    make_trainer(resumed, args, name).train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    expected = uninterrupted.state_dict()
    for key, value in resumed.state_dict().items():
        assert torch.equal(value, expected[key]), key


def capture_logs():
    class Capture(transformers.TrainerCallback):
        logs = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.logs.append(dict(logs))
    return Capture()


def test_callback_logs_every_group_lr_and_the_refresh_statistics(tmp_path):
    model = tiny_llama()
    groups = lowrank_param_groups(model, rank=RANK)
    groups[1]["lr"] = 1e-3                                          # the plain group: a tenth of the lr
    projected = [name for name, _ in groups[0]["params"]]
    optimizer = DCTProjAdam(groups, lr=1e-2, update_proj_gap=2)     # refreshes at steps 1, 3, 5
    reporter = capture_logs()                                        # stands for wandb & co: runs after ours
    trainer = transformers.Trainer(model=model, args=training_args(tmp_path, logging_steps=2),
                                   train_dataset=TokenSequences(), optimizers=(optimizer, None),
                                   callbacks=[reporter])
    add_lowrank_optim_callback(trainer, per_layer=True)
    with pytest.raises(ValueError, match="Invalid trainer: it already has a LowRankOptimCallback"):
        add_lowrank_optim_callback(trainer)
    trainer.train()
    history = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in history] == [2, 4, 6]
    for entry, seen in zip(history, reporter.logs):
        assert {k: v for k, v in entry.items() if k != "step"} == seen          # the same keys reached the reporter
        assert entry["learning_rate/group_0"] == entry["learning_rate"]
        assert entry["learning_rate/group_1"] == pytest.approx(0.1 * entry["learning_rate"])
        assert entry["lowrank/refresh_step"] == entry["step"] - 1                # the latest refresh before the log
        assert 0 < entry["lowrank/captured_mean"] <= 1 and 0 <= entry["lowrank/overlap_mean"] <= 1
        per_layer = [entry[f"lowrank/captured/{name}"] for name in projected]
        assert entry["lowrank/captured_mean"] == pytest.approx(sum(per_layer) / len(per_layer))
        assert all(f"lowrank/overlap/{name}" in entry for name in projected)
    assert history[0]["lowrank/overlap_mean"] == 0          # first refresh: no previous subspace
    assert history[1]["lowrank/overlap_mean"] > 0
    assert "learning_rate/group_0" not in trainer.state.log_history[-1]    # the final summary log is left alone


def test_backward_projection_clips_with_max_grad_norm_as_with_the_callback(tmp_path):
    """Trainer's own clipping (``max_grad_norm``, through accelerate) reads the projected
    gradients' stand-ins: it clips by the norm of what the optimizer uses, exactly as the callback
    does, and never logs a norm that leaves the projected weights out."""
    kwargs = {"lr": 1e-2, "rank": RANK, "update_proj_gap": 3, "residual": "none", "backward_projection": True}

    def trainer(max_grad_norm, callbacks):
        model = tiny_llama()
        return model, transformers.Trainer(
            model=model, train_dataset=TokenSequences(), callbacks=callbacks,
            args=training_args(tmp_path, max_grad_norm=max_grad_norm, gradient_accumulation_steps=2),
            optimizer_cls_and_kwargs=trainer_optimizer("dct_adamw", **kwargs))

    own_model, own = trainer(0.05, None)
    own.train()
    callback_model, by_callback = trainer(0.0, [ClipInOptimizerCallback(0.05)])
    by_callback.train()
    own_norms = [entry["grad_norm"] for entry in own.state.log_history if "loss" in entry]
    callback_norms = [entry["grad_norm/optimizer"] for entry in by_callback.state.log_history if "loss" in entry]
    assert len(own_norms) == 6 and all(norm > 0.05 for norm in own_norms)        # pre-clip: clipping was active
    assert own_norms == pytest.approx(callback_norms, rel=1e-5)
    for a, b in zip(own_model.parameters(), callback_model.parameters()):
        assert torch.allclose(a, b, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=r"Invalid max_grad_norm: 1.0"):
        trainer(1.0, [ClipInOptimizerCallback(0.5)])[1].train()


def test_step_in_backward_runs_inside_the_trainer(tmp_path):
    """``step_in_backward`` with the Trainer's accumulation passed as ``accumulation_steps``: the
    Trainer's clipping is refused (nothing is left to clip); without it the run equals backward
    projection stepped in ``optimizer.step()`` (same staggered schedule, exact accumulation) and
    the logged gradient norm is the one the hooks stepped with."""
    base = {"lr": 1e-2, "rank": RANK, "update_proj_gap": 3, "residual": "none"}

    def trainer(max_grad_norm, **mode):
        model = tiny_llama()
        return model, transformers.Trainer(
            model=model, train_dataset=TokenSequences(),
            args=training_args(tmp_path, max_grad_norm=max_grad_norm, gradient_accumulation_steps=2),
            optimizer_cls_and_kwargs=trainer_optimizer("dct_adamw", **base, **mode))

    in_backward = {"step_in_backward": True, "accumulation_steps": 2}
    with pytest.raises(RuntimeError, match=r"already took its step inside the backward pass"):
        trainer(1.0, **in_backward)[1].train()
    hooks_model, hooks = trainer(0.0, **in_backward)
    hooks.train()
    deferred_model, deferred = trainer(0.0, backward_projection=True)
    deferred.train()
    assert hooks.state.global_step == deferred.state.global_step == 6
    logged = [[entry["grad_norm"] for entry in run.state.log_history if "loss" in entry] for run in (hooks, deferred)]
    assert all(norm > 0 for norm in logged[0]) and logged[0] == pytest.approx(logged[1], rel=1e-5)
    for a, b in zip(hooks_model.parameters(), deferred_model.parameters()):
        assert torch.allclose(a, b, rtol=0, atol=1e-6)
    assert not torch.equal(next(hooks_model.parameters()), next(tiny_llama().parameters()))
