"""``--model_impl hf``: Hugging Face ``LlamaForCausalLM`` built from a config (nothing downloaded)."""

from __future__ import annotations

import contextlib
import sys

import torch
from torch import nn


@contextlib.contextmanager
def _torchao_hidden_from_transformers():
    """transformers (5.x) imports torchao in ``transformers.quantizers`` whenever it is installed,
    and torchao's import prints ``Failed to load .../torchao/_C_mxfp8...so`` and pytree deprecation
    warnings on machines without its CUDA extensions. A LLaMA built from a config quantizes nothing,
    so while transformers' modules are first imported its ``is_torchao_available`` says no; a process
    that already imported torchao (it asked for a torchao optimizer) is left as it is."""
    if "torchao" in sys.modules:
        yield
        return
    import transformers.utils
    import transformers.utils.import_utils as import_utils

    modules = [module for module in (transformers.utils, import_utils) if hasattr(module, "is_torchao_available")]
    saved = [module.is_torchao_available for module in modules]
    for module in modules:
        module.is_torchao_available = lambda *args, **kwargs: False
    try:
        yield
    finally:
        for module, function in zip(modules, saved, strict=True):
            module.is_torchao_available = function


def _llama_classes():
    with _torchao_hidden_from_transformers():
        from transformers import LlamaConfig, LlamaForCausalLM
    return LlamaConfig, LlamaForCausalLM


class HFLlama(nn.Module):
    """``LlamaForCausalLM`` behind the same interface as :class:`experiments.model.Llama`.

    Its projected linears are named ``hf.model.layers.{i}.self_attn.{q,k,v,o}_proj`` and
    ``hf.model.layers.{i}.mlp.{gate,up,down}_proj``; attention runs through SDPA.
    """

    def __init__(self, config: dict) -> None:
        super().__init__()
        LlamaConfig, LlamaForCausalLM = _llama_classes()  # noqa: N806  (the classes' own names)
        hf_config = LlamaConfig(**config)
        hf_config._attn_implementation = "sdpa"
        self.hf = LlamaForCausalLM(hf_config)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.hf(input_ids=input_ids, use_cache=False).logits
