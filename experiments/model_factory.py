"""Build the model of a run: find the JSON config, fit the vocabulary, pick the implementation."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from torch import nn

from experiments.model import Llama, LlamaConfig, load_model_config

CONFIGS_DIR = Path(__file__).resolve().parent / "configs"


def config_path(model_config: str) -> Path:
    """``model_config`` as a file path, or as a name (with or without ``.json``) in ``configs/``."""
    for candidate in (Path(model_config), CONFIGS_DIR / model_config, CONFIGS_DIR / f"{model_config}.json"):
        if candidate.is_file():
            return candidate
    known = ", ".join(sorted(path.stem for path in CONFIGS_DIR.glob("*.json")))
    raise FileNotFoundError(f"model config {model_config!r} is neither a file nor one of: {known}")


def model_config_dict(model_config: str, tokenizer_vocab_size: int) -> dict:
    """The JSON config with ``vocab_size`` filled in (``null`` in the file: the tokenizer's size).

    GaLore's configs keep ``vocab_size`` 32000 whatever the tokenizer (T5's 32100 ids include 100
    sentinel tokens that never occur in text); a smaller tokenizer then leaves rows unused.
    """
    values = load_model_config(config_path(model_config))
    vocab_size = values.get("vocab_size") or tokenizer_vocab_size
    if vocab_size < tokenizer_vocab_size:
        raise ValueError(
            f"model vocab_size {vocab_size} of {model_config!r} is smaller than the tokenizer's {tokenizer_vocab_size}"
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
