"""Where the noise of stochastic rounding (``bf16_stochastic_round=True``) comes from.

Each parameter and step draws from its own generator, seeded by the parameter's name (or
position) and the step count: the noise is the same on every data-parallel rank, and a resumed
run draws exactly what the uninterrupted one did, with no generator state to checkpoint.
"""
from __future__ import annotations

import zlib

import torch

_SEED_BASE = 0x5EED


def rounding_generator(key: str, step: int, device: torch.device) -> torch.Generator:
    """The generator of step ``step``'s rounding noise for the parameter named ``key``."""
    seed = (zlib.crc32(key.encode()) << 20) ^ (step * 0x9E3779B1) ^ _SEED_BASE
    return torch.Generator(device=device).manual_seed(seed & 0x7FFF_FFFF_FFFF_FFFF)
