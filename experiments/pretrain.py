"""Pretrain a LLaMA with any optimizer of ``lowrank_optim``: ``python -m experiments.pretrain [flags]``.

With no flags: a tiny LLaMA on the embedded Shakespeare corpus with ``dct_adamw``, a few minutes on
a 2-core CPU (``--threads`` auto: the cores not already busy), writing everything under
``runs/<run_name>/``. Multi-GPU: ``torchrun
--nproc_per_node N -m experiments.pretrain ...`` (DDP; add ``--fsdp`` for FSDP2 sharding).
Flags: ``--help`` or ``experiments/config.py``.

One optimizer step = ``gradient_accumulation`` micro-batches per process; the loop evaluates every
``eval_every`` steps, checkpoints atomically every ``save_every`` steps (``experiments/checkpoint.py``;
the newest ``keep_last`` are kept) and ends with a validation, a final checkpoint and
``loss_curve.png``; ``0`` for either period means at the end only. A run writes only into a folder of
its own (``experiments/run_folder.py``). Ctrl-C (single process) stops after the current step with a
final checkpoint and plot. It never waits for the device
between logs (``experiments/log_window.py``): training metrics are read back every ``log_every``
steps and at the first, evaluation, checkpoint and last steps.

A user mistake in the flags, a config file or a checkpoint (:class:`~experiments.errors.UsageError`,
checked up front by ``experiments/config_checks.py``) ends :func:`main` with one line
``error: <flag or file>: <message>`` on stderr and exit status 2.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

import lowrank_optim
from experiments.args import parse_config
from experiments.checkpoint import (
    MODEL_FILE,
    OPTIMIZER_FILE,
    load_checkpoint,
    load_state_into,
    resolve_checkpoint,
    save_checkpoint,
)
from experiments.checkpoint_sharded import load_sharded_checkpoint, save_sharded_checkpoint
from experiments.config import TrainConfig, resolve
from experiments.config_checks import check_config, explain_optimizer_keyword
from experiments.data import build_data
from experiments.data_interface import BatchLoader, DataBundle, DataSpec
from experiments.distributed import (
    DistributedContext,
    barrier,
    setup_distributed,
    shard_model,
    teardown_distributed,
)
from experiments.errors import UsageError
from experiments.evaluation import evaluate, next_token_loss
from experiments.log_window import LogWindow
from experiments.logging_utils import RunLogger, perplexity, projection_health, read_metrics
from experiments.memory import optimizer_state_bytes, parameter_counts, peak_memory_bytes
from experiments.methods import (
    apply_parameterization,
    build_optimizer,
    info_for,
    projection_rank,
    resolved_parameterization,
)
from experiments.model import Llama
from experiments.model_factory import build_model, store_weights
from experiments.model_hf import HFLlama
from experiments.plotting import plot_run
from experiments.run_folder import prune_checkpoints, resumes_in_place, truncate_metrics
from experiments.schedulers import build_scheduler

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
LOSS_PLOT = "loss_curve.png"
USAGE_ERROR_STATUS = 2  # as argparse's
INTERRUPTED_STATUS = 130  # 128 + SIGINT, as a shell reports a Ctrl-C


class RunInterrupted(Exception):
    """Ctrl-C stopped the run after a step; its final checkpoint and plot are written (the message says where)."""


@dataclass
class TrainResult:
    """Summary of a finished run (the per-step curves are in ``<save_dir>/metrics.jsonl``)."""

    config: TrainConfig
    final_val_loss: float
    final_val_perplexity: float
    tokens_per_second: float
    optimizer_state_bytes: int
    trainable_parameters: int
    total_parameters: int
    wall_seconds: float


@dataclass
class Progress:
    """Counters saved in every checkpoint."""

    step: int = 0
    tokens_seen: int = 0
    wandb_id: str = ""


def to_device(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``batch`` on ``device`` without waiting for it: a copy from pageable host memory makes the host
    wait for all queued GPU work, one from pinned memory (``non_blocking``) is queued like a kernel."""
    if device.type != "cuda":
        return batch.to(device)
    return batch.pin_memory().to(device, non_blocking=True)


def train_step(
    model: nn.Module,
    loader: BatchLoader,
    optimizer: torch.optim.Optimizer,
    config: TrainConfig,
    pad_id: int,
    context: DistributedContext,
) -> torch.Tensor:
    """One optimizer step over ``gradient_accumulation`` micro-batches; returns the mean loss, a
    detached 0-d tensor on the device (nothing here waits for the device).

    Under ``--step_in_backward`` the last micro-batch's backward pass takes every parameter's step
    and frees its gradient; ``optimizer.step()`` then only closes the window. Nothing here reads a
    gradient, and ``--grad_clipping`` is 0 in that mode (``config_checks`` refuses anything else)."""
    total = torch.zeros((), device=context.device)
    for micro_step in range(config.gradient_accumulation):
        ids = to_device(loader.next_batch(), context.device)
        last = micro_step == config.gradient_accumulation - 1
        # DDP all-reduces (FSDP2 reduce-scatters) gradients on the last micro-batch only.
        if config.fsdp:
            model.set_requires_gradient_sync(last)
        ddp = isinstance(model, DistributedDataParallel)
        with contextlib.nullcontext() if last or not ddp else model.no_sync():
            loss = next_token_loss(model(ids), ids, pad_id)
            (loss / config.gradient_accumulation).backward()
        total += loss.detach()
    if config.grad_clipping > 0:
        # By the norm of what the optimizer uses (projected gradients under --backward_projection);
        # FSDP2's sharded gradients go through torch's DTensor-aware clip.
        if config.fsdp:
            nn.utils.clip_grad_norm_(model.parameters(), config.grad_clipping)
        else:
            lowrank_optim.clip_grad_norm_(optimizer, config.grad_clipping)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total / config.gradient_accumulation


def rng_states(device: torch.device) -> dict:
    states = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def restore_rng_states(states: dict, device: torch.device) -> None:
    torch.set_rng_state(states["torch"])
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"], device)


def enable_activation_checkpointing(model: nn.Module, config: TrainConfig) -> None:
    """``--activation_checkpointing``: recompute each decoder layer in the backward pass.

    The native :class:`~experiments.model.Llama` (also under SST / SLTrain, which replace its
    linears in place) checkpoints its layers when ``activation_checkpointing`` is set; Hugging
    Face's model through ``activation_checkpointing_enable`` (``gradient_checkpointing_enable``
    before transformers 5), non-reentrant as the native one. Under
    FSDP2 the attribute, set before sharding, changes only the forward. A model that is neither (a
    parameterization that wrapped it) is refused: the flag could not reach its layers."""
    if isinstance(model, Llama):
        model.activation_checkpointing = True
    elif isinstance(model, HFLlama):
        # transformers 5 renamed gradient_checkpointing_enable (kept as a deprecated alias).
        enable = getattr(model.hf, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        raise UsageError(
            "--activation_checkpointing",
            f"cannot reach the decoder layers of the model that parameterization "
            f"{resolved_parameterization(config)!r} built ({type(model).__name__}, not the LLaMA of "
            f"--model_impl {config.model_impl}); train without --activation_checkpointing",
        )


@dataclass
class Run:
    """Everything a training run holds; ``model`` is unwrapped, ``wrapped`` is what trains (DDP or
    not; FSDP2 shards ``model`` in place, so both are the same module)."""

    config: TrainConfig
    context: DistributedContext
    data: DataBundle
    model: nn.Module
    wrapped: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    progress: Progress


def build_run(config: TrainConfig, context: DistributedContext) -> Run:
    """Data, model (parameterized, cast), optimizer and schedule of ``config``, fresh or resumed."""
    torch.manual_seed(config.seed)
    data = build_data(
        DataSpec(
            dataset=config.dataset,
            tokenizer=config.tokenizer,
            max_length=config.max_length,
            batch_size=config.batch_size,
            eval_tokens=config.eval_tokens,
            seed=config.seed,
            cache_dir=Path(config.cache_dir),
            rank=context.rank,
            world_size=context.world_size,
        )
    )
    model = build_model(config.model_config, config.model_impl, data.tokenizer.vocab_size).to(context.device)
    model = apply_parameterization(model, config).to(dtype=DTYPES[config.dtype])
    store_weights(model, config.weight_bits)
    if config.activation_checkpointing:
        enable_activation_checkpointing(model, config)
    if config.fsdp:
        model = shard_model(model, context)
    try:
        optimizer = build_optimizer(model, config)
    except (UsageError, TypeError) as error:
        raise explain_optimizer_keyword(error, config) from None
    scheduler = build_scheduler(
        optimizer, config.scheduler, config.warmup_steps, config.num_training_steps, config.min_lr_ratio
    )
    # Under ``wandb agent`` the sweep assigns the run id; otherwise a fresh one, kept across resumes.
    progress = Progress(wandb_id=os.environ.get("WANDB_RUN_ID") or uuid.uuid4().hex[:12])
    run = Run(config, context, data, model, model, optimizer, scheduler, progress)
    if config.continue_from:
        restore_run(run, resolve_checkpoint(config.continue_from))
    # DDP broadcasts rank 0's (possibly restored) weights; under --backward_projection (and
    # --step_in_backward, which implies it) the optimizer all-reduces the projected gradients itself
    # and broadcast the weights when it was built. With int8 weights DDP cannot broadcast (its
    # buckets concatenate them with float parameters, which torchao's tensor refuses): every rank
    # built and restored the same weights from the same seed and checkpoint, so none is needed.
    if context.enabled and not config.fsdp and not (config.backward_projection or config.step_in_backward):
        device_ids = [context.device] if context.device.type == "cuda" else None
        run.wrapped = DistributedDataParallel(model, device_ids=device_ids, init_sync=config.weight_bits is None)
    return run


def restore_run(run: Run, folder: Path) -> None:
    """Load model, optimizer, schedule, data position, RNG states and counters from a checkpoint."""
    if run.config.fsdp:
        training = load_sharded_checkpoint(folder, run.model, run.optimizer)
    else:
        state = load_checkpoint(folder, map_location=run.context.device)
        load_state_into(run.model, state["model"], folder / MODEL_FILE)
        load_state_into(run.optimizer, state["optimizer"], folder / OPTIMIZER_FILE)
        training = state["training_state"]
    run.scheduler.load_state_dict(training["scheduler"])
    run.data.train.load_state_dict(training["data"])
    restore_rng_states(training["rng"], run.context.device)
    run.progress = Progress(**training["progress"])
    if not resumes_in_place(run.config) and not os.environ.get("WANDB_RUN_ID"):
        run.progress.wandb_id = uuid.uuid4().hex[:12]  # a new folder is a new wandb run
    if run.progress.step >= run.config.num_training_steps:
        raise UsageError(
            "--num_training_steps",
            f"expected more than the {run.progress.step} steps that {folder} has trained, got "
            f"{run.config.num_training_steps}: nothing is left to train",
        )
    if run.context.is_main:
        print(f"resumed from {folder} at step {run.progress.step}", flush=True)


def save_run(run: Run) -> None:
    """Checkpoint ``run`` atomically as ``save_dir/model_<step>`` (rank 0 writes, every rank waits;
    with FSDP2 every rank writes its shards)."""
    training_state = {
        "progress": vars(run.progress).copy(),
        "scheduler": run.scheduler.state_dict(),
        "data": run.data.train.state_dict(),
        "rng": rng_states(run.context.device),
    }
    if run.config.fsdp:
        save_sharded_checkpoint(
            run.config.save_dir,
            run.progress.step,
            model=run.model,
            optimizer=run.optimizer,
            training_state=training_state,
            config=run.config,
        )
    elif run.context.is_main:
        save_checkpoint(
            run.config.save_dir,
            run.progress.step,
            model_state=run.model.state_dict(),
            optimizer_state=run.optimizer.state_dict(),
            training_state=training_state,
            config=run.config,
        )
    barrier(run.context)
    if run.context.is_main:
        prune_checkpoints(run.config.save_dir, run.config.keep_last)


def peak_lrs(config: TrainConfig) -> str:
    """``lr <peak lr>``, followed by `` (plain <plain lr>)`` when ``--plain_lr`` is set."""
    plain = f" (plain {config.plain_lr:g})" if config.plain_lr is not None else ""
    return f"lr {config.lr:g}{plain}"


def plot_title(config: TrainConfig) -> str:
    """``<run name>: <optimizer>, lr <peak lr>[ (plain <plain lr>)][, rank <r>]`` (rank only where a
    projection uses it)."""
    rank = f", rank {projection_rank(config):g}" if resolved_parameterization(config) != "dense" or info_for(
        config.optimizer).projection_keys else ""
    return f"{config.run_name}: {config.optimizer}, {peak_lrs(config)}{rank}"


class StopRequest:
    """The first Ctrl-C (SIGINT) asks the loop to stop after the current step, save and plot; the
    handler is then the default one again, so a second Ctrl-C stops at once. Single process only:
    under torchrun the ranks would stop at different steps."""

    def __init__(self, bar) -> None:
        self.requested = False
        self._bar = bar
        self._previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, self._previous)
        self._bar.write("Ctrl-C: stopping after this step to save a checkpoint and the plot (Ctrl-C again: quit now)")

    def restore(self) -> None:
        signal.signal(signal.SIGINT, self._previous)


def every(step: int, period: int) -> bool:
    """Whether ``step`` is a multiple of ``period`` (``0``: never)."""
    return period > 0 and step % period == 0


def logs_after(step: int, config: TrainConfig) -> bool:
    """Whether the loop reads the training metrics back from the device after ``step``: every
    ``log_every`` steps, at the first and the last step, and at evaluation and checkpoint steps
    (which wait for the device anyway). Ending a window at every checkpoint makes a resumed run
    log the same windows, hence the same values, as an uninterrupted one."""
    return (
        every(step, config.log_every)
        or step in (1, config.num_training_steps)
        or every(step, config.eval_every)
        or every(step, config.save_every)
    )


def configure_threads(config: TrainConfig, device: torch.device) -> int:
    """Set torch's CPU threads (``--threads``) and return them. ``0`` (auto) keeps what
    ``OMP_NUM_THREADS`` set, or on the CPU takes the cores not already busy (the 1-minute load
    average; shared among this machine's processes of the run): on a busy small machine OpenMP
    threads that wait for a core slow every matmul down several times (experiments/README.md)."""
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    elif "OMP_NUM_THREADS" not in os.environ and device.type == "cpu":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        free = cores - round(os.getloadavg()[0]) if hasattr(os, "getloadavg") else cores
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(max(1, min(torch.get_num_threads(), free // local_processes)))
    return torch.get_num_threads()


def train(config: TrainConfig) -> TrainResult:
    """Run (or resume) the training that ``config`` describes; a user mistake in it raises
    :class:`~experiments.errors.UsageError` before anything is built; a Ctrl-C (single process)
    :class:`RunInterrupted` once its checkpoint and plot are written."""
    check_config(config)
    context = setup_distributed(config.device, config.fsdp)
    configure_threads(config, context.device)
    try:
        return _train(resolve(config, context.world_size), context)
    finally:
        teardown_distributed(context)


def _train(config: TrainConfig, context: DistributedContext) -> TrainResult:
    run = build_run(config, context)  # first: a run refused while building leaves save_dir untouched
    save_dir = Path(config.save_dir)
    progress, optimizer, pad_id = run.progress, run.optimizer, run.data.tokenizer.pad_id
    if context.is_main:
        save_dir.mkdir(parents=True, exist_ok=True)
        config.save_json(save_dir / "config.json")  # the full resolved config; the console gets a summary
        if config.continue_from and resumes_in_place(config):
            truncate_metrics(save_dir, progress.step)  # the steps after the checkpoint are logged again
    trainable, total_params = parameter_counts(run.model)
    if context.is_main:
        print(
            f"{config.run_name}: {config.model_config} ({total_params / 1e6:.2f}M parameters, "
            f"{trainable / 1e6:.2f}M trainable, {resolved_parameterization(config)}), {config.optimizer} "
            f"{peak_lrs(config)}, {config.num_training_steps} steps x {config.total_batch_size} x {config.max_length} "
            f"tokens, {config.gradient_accumulation} micro-batch(es) x {config.world_size} process(es)"
            f"{' (FSDP2)' if config.fsdp else ''} on {context.device.type}"
            f"{f' ({torch.get_num_threads()} CPU threads)' if context.device.type == 'cpu' else ''}; "
            f"config and metrics in {save_dir}",
            flush=True,
        )
    logger = RunLogger(config, progress.wandb_id, enabled=context.is_main)
    tokens_per_step = config.total_batch_size * config.max_length

    def validate() -> float:
        loss = evaluate(run.model, run.data.validation_batches(), pad_id, context)
        logger.log(progress.step, {"val/loss": loss, "val/perplexity": perplexity(loss)})
        return loss

    bar = tqdm(
        total=config.num_training_steps,
        initial=progress.step,
        disable=not context.is_main,
        desc=config.run_name,
        dynamic_ncols=True,
        mininterval=1.0,
    )
    start = time.perf_counter()
    first_step = progress.step
    val_loss, validated_step = float("nan"), None
    saved_step = progress.step if config.continue_from else None
    window = LogWindow(context.device)
    in_main_thread = threading.current_thread() is threading.main_thread()  # where signal handlers go
    stop = StopRequest(bar) if not context.enabled and in_main_thread else None
    try:
        while progress.step < config.num_training_steps and not (stop and stop.requested):
            lr = run.scheduler.get_last_lr()[0]
            loss = train_step(run.wrapped, run.data.train, optimizer, config, pad_id, context)
            run.scheduler.step()
            progress.step += 1
            progress.tokens_seen += tokens_per_step
            window.add(loss, tokens_per_step)
            window.note_refresh(progress.step, projection_health(optimizer))
            if progress.step == first_step + 1:  # the first step of a process includes one-time warm-up
                window.end_warmup()
            bar.update(1)
            if not logs_after(progress.step, config) and not (stop and stop.requested):
                continue
            summary = window.close(context)
            metrics = {
                "train/loss": summary.loss,
                "train/perplexity": perplexity(summary.loss),
                "lr": float(lr),           # a 0-d tensor for optimizers that keep one (torchao)
                "tokens_seen": progress.tokens_seen,
                "throughput/tokens_per_s": summary.tokens_per_second,
                "memory/peak_bytes": peak_memory_bytes(context.device),
                "optimizer/state_bytes": optimizer_state_bytes(optimizer),
                **summary.projection,
            }
            logger.log(progress.step, metrics)
            bar.set_postfix(loss=f"{summary.loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{summary.tokens_per_second:.0f}")
            if every(progress.step, config.eval_every):
                val_loss, validated_step = validate(), progress.step
                if context.is_main:
                    bar.write(f"step {progress.step}: val loss {val_loss:.4f}, ppl {perplexity(val_loss):.2f}")
            if every(progress.step, config.save_every):
                save_run(run)
                saved_step = progress.step
            window.reset()
    finally:
        if stop is not None:
            stop.restore()  # also when the loop raised
    bar.close()
    wall = time.perf_counter() - start
    # A Ctrl-C during the last step changes nothing: the run ends as usual.
    interrupted = stop is not None and stop.requested and progress.step < config.num_training_steps

    if interrupted:
        if saved_step != progress.step and progress.step > 0:
            save_run(run)
        logger.finish()
        plot = plot_run(read_metrics(logger.path), save_dir / LOSS_PLOT, title=plot_title(config))
        raise RunInterrupted(
            f"stopped at step {progress.step} of {config.num_training_steps}; checkpoint "
            f"{save_dir / f'model_{progress.step}'}, plot {plot}; resume with --continue_from {save_dir}"
        )
    if validated_step != progress.step:
        val_loss = validate()
    if saved_step != progress.step:
        save_run(run)  # every run ends with a checkpoint (--save_every 0: that one only)
    state_bytes = optimizer_state_bytes(optimizer)
    logger.finish()
    result = TrainResult(
        config=config,
        final_val_loss=val_loss,
        final_val_perplexity=perplexity(val_loss),
        tokens_per_second=window.run_tokens_per_second(),
        optimizer_state_bytes=state_bytes,
        trainable_parameters=trainable,
        total_parameters=total_params,
        wall_seconds=wall,
    )
    if context.is_main:
        plot = plot_run(read_metrics(logger.path), save_dir / LOSS_PLOT, title=plot_title(config))
        print(
            f"done: step {progress.step}, {progress.tokens_seen:,} tokens, {wall:.0f} s "
            f"({result.tokens_per_second:.0f} tokens/s); final val loss {val_loss:.4f}, "
            f"ppl {result.final_val_perplexity:.2f}; optimizer state {state_bytes / 2**20:.2f} MiB"
            f"{' on rank 0' if config.fsdp else ''}; "
            f"plot {plot}",
            flush=True,
        )
    return result


def main(argv: Sequence[str] | None = None) -> None:
    """Train as the command line says; a user mistake ends with one line on stderr and status 2."""
    try:
        train(parse_config(argv))
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(USAGE_ERROR_STATUS) from None
    except RunInterrupted as interrupted:
        print(f"interrupted: {interrupted}", file=sys.stderr, flush=True)
        raise SystemExit(INTERRUPTED_STATUS) from None
    except KeyboardInterrupt:  # before the training loop, or a second Ctrl-C
        print("interrupted: nothing saved after the last checkpoint", file=sys.stderr, flush=True)
        raise SystemExit(INTERRUPTED_STATUS) from None


if __name__ == "__main__":
    main(sys.argv[1:])
