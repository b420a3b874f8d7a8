"""Small models and data shared by the SST tests."""

from __future__ import annotations

import torch
from torch import nn


class TinyBlock(nn.Module):
    """Two linears named like transformer sub-blocks (``attn``, ``mlp``) and a ``head`` that stays dense.

    Shapes are deliberately non-square and different: attn 24→16 (k=16), mlp 16→40 (k=16, no bias),
    gate 40→6 (k=6); head 6→5.
    """

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.Linear(24, 16)
        self.mlp = nn.Linear(16, 40, bias=False)
        self.mlp_gate = nn.Linear(40, 6)
        self.head = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mlp_gate(torch.tanh(self.mlp(torch.tanh(self.attn(x)))))))


def batch(step: int, rows: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """A deterministic (input, target) pair for a step, independent of the global RNG."""
    generator = torch.Generator().manual_seed(1000 + step)
    return torch.randn(rows, 24, generator=generator), torch.randn(rows, 5, generator=generator)


def train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, steps: range) -> list[float]:
    losses = []
    for step in steps:
        x, target = batch(step)
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses
