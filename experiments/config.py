"""The run configuration: one typed dataclass, every field a command-line flag with a commented default.

Flag names follow GaLore's ``torchrun_main.py`` where the meaning is the same. Defaults make
``python -m experiments.pretrain`` a few-minute CPU run of a tiny LLaMA on the embedded corpus; the
GaLore protocol values are given beside each default (``experiments/README.md`` has GaLore's 60M
command).

:func:`resolve` turns a parsed config into the resolved one that is printed and saved with every
checkpoint (derived batch sizes, warmup, run name and directories filled in).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

EXPERIMENTS_DIR = Path(__file__).resolve().parent
DEFAULT_CACHE_DIR = EXPERIMENTS_DIR / ".cache"
DEFAULT_RUNS_DIR = Path("runs")
_TOKEN_SUFFIXES = {"K": 10**3, "M": 10**6, "B": 10**9}


def parse_number(text: str) -> int | float:
    """``"32"`` -> 32, ``"0.25"`` -> 0.25 (ranks may be an int or a fraction of the smaller side)."""
    try:
        return int(text)
    except ValueError:
        return float(text)


def parse_token_count(text: str) -> int:
    """``"100M"`` -> 100_000_000; also ``K``, ``B`` and plain integers."""
    text = str(text).strip().upper()
    multiplier = _TOKEN_SUFFIXES.get(text[-1:], 1)
    digits = text[:-1] if text[-1:] in _TOKEN_SUFFIXES else text
    return int(float(digits) * multiplier)


def parse_bool(text: str) -> bool:
    """``--fsdp`` alone, or ``--fsdp true/false`` (what :func:`~experiments.args.config_to_argv` writes)."""
    value = str(text).strip().lower()
    if value not in ("true", "false", "1", "0", "yes", "no"):
        raise ValueError(f"expected true or false, got {text!r}")
    return value in ("true", "1", "yes")


def _flag(default, help: str, **metadata):
    """A config field exposed as ``--<name>``; ``metadata`` holds argparse options (type, choices...)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **metadata})
    return field(default=default, metadata={"help": help, **metadata})


def _derived(help: str):
    """A field filled in by :func:`resolve`, not settable from the command line."""
    return field(default=None, metadata={"help": help, "derived": True})


@dataclass
class TrainConfig:
    """Every setting of a run; the help text of each flag is in its field's metadata."""

    # ---- model ----
    model_config: str = _flag(
        "llama_tiny", "name in experiments/configs/ or path to a LLaMA JSON config (GaLore: llama_60m/130m/350m/1b/7b)"
    )
    model_impl: str = _flag(
        "native", "native: experiments/model.py; hf: transformers.LlamaForCausalLM", choices=("native", "hf")
    )
    dtype: str = _flag("float32", "weights dtype (GaLore: bfloat16)", choices=("float32", "bfloat16"))
    # ---- data ----
    dataset: str = _flag("shakespeare", "shakespeare (embedded, offline) or c4 (streamed, needs the network)")
    tokenizer: str = _flag("byte", "byte, bpe[:vocab] (trained locally, cached) or a hub name (GaLore: t5-base)")
    cache_dir: str | None = _flag(None, "tokenizer/token cache (default experiments/.cache)")
    max_length: int = _flag(128, "sequence length in tokens (GaLore: 256)", type=int)
    batch_size: int = _flag(16, "sequences per device per micro-batch", type=int)
    total_batch_size: int | None = _flag(
        None,
        "sequences per optimizer step over all devices; gradient "
        "accumulation = total / (batch_size * world_size) (GaLore: 512)",
        type=int,
    )
    eval_tokens: int = _flag(65_536, "validation tokens per evaluation (GaLore: about 10M)", type=parse_token_count)
    # ---- schedule ----
    num_training_steps: int = _flag(1000, "optimizer steps (GaLore 60M: 10000)", type=int)
    max_train_tokens: str | None = _flag(None, "token budget such as 100M; overrides num_training_steps")
    scheduler: str = _flag("cosine", "learning-rate schedule after warmup", choices=("cosine", "linear", "constant"))
    warmup_steps: int | None = _flag(None, "linear warmup steps (default 10%% of the steps, as GaLore)", type=int)
    min_lr_ratio: float = _flag(0.1, "final lr as a fraction of the peak", type=float)
    # ---- optimizer ----
    optimizer: str = _flag("dct_adamw", "a name in lowrank_optim's registry or experiments.methods")
    lr: float = _flag(1e-2, "peak learning rate (GaLore recipe: 0.01 with scale 0.25; AdamW: about 1e-3)", type=float)
    weight_decay: float = _flag(0.0, "decoupled weight decay", type=float)
    betas: list[float] | None = _flag(None, "Adam betas (default: the optimizer's own)", type=float, nargs=2)
    eps: float | None = _flag(None, "Adam epsilon (default: the optimizer's own)", type=float)
    grad_clipping: float = _flag(1.0, "max global gradient norm, 0 disables (GaLore default: 0)", type=float)
    optimizer_kwargs: dict = _flag({}, "extra optimizer keyword arguments as JSON", type=json.loads)
    # ---- low-rank projection (projected optimizers) ----
    rank: int | float = _flag(
        32,
        "projection / SST / SLTrain rank; an int, or a fraction of the smaller side "
        "where the optimizer accepts one (GaLore 60M: 128)",
        type=parse_number,
    )
    update_proj_gap: int = _flag(200, "steps between projection refreshes (GaLore: 200)", type=int)
    scale: float = _flag(
        0.25,
        "GaLore's alpha: scale of the back-projected update (GaLore: 0.25)",
        type=float,
        aliases=("--galore_scale",),
    )
    proj_type: str = _flag("std", "GaLore projection side: std, reverse_std, left, right")
    score: str | None = _flag(None, "DCT column score: l1 or l2 (default: the optimizer's)")
    moments: str | None = _flag(None, "moments at a refresh: keep, reset, transport (default: the optimizer's)")
    proj_side: str | None = _flag(None, "DCT side: auto, left, right (default: the optimizer's)")
    target_modules: list[str] = _flag(["attn", "mlp"], "name fragments of the projected linears", nargs="+")
    # ---- parameterization (model transform) ----
    parameterization: str = _flag("auto", "dense, sst, sltrain, or auto (what the optimizer needs)")
    density: float = _flag(0.03, "SLTrain sparse density delta", type=float)
    alpha: float = _flag(32.0, "SLTrain low-rank scale alpha (W = alpha/r * B A + S)", type=float)
    sst_interval: int = _flag(200, "SST steps between singular-vector resamples (paper: 200)", type=int)
    # ---- run ----
    seed: int = _flag(0, "seed of the model init and data order", type=int)
    device: str = _flag("auto", "auto (cuda when available), cpu, cuda")
    fsdp: bool = _flag(
        False,
        "under torchrun: shard parameters, gradients and optimizer state with FSDP2 instead of DDP; "
        "checkpoints by torch.distributed.checkpoint",
        type=parse_bool,
        nargs="?",
        const=True,
    )
    eval_every: int = _flag(100, "steps between validation evaluations (0: only at the end)", type=int)
    save_every: int = _flag(100, "steps between checkpoints (0: no checkpoints)", type=int)
    save_dir: str | None = _flag(None, "run directory: checkpoints, metrics, plots, wandb (default runs/<run_name>)")
    run_name: str | None = _flag(None, "default <model>-<optimizer>-<timestamp>")
    continue_from: str | None = _flag(None, "checkpoint folder model_<step> (or a save_dir: its latest) to resume")
    # ---- logging ----
    wandb_mode: str = _flag(
        "offline", "wandb mode; the files go to <save_dir>/wandb", choices=("online", "offline", "disabled")
    )
    wandb_project: str = _flag("lowrank-optim", "wandb project")
    # ---- derived by resolve() ----
    world_size: int | None = _derived("data-parallel processes (WORLD_SIZE)")
    gradient_accumulation: int | None = _derived("micro-batches per optimizer step on each process")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}")
        return cls(**values)

    def save_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n", encoding="utf-8")

    @classmethod
    def load_json(cls, path: str | Path) -> TrainConfig:
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))


def flag_fields() -> list[dataclasses.Field]:
    """The fields that are command-line flags, in declaration order."""
    return [f for f in dataclasses.fields(TrainConfig) if not f.metadata.get("derived")]


def resolve(config: TrainConfig, world_size: int) -> TrainConfig:
    """Fill in derived values; raise ``ValueError`` for inconsistent batch sizes."""
    total = config.total_batch_size or config.batch_size * world_size
    per_step = config.batch_size * world_size
    if total % per_step:
        raise ValueError(
            f"total_batch_size {total} is not a multiple of batch_size {config.batch_size} x world_size {world_size}"
        )
    steps = config.num_training_steps
    if config.max_train_tokens is not None:
        steps = math.ceil(parse_token_count(config.max_train_tokens) / (total * config.max_length))
    run_name = (
        config.run_name or f"{Path(config.model_config).stem}-{config.optimizer}-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    return dataclasses.replace(
        config,
        total_batch_size=total,
        num_training_steps=steps,
        warmup_steps=config.warmup_steps if config.warmup_steps is not None else steps // 10,
        run_name=run_name,
        save_dir=config.save_dir or str(DEFAULT_RUNS_DIR / run_name),
        cache_dir=config.cache_dir or str(DEFAULT_CACHE_DIR),
        world_size=world_size,
        gradient_accumulation=total // per_step,
    )
