"""Build the model of a run: find the JSON config, fit the vocabulary, pick the implementation.

A name that is no config, a file that is no JSON object or lacks a size, and sizes that are not
positive integers or do not fit together raise :class:`~experiments.errors.UsageError`, naming
``--model_config`` or the file.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from torch import nn

from experiments.errors import UsageError, expected_one_of, read_json_object
from experiments.model import Llama, LlamaConfig
from lowrank_optim.weights import quantize_model_weights

CONFIGS_DIR = Path(__file__).resolve().parent / "configs"
# Sizes a config file must give as positive integers (``vocab_size`` may be null: the tokenizer's).
REQUIRED_SIZES = tuple(field.name for field in dataclasses.fields(LlamaConfig) if field.default is dataclasses.MISSING)


def config_path(model_config: str) -> Path:
    """``model_config`` as a file path, or as a name (with or without ``.json``) in ``configs/``."""
    for candidate in (Path(model_config), CONFIGS_DIR / model_config, CONFIGS_DIR / f"{model_config}.json"):
        if candidate.is_file():
            return candidate
    known = sorted(path.stem for path in CONFIGS_DIR.glob("*.json"))
    raise UsageError(
        "--model_config",
        f"no such file, and not a name in experiments/configs/: {expected_one_of(model_config, known)}",
    )


def read_model_config(model_config: str) -> dict:
    """The JSON config that ``model_config`` names, checked (``vocab_size`` may still be ``null``)."""
    path = config_path(model_config)
    values = read_json_object(path, expected="a LLaMA config", keys="LLaMA settings")
    missing = [name for name in REQUIRED_SIZES if name not in values]
    if missing:
        raise UsageError(str(path), f"lacks {', '.join(missing)}; a LLaMA config needs {', '.join(REQUIRED_SIZES)}")
    for name in (*REQUIRED_SIZES, "max_position_embeddings"):
        value = values.get(name)
        if name not in values or (name == "vocab_size" and value is None):
            continue  # the model's default length; the tokenizer's vocabulary
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UsageError(str(path), f"{name}: expected a positive integer, got {value!r}")
    try:
        LlamaConfig.from_dict({**values, "vocab_size": values["vocab_size"] or 1})
    except ValueError as error:
        raise UsageError(str(path), str(error)) from None
    return values


def model_config_dict(model_config: str, tokenizer_vocab_size: int) -> dict:
    """The JSON config with ``vocab_size`` filled in (``null`` in the file: the tokenizer's size).

    GaLore's configs keep ``vocab_size`` 32000 whatever the tokenizer (T5's 32100 ids include 100
    sentinel tokens that never occur in text); a smaller tokenizer then leaves rows unused.
    """
    values = read_model_config(model_config)
    vocab_size = values.get("vocab_size") or tokenizer_vocab_size
    if vocab_size < tokenizer_vocab_size:
        raise UsageError(
            "--model_config",
            f"vocab_size {vocab_size} of {model_config!r} is smaller than the tokenizer's {tokenizer_vocab_size}; "
            "expected a config with vocab_size null or at least the tokenizer's",
        )
    return {**values, "vocab_size": vocab_size}


def _native(values: dict) -> nn.Module:
    return Llama(LlamaConfig.from_dict(values))


def _hugging_face(values: dict) -> nn.Module:
    from experiments.model_hf import HFLlama

    return HFLlama(values)


MODEL_IMPLS: dict[str, Callable[[dict], nn.Module]] = {"native": _native, "hf": _hugging_face}


def build_model(model_config: str, model_impl: str, tokenizer_vocab_size: int) -> nn.Module:
    """A freshly initialised model (initialisation draws from the global torch RNG)."""
    try:
        builder = MODEL_IMPLS[model_impl]
    except KeyError:
        raise ValueError(f"unknown model_impl {model_impl!r}; known: {', '.join(MODEL_IMPLS)}") from None
    return builder(model_config_dict(model_config, tokenizer_vocab_size))


def store_weights(model: nn.Module, weight_bits: int | None) -> list[str]:
    """``--weight_bits 8``: every ``nn.Linear`` weight of ``model`` but the output head stored as int8
    codes and per-row scales in place (:func:`lowrank_optim.weights.quantize_model_weights`; the
    embedding, the head and the norms stay in ``--dtype``); returns the converted names. Call it
    after the parameterization and the cast, before the optimizer. A model with no such
    ``nn.Linear`` (SST or SLTrain replaced them all) raises :class:`UsageError` naming the flag."""
    if weight_bits is None:
        return []
    try:
        return quantize_model_weights(model)
    except ValueError as error:
        raise UsageError("--weight_bits", f"8 finds no weight to store in int8: {error}. An SST or SLTrain "
                         "parameterization replaces its --target_modules by factors, which stay in --dtype; narrow "
                         "--target_modules to keep some nn.Linear layers dense") from None
