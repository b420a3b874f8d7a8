"""What a dataset gives the training loop: a :class:`DataSpec` goes in, a :class:`DataBundle` comes out.

Both loaders (``data.py``: the embedded corpus; ``data_c4.py``: C4) import these types from here,
so neither imports the other's module for them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from experiments.tokenizer import Tokenizer


class BatchLoader(Protocol):
    """A resumable source of training batches ``[batch_size, max_length]`` for this rank."""

    def next_batch(self) -> torch.Tensor: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class DataBundle:
    """What the training loop needs: the tokenizer, the training loader, and validation batches."""

    tokenizer: Tokenizer
    train: BatchLoader
    validation_batches: Callable[[], Iterator[torch.Tensor]]


@dataclass(frozen=True)
class DataSpec:
    """The data-related part of the run configuration."""

    dataset: str
    tokenizer: str
    max_length: int
    batch_size: int
    eval_tokens: int
    seed: int
    cache_dir: Path
    rank: int = 0
    world_size: int = 1
