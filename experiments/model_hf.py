"""``--model_impl hf``: Hugging Face ``LlamaForCausalLM`` built from a config (nothing downloaded)."""

from __future__ import annotations

import torch
from torch import nn


class HFLlama(nn.Module):
    """``LlamaForCausalLM`` behind the same interface as :class:`experiments.model.Llama`.

    Its projected linears are named ``hf.model.layers.{i}.self_attn.{q,k,v,o}_proj`` and
    ``hf.model.layers.{i}.mlp.{gate,up,down}_proj``; attention runs through SDPA.
    """

    def __init__(self, config: dict) -> None:
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM

        hf_config = LlamaConfig(**config)
        hf_config._attn_implementation = "sdpa"
        self.hf = LlamaForCausalLM(hf_config)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.hf(input_ids=input_ids, use_cache=False).logits
