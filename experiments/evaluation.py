"""Next-token loss (Hugging Face shift, padded targets masked) and validation."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from experiments.distributed import DistributedContext, all_reduce_sum


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor, pad_id: int, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of ``logits[:, :-1]`` against ``ids[:, 1:]``, ignoring targets equal to ``pad_id``.

    ``logits`` [B, T, V], ``ids`` [B, T]; computed in fp32 whatever the model dtype.
    """
    targets = ids[:, 1:].masked_fill(ids[:, 1:] == pad_id, -100)
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction=reduction
    )


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[torch.Tensor], pad_id: int, context: DistributedContext) -> float:
    """Mean next-token loss over every non-pad target of ``batches``, summed over all ranks."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=context.device)
    for ids in batches:
        ids = ids.to(context.device)
        totals[0] += next_token_loss(model(ids), ids, pad_id, reduction="sum").double()
        totals[1] += (ids[:, 1:] != pad_id).sum()
    model.train(was_training)
    loss_sum, count = all_reduce_sum(totals, context).tolist()
    return loss_sum / count
