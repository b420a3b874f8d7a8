"""Small deterministic models and training loops shared by the optimizer tests."""
from __future__ import annotations

import copy

import torch
from torch import nn

from lowrank_optim.gradient_stand_ins import GradientStandIn
from lowrank_optim.weights import dequantize_weight, is_int8_weight


class ToyLM(nn.Module):
    """Embedding → tall linear (right projection) → GELU → wide linear (left) → head.

    Weight shapes: embed (vocab, d), up (4d, d), down (d, 4d), head (vocab, d).
    """

    def __init__(self, vocab: int = 96, d: int = 12, hidden: int = 40):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.up = nn.Linear(d, hidden)
        self.down = nn.Linear(hidden, d)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        x = x + self.down(torch.nn.functional.gelu(self.up(x)))
        return self.head(self.norm(x))


def holds_full_gradient(param: torch.Tensor) -> bool:
    """Whether ``param.grad`` is an ordinary gradient (not None, not the stand-in the in-backward
    modes leave for a projected or stepped one)."""
    return param.grad is not None and not isinstance(param.grad, GradientStandIn)


def make_model(seed: int = 0, dtype: torch.dtype = torch.float32, **kwargs) -> ToyLM:
    torch.manual_seed(seed)
    return ToyLM(**kwargs).to(dtype)


def batch(step: int, vocab: int = 96, size: tuple[int, int] = (6, 10)) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, vocab, size, generator=generator)


def loss_of(model: nn.Module, step: int) -> torch.Tensor:
    tokens = batch(step, vocab=model.embed.num_embeddings)
    logits = model(tokens[:, :-1]).float()
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


def train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int, start: int = 0) -> list[float]:
    losses = []
    for step in range(start, start + steps):
        optimizer.zero_grad(set_to_none=True)
        loss = loss_of(model, step)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def next_token_loss(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of ``model``'s next-token logits on ``tokens`` (B×T)."""
    logits = model(tokens[:, :-1])
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


def train_in_micro_batches(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int, accumulation: int,
                           scheduler=None, after_backward=None) -> None:
    """``steps`` optimizer steps, each over ``accumulation`` micro-batches of one fixed batch of 12
    sequences (so every accumulation splits the same tokens); ``after_backward(model, optimizer)``
    runs after each micro-batch's backward pass, ``scheduler`` steps after each optimizer step."""
    for step in range(steps):
        tokens = batch(step, size=(12, 10))
        for part in tokens.chunk(accumulation):
            (next_token_loss(model, part) * part.shape[0] / tokens.shape[0]).backward()
            if after_backward is not None:
                after_backward(model, optimizer)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        optimizer.zero_grad()


def twin(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


def values(param: torch.Tensor) -> torch.Tensor:
    """A parameter's values as an ordinary tensor: an int8 weight's ``Ŵ`` (in float64, exact), else itself."""
    return dequantize_weight(param, torch.float64) if is_int8_weight(param) else param.detach()


def max_rel_diff(a: nn.Module, b: nn.Module) -> float:
    """max over parameters of ‖a − b‖_∞ / ‖b‖_∞ (int8 weights compared by their ``Ŵ``)."""
    worst = 0.0
    for x, y in zip(a.parameters(), b.parameters()):
        x, y = values(x), values(y)
        worst = max(worst, float((x.double() - y.double()).abs().max() / y.double().abs().max()))
    return worst


def projected_groups(model: ToyLM, rank, plain_group_keys: dict | None = None, **kwargs) -> list[dict]:
    """up/down weights projected at ``rank`` (group keys ``kwargs``); everything else in a second
    group with ``plain_group_keys`` (DCTProjAdam needs ``{"rank": None}`` there: its default rule
    would project the embedding and head otherwise)."""
    projected = [model.up.weight, model.down.weight]
    rest = [p for p in model.parameters() if all(p is not q for q in projected)]
    return [{"params": projected, "rank": rank, **kwargs}, {"params": rest, **(plain_group_keys or {})}]
