"""The run configuration: one typed dataclass, every field a command-line flag with a commented default.

Flag names follow GaLore's ``torchrun_main.py`` where the meaning is the same. Defaults make
``python -m experiments.pretrain`` a few-minute CPU run of a tiny LLaMA on the embedded corpus; the
GaLore protocol values are given beside each default (``experiments/README.md`` has GaLore's 60M
command).

:func:`resolve` turns a parsed config into the resolved one that is printed and saved with every
checkpoint (derived batch sizes, warmup, run name and directories filled in).

Each numeric flag declares the values it accepts (``valid``: :class:`Interval`); :func:`check_values`
checks every field against them and against its ``choices``, so a config read from a file is held
to the same rules as the command line. A value out of range raises
:class:`~experiments.errors.UsageError` naming the flag.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from experiments.errors import UsageError, expected_one_of, read_json_object

EXPERIMENTS_DIR = Path(__file__).resolve().parent
DEFAULT_CACHE_DIR = EXPERIMENTS_DIR / ".cache"
DEFAULT_RUNS_DIR = Path("runs")
_TOKEN_SUFFIXES = {"K": 10**3, "M": 10**6, "B": 10**9}


def parse_number(text: str) -> int | float:
    """``"32"`` -> 32, ``"0.25"`` -> 0.25 (ranks may be an int or a fraction of the smaller side)."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"expected an integer or a number such as 0.25, got {text!r}") from None


def parse_token_count(text: str) -> int:
    """``"100M"`` -> 100_000_000; also ``K``, ``B`` and plain integers."""
    upper = str(text).strip().upper()
    multiplier = _TOKEN_SUFFIXES.get(upper[-1:], 1)
    digits = upper[:-1] if upper[-1:] in _TOKEN_SUFFIXES else upper
    try:
        count = float(digits) * multiplier
    except ValueError:
        raise ValueError(f"expected a token count such as 4096, 64K, 100M or 1.5B, got {text!r}") from None
    if not math.isfinite(count):
        raise ValueError(f"expected a finite token count, got {text!r}")
    return int(count)


def parse_bool(text: str) -> bool:
    """``--fsdp`` alone, or ``--fsdp true/false`` (what :func:`~experiments.args.config_to_argv` writes)."""
    value = str(text).strip().lower()
    if value not in ("true", "false", "1", "0", "yes", "no"):
        raise ValueError(f"expected true or false, got {text!r}")
    return value in ("true", "1", "yes")


def parse_json_object(text: str) -> dict:
    """``'{"residual": "none"}'`` -> ``{"residual": "none"}``; anything but a JSON object is refused."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f'expected a JSON object such as \'{{"residual": "none"}}\': {error} in {text!r}') from None
    if not isinstance(value, dict):
        raise ValueError(f'expected a JSON object such as \'{{"residual": "none"}}\', got {text!r}')
    return value


@dataclass(frozen=True)
class Interval:
    """The values a numeric flag accepts: finite numbers from ``low`` to ``high`` (``None``: no
    bound), each end included unless it is open; only integers when ``integer``."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False

    @classmethod
    def integers(cls, minimum: int) -> Interval:
        return cls(low=minimum, integer=True)

    def accepts(self, value) -> bool:
        if isinstance(value, bool) or not isinstance(value, int if self.integer else (int, float)):
            return False
        if not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or value < self.high or (not self.high_open and value == self.high)

    def __str__(self) -> str:
        kind = "an integer" if self.integer else "a finite number"
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"{kind} in {left}{self.low:g}, {self.high:g}{right}"
        if self.low is not None:
            return f"{kind} {'>' if self.low_open else '>='} {self.low:g}"
        return kind


POSITIVE = Interval(low=0.0, low_open=True)
NON_NEGATIVE = Interval(low=0.0)
# Flags that every optimizer receives as a keyword, so ``--optimizer_kwargs`` may set them too.
OPTIMIZER_FLAGS = ("lr", "weight_decay", "betas", "eps")


def _flag(default, help: str, **metadata):
    """A config field exposed as ``--<name>``; ``metadata`` holds argparse options (type, choices...),
    ``valid`` (:class:`Interval`), ``aliases``, ``default_text`` (what a ``None`` default means, for
    ``--help``) and ``switch`` (a boolean: ``--name`` / ``--no-name``, or ``--name true|false``)."""
    if metadata.get("switch"):
        metadata = {"type": parse_bool, **metadata}
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
    weight_bits: int | None = _flag(
        None,
        "8: store every nn.Linear weight but the head as int8 codes with one --dtype scale per row "
        "(lowrank_optim.weights), updated by the library's optimizers with stochastic rounding",
        type=int,
        choices=(8,),
        valid=Interval(low=8, high=8, integer=True),
        default_text="--dtype weights",
    )
    # ---- data ----
    dataset: str = _flag("shakespeare", "shakespeare (embedded, offline) or c4 (streamed, needs the network)")
    tokenizer: str = _flag("byte", "byte, bpe[:vocab] (trained locally, cached) or a hub name (GaLore: t5-base)")
    cache_dir: str | None = _flag(None, "tokenizer/token cache", default_text="experiments/.cache")
    max_length: int = _flag(128, "sequence length in tokens (GaLore: 256)", type=int, valid=Interval.integers(2))
    batch_size: int = _flag(16, "sequences per device per micro-batch", type=int, valid=Interval.integers(1))
    total_batch_size: int | None = _flag(
        None,
        "sequences per optimizer step over all devices; gradient "
        "accumulation = total / (batch_size * world_size) (GaLore: 512)",
        type=int,
        valid=Interval.integers(1),
    )
    eval_tokens: int = _flag(
        65_536,
        "validation tokens per evaluation (GaLore: about 10M)",
        type=parse_token_count,
        valid=Interval.integers(1),
    )
    # ---- schedule ----
    num_training_steps: int = _flag(1000, "optimizer steps (GaLore 60M: 10000)", type=int, valid=Interval.integers(1))
    max_train_tokens: str | None = _flag(None, "token budget such as 100M; overrides num_training_steps")
    scheduler: str = _flag("cosine", "learning-rate schedule after warmup", choices=("cosine", "linear", "constant"))
    warmup_steps: int | None = _flag(
        None, "linear warmup steps", type=int, valid=Interval.integers(0), default_text="10% of the steps, as GaLore"
    )
    min_lr_ratio: float = _flag(0.1, "final lr as a fraction of the peak", type=float, valid=Interval(0.0, 1.0))
    # ---- optimizer ----
    optimizer: str = _flag("dct_adamw", "optimizer name (lowrank_optim's registry or experiments.methods)")
    lr: float = _flag(
        1e-2, "peak learning rate (GaLore recipe: 0.01 with scale 0.25; AdamW: about 1e-3)", type=float, valid=POSITIVE
    )
    plain_lr: float | None = _flag(
        None,
        "peak learning rate of the parameters a projected optimizer does not project (its plain group: "
        "embedding, norms, head, plain AdamW), scheduled like --lr; only for optimizers with GaLore's groups",
        type=float,
        valid=POSITIVE,
        default_text="--lr",
    )
    weight_decay: float = _flag(0.0, "decoupled weight decay", type=float, valid=NON_NEGATIVE)
    betas: list[float] | None = _flag(
        None,
        "Adam betas",
        type=float,
        nargs=2,
        default_text="the optimizer's own",
        valid=Interval(0.0, 1.0, high_open=True),
    )
    eps: float | None = _flag(
        None, "Adam epsilon", type=float, valid=NON_NEGATIVE, default_text="the optimizer's own"
    )
    grad_clipping: float = _flag(
        1.0, "max global gradient norm, 0 disables (GaLore default: 0)", type=float, valid=NON_NEGATIVE
    )
    optimizer_kwargs: dict = _flag({}, "extra optimizer keyword arguments as a JSON object", type=parse_json_object)
    # ---- low-rank projection (projected optimizers) ----
    rank: int | float = _flag(
        32,
        "projection / SST / SLTrain rank; an int, or a fraction of the smaller side "
        "where the optimizer accepts one (GaLore 60M: 128)",
        type=parse_number,
        valid=(Interval.integers(1), Interval(0.0, 1.0, low_open=True)),
    )
    update_proj_gap: int = _flag(
        200, "steps between projection refreshes (GaLore: 200)", type=int, valid=Interval.integers(1)
    )
    scale: float = _flag(
        0.25,
        "GaLore's alpha: scale of the back-projected update (GaLore: 0.25)",
        type=float,
        valid=POSITIVE,
        aliases=("--galore_scale",),
    )
    proj_type: str = _flag("std", "GaLore projection side", choices=("std", "reverse_std", "left", "right"))
    score: str | None = _flag(None, "DCT column score", choices=("l1", "l2"), default_text="the optimizer's")
    moments: str | None = _flag(
        None, "moments at a refresh", choices=("keep", "reset", "transport"), default_text="the optimizer's"
    )
    proj_side: str | None = _flag(
        None, "DCT side", choices=("auto", "reverse_std", "left", "right"), default_text="the optimizer's"
    )
    target_modules: list[str] = _flag(["attn", "mlp"], "name fragments of the projected linears", nargs="+")
    # ---- parameterization (model transform) ----
    parameterization: str = _flag("auto", "dense, sst, sltrain, or auto (what the optimizer needs)")
    density: float = _flag(0.03, "SLTrain sparse density delta", type=float, valid=Interval(0.0, 1.0, low_open=True))
    alpha: float = _flag(32.0, "SLTrain low-rank scale alpha (W = alpha/r * B A + S)", type=float, valid=POSITIVE)
    sst_interval: int = _flag(
        200, "SST steps between singular-vector resamples (paper: 200)", type=int, valid=Interval.integers(1)
    )
    # ---- run ----
    seed: int = _flag(0, "seed of the model init and data order", type=int, valid=Interval.integers(0))
    device: str = _flag("auto", "auto: cuda when available", choices=("auto", "cpu", "cuda"))
    threads: int = _flag(
        0,
        "CPU threads of torch (torch.set_num_threads); 0: OMP_NUM_THREADS when set, else on the CPU the "
        "cores not already busy (1-minute load average), at least 1",
        type=int,
        valid=Interval.integers(0),
    )
    # The four switches below are plain flags (--fsdp, --no-fsdp); experiments/README.md has the details.
    backward_projection: bool = _flag(
        False,
        "project gradients inside the backward pass (dct_adamw, galore_adamw; residual off; not with --fsdp)",
        switch=True,
    )
    step_in_backward: bool = _flag(
        False,
        "take each parameter's optimizer step inside the backward pass (dct_adamw, galore_adamw, apollo_adamw, "
        "apollo_mini); implies --backward_projection, needs --grad_clipping 0",
        switch=True,
    )
    activation_checkpointing: bool = _flag(
        False, "recompute each decoder layer in the backward pass instead of keeping its activations", switch=True
    )
    fsdp: bool = _flag(False, "under torchrun: FSDP2 sharding instead of DDP", switch=True)
    # ---- evaluation and checkpoints ----
    # Both periods read the same way: every N steps and at the last step; 0: at the last step only.
    eval_every: int = _flag(
        100, "steps between validations; 0: only the final one", type=int, valid=Interval.integers(0)
    )
    save_every: int = _flag(
        100, "steps between checkpoints; 0: only the final one", type=int, valid=Interval.integers(0)
    )
    keep_last: int = _flag(
        3, "checkpoints kept in save_dir, oldest deleted first, the newest never; 0: keep all", type=int,
        valid=Interval.integers(0),
    )
    save_dir: str | None = _flag(
        None, "run folder: checkpoints, metrics, plot, wandb", default_text="runs/<run_name>"
    )
    run_name: str | None = _flag(None, "name of the run", default_text="<model>-<optimizer>-<timestamp>")
    continue_from: str | None = _flag(
        None, "resume from a checkpoint model_<step> (or a run folder: its latest); with --run_name or "
        "--save_dir the resumed run writes to a new folder"
    )
    # ---- logging ----
    # Logging reads the loss (and the optimizer statistics) back from the device, a host sync; in
    # between, the loop only queues work. 10 as torchtitan's log_freq; 1 logs every step.
    log_every: int = _flag(
        10,
        "steps between training-loss logs (the mean since the previous log; first, eval, checkpoint "
        "and last steps also log)",
        type=int,
        valid=Interval.integers(1),
    )
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
        """The config saved in ``path``, its values checked (:func:`check_values`); a missing, unreadable
        or malformed file, or a value its flag would refuse, is a :class:`UsageError` naming the file."""
        values = read_json_object(path, expected="a saved run config", keys="config keys",
                                  missing="a run's config.json was expected here")
        try:
            config = cls.from_dict(values)
        except ValueError as error:
            raise UsageError(str(path), f"{error}; expected the flags of experiments/config.py") from None
        try:
            check_values(config)
        except UsageError as error:
            raise UsageError(str(path), str(error)) from None
        return config


def flag_fields() -> list[dataclasses.Field]:
    """The fields that are command-line flags, in declaration order."""
    return [f for f in dataclasses.fields(TrainConfig) if not f.metadata.get("derived")]


def _problem(field: dataclasses.Field, value) -> str | None:
    """What is wrong with ``value`` for ``field`` (``None`` when nothing): its range, choices, type."""
    if value is None and field.default is None:
        return None
    nargs = field.metadata.get("nargs")
    if isinstance(nargs, int) or nargs == "+":  # a list (``"?"``: one optional value)
        if not isinstance(value, (list, tuple)) or (nargs == "+" and not value):
            return f"expected a list of values, got {value!r}"
        if isinstance(nargs, int) and len(value) != nargs:
            return f"expected {nargs} values, got {len(value)}: {value!r}"
        elements = value
    else:
        elements = [value]
    choices, valid = field.metadata.get("choices"), field.metadata.get("valid")
    for element in elements:
        if choices is not None and element not in choices:
            return expected_one_of(element, choices)
        if valid is not None:
            intervals = valid if isinstance(valid, tuple) else (valid,)
            if not any(interval.accepts(element) for interval in intervals):
                return f"expected {' or '.join(map(str, intervals))}, got {element!r}"
        if choices is None and valid is None:
            default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
            kind = type(default) if isinstance(default, (bool, dict)) else str
            if not isinstance(element, kind):
                return f"expected a {kind.__name__} value, got {element!r}"
    return None


def check_values(config: TrainConfig) -> None:
    """Raise :class:`UsageError` for the first flag whose value its field does not accept, or an
    ``optimizer_kwargs`` entry for one of :data:`OPTIMIZER_FLAGS` that the flag would not accept
    (``torch.optim.AdamW`` checks betas only by indexing them)."""
    fields = {flag.name: flag for flag in flag_fields()}
    for flag in fields.values():
        problem = _problem(flag, getattr(config, flag.name))
        if problem:
            raise UsageError(f"--{flag.name}", problem)
    for key in OPTIMIZER_FLAGS:
        if key in config.optimizer_kwargs:
            problem = _problem(fields[key], config.optimizer_kwargs[key])
            if problem:
                raise UsageError("--optimizer_kwargs", f"{key}: {problem}")


def _training_steps(config: TrainConfig, tokens_per_step: int) -> int:
    """``num_training_steps``, or the steps that ``max_train_tokens`` buys."""
    if config.max_train_tokens is None:
        return config.num_training_steps
    try:
        budget = parse_token_count(config.max_train_tokens)
    except ValueError as error:
        raise UsageError("--max_train_tokens", str(error)) from None
    if budget < 1:
        raise UsageError("--max_train_tokens", f"expected a positive token count, got {config.max_train_tokens!r}")
    return math.ceil(budget / tokens_per_step)


def resolve(config: TrainConfig, world_size: int) -> TrainConfig:
    """Fill in derived values; raise :class:`UsageError` for batch sizes or warmup that do not fit."""
    total = config.total_batch_size or config.batch_size * world_size
    per_step = config.batch_size * world_size
    if total % per_step:
        raise UsageError(
            "--total_batch_size",
            f"expected a multiple of batch_size x world_size = {config.batch_size} x {world_size} = {per_step}, "
            f"got {total}",
        )
    steps = _training_steps(config, total * config.max_length)
    if config.warmup_steps is not None and config.warmup_steps > steps:
        raise UsageError("--warmup_steps", f"expected at most the {steps} training steps, got {config.warmup_steps}")
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
