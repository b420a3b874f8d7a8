"""The float64 cases the APOLLO tests share (the library against the reference and apollo-torch,
the reference against its peers): three weights (right, left, square) and a bias, gradients that
swing by ±60 % from step to step so the norm-growth limiter has growth to cut."""
from __future__ import annotations

import math

import torch

SHAPES = [(24, 10), (10, 24), (12, 12)]   # right projection, left projection, square (right)
GAP = 5                                    # refreshes before 1-based steps 1, 6, 11
STEPS = 12


def apollo_params(shapes=SHAPES, bias=True) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(7)
    params = [torch.nn.Parameter(torch.randn(shape, generator=generator, dtype=torch.float64)) for shape in shapes]
    if bias:
        params.append(torch.nn.Parameter(torch.randn(6, generator=generator, dtype=torch.float64)))
    return params


def apollo_gradient(shape, step: int, index: int) -> torch.Tensor:
    """A fixed gradient whose size swings by ±60 % from step to step."""
    generator = torch.Generator().manual_seed(100 * step + index)
    return torch.randn(shape, generator=generator, dtype=torch.float64) * (1.0 + 0.6 * math.sin(1.7 * step))


def set_apollo_gradients(params, step: int) -> None:
    for index, p in enumerate(params):
        p.grad = apollo_gradient(p.shape, step, index)
