"""Saving and loading SST and SLTrain models with Hugging Face ``save_pretrained`` / ``from_pretrained``.

A converted model's ``save_pretrained`` writes its own keys (``q_proj.U``, ``q_proj.s``, ...,
``q_proj.B``, ``q_proj.sparse_values``, ...) where the architecture has ``q_proj.weight``.
``LlamaForCausalLM.from_pretrained`` of such a checkpoint does not fail: it prints a load report
(the converted layers' keys UNEXPECTED, their ``.weight`` MISSING) and returns a model whose
converted layers are *freshly initialised*. Two correct round trips:

* **Dense checkpoint** — :func:`save_pretrained_merged` writes every converted layer as the
  ``nn.Linear`` it computes; the checkpoint is a plain model of the architecture, loaded by
  ``from_pretrained`` anywhere (SST and SLTrain training state is not kept: ``U``, ``V``, the
  active set, ``B``, ``A``, the support).
* **Converted checkpoint** — ``model.save_pretrained(path)`` (what ``Trainer`` checkpoints hold)
  and :func:`from_pretrained_converted`, which builds the model from the checkpoint's config,
  converts it the same way and loads every key, strictly: it resumes training exactly.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import torch
from safetensors import safe_open
from torch import nn
from transformers import GenerationConfig, PreTrainedModel
from transformers.utils import GENERATION_CONFIG_NAME, SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

from ..sltrain import SLTrainLinear
from ..sst import SSTLinear

CONVERTED_LAYERS = (SSTLinear, SLTrainLinear)
_KEYS_SHOWN = 6


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with each SST / SLTrain layer's entries replaced by those of the
    ``nn.Linear`` it computes (``{name}.weight``, ``{name}.bias``; ``to_linear()`` of the layer).

    The model is not changed; only the merged weights are new tensors (one dense weight per
    converted layer), the other entries share the model's storage.
    """
    state = model.state_dict()
    for name, module in model.named_modules():
        if isinstance(module, CONVERTED_LAYERS):
            prefix = f"{name}." if name else ""
            for key in module.state_dict():
                del state[prefix + key]
            state.update(module.to_linear().state_dict(prefix=prefix))
    return state


def save_pretrained_merged(model: PreTrainedModel, save_directory: str | os.PathLike, **kwargs) -> None:
    """``model.save_pretrained(save_directory, state_dict=merged_state_dict(model), **kwargs)``: a
    checkpoint of the plain architecture (config unchanged), loadable with ``from_pretrained``.

    Outputs of the loaded model equal the converted model's up to the rounding of the merged
    product (``U·diag(s)·Vᵀ`` for SST, ``(α/r)·B·A + S`` for SLTrain). Raises ``ValueError`` if
    ``kwargs`` has ``state_dict``.
    """
    if "state_dict" in kwargs:
        raise ValueError("Invalid kwargs: 'state_dict' (save_pretrained_merged writes the merged state dict)")
    model.save_pretrained(save_directory, state_dict=merged_state_dict(model), **kwargs)


def from_pretrained_converted(
    model_class: type[PreTrainedModel],
    pretrained_path: str | os.PathLike,
    convert: Callable[[nn.Module], nn.Module],
    dtype: torch.dtype | None = None,
) -> PreTrainedModel:
    """Load a checkpoint that a converted model wrote with ``save_pretrained`` (a ``Trainer``
    checkpoint directory, for instance).

    Builds ``model_class(config)`` from the checkpoint's ``config.json`` on the CPU (cast to
    ``dtype`` when given), applies ``convert`` (e.g. ``lambda m: convert_to_sst(m, rank=64)``; it
    must rebuild the layers the checkpoint was saved with), loads every tensor of the
    ``model.safetensors`` file or of the shards ``model.safetensors.index.json`` lists, and the
    ``generation_config.json`` if there is one; returns the model in eval mode, as
    ``from_pretrained`` does. The fresh initialisation and the conversion (an SVD per layer for
    SST) run before the load and are overwritten by it.

    Raises ``ValueError`` naming ``pretrained_path``, before any tensor is loaded, when the
    checkpoint's keys or shapes differ from the converted model's (a key missing from the file
    is accepted only for a tied weight whose twin is in the file).
    """
    config = model_class.config_class.from_pretrained(pretrained_path)
    model = model_class(config)
    if dtype is not None:
        model.to(dtype)
    model = convert(model)
    files = _checkpoint_files(pretrained_path)
    _check_keys_and_shapes(model, files, pretrained_path)
    for file in files:
        with safe_open(file, framework="pt") as checkpoint:
            model.load_state_dict({key: checkpoint.get_tensor(key) for key in checkpoint.keys()}, strict=False)
    if os.path.isfile(os.path.join(pretrained_path, GENERATION_CONFIG_NAME)):
        model.generation_config = GenerationConfig.from_pretrained(pretrained_path)
    return model.eval()


def _checkpoint_files(pretrained_path: str | os.PathLike) -> list[str]:
    single = os.path.join(pretrained_path, SAFE_WEIGHTS_NAME)
    index = os.path.join(pretrained_path, SAFE_WEIGHTS_INDEX_NAME)
    if os.path.isfile(single):
        return [single]
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(pretrained_path, shard) for shard in shards]
    raise ValueError(
        f"Invalid pretrained_path: {os.fspath(pretrained_path)!r} (no {SAFE_WEIGHTS_NAME} or "
        f"{SAFE_WEIGHTS_INDEX_NAME} in it)"
    )


def _check_keys_and_shapes(model: nn.Module, files: list[str], pretrained_path: str | os.PathLike) -> None:
    expected = model.state_dict(keep_vars=True)
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        with safe_open(file, framework="pt") as checkpoint:
            shapes.update({key: tuple(checkpoint.get_slice(key).get_shape()) for key in checkpoint.keys()})
    loaded_storage = {id(expected[key]) for key in shapes if key in expected}
    problems = {
        "unexpected": [key for key in shapes if key not in expected],
        "missing": [key for key, tensor in expected.items() if key not in shapes and id(tensor) not in loaded_storage],
        "of another shape": [
            f"{key} {shapes[key]} != {tuple(expected[key].shape)}"
            for key in shapes
            if key in expected and shapes[key] != tuple(expected[key].shape)
        ],
    }
    found = {kind: keys for kind, keys in problems.items() if keys}
    if found:
        listed = "; ".join(
            f"{kind}: {', '.join(keys[:_KEYS_SHOWN])}{', ...' if len(keys) > _KEYS_SHOWN else ''} ({len(keys)})"
            for kind, keys in found.items()
        )
        raise ValueError(
            f"Invalid pretrained_path: {os.fspath(pretrained_path)!r} does not match the converted "
            f"{type(model).__name__} ({listed}); a checkpoint written by save_pretrained_merged loads with "
            f"{type(model).__name__}.from_pretrained"
        )
