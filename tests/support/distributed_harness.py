"""Run a test function in two CPU processes joined by a gloo process group.

``run_ranks(fn, tmp_path, *args)`` spawns ``WORLD_SIZE`` processes, each calling ``fn(rank, *args)``
after ``init_process_group("gloo")`` (file rendezvous in ``tmp_path``). ``fn`` must be a
module-level function; results go back through files the test reads (:func:`run_and_collect`).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

WORLD_SIZE = 2


def run_ranks(fn, tmp_path: Path, *args) -> None:
    rendezvous = tmp_path / f"rendezvous-{fn.__name__}"
    rendezvous.unlink(missing_ok=True)
    mp.spawn(_rank_main, args=(fn, str(rendezvous), args), nprocs=WORLD_SIZE, join=True)


def run_and_collect(fn, out_dir: Path, names, weights_only: bool = True) -> dict[str, list]:
    """``fn(rank, str(out_dir))`` on every rank, which saves ``{name}-{rank}.pt`` for each of
    ``names``; returns those files loaded, by name then rank."""
    run_ranks(fn, out_dir, str(out_dir))
    return {name: [torch.load(out_dir / f"{name}-{rank}.pt", weights_only=weights_only) for rank in range(WORLD_SIZE)]
            for name in names}


def _rank_main(rank: int, fn, rendezvous: str, args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=WORLD_SIZE)
    fn(rank, *args)
    dist.barrier()      # no rank tears the group down while another still talks to it
    dist.destroy_process_group()


class TallWideNet(nn.Module):
    """``tall`` 15×8 (right side; rows split 8/7 over two ranks), ``mid`` 16×15 (right side),
    ``wide`` 6×16 (left side; columns split 8/8), with biases."""

    def __init__(self) -> None:
        super().__init__()
        self.tall = nn.Linear(8, 15)
        self.mid = nn.Linear(15, 16)
        self.wide = nn.Linear(16, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.wide(torch.tanh(self.mid(torch.tanh(self.tall(x)))))


def make_tall_wide(seed: int = 0) -> TallWideNet:
    torch.manual_seed(seed)
    return TallWideNet()


def regression_batch(step: int, rows: int = 8, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(500 + step)
    x, target = torch.randn(rows, 8, generator=generator), torch.randn(rows, 6, generator=generator)
    return x.to(dtype), target.to(dtype)


def regression_loss(model: nn.Module, step: int, part: slice = slice(None)) -> torch.Tensor:
    """MSE on the step's batch (float64), or on the rows ``part`` of it (a rank's half)."""
    x, target = regression_batch(step)
    return nn.functional.mse_loss(model(x[part]), target[part])


def half(rank: int, rows: int = 8) -> slice:
    size = rows // WORLD_SIZE
    return slice(rank * size, (rank + 1) * size)


def assert_identical(a, b, path="") -> None:
    """``a`` and ``b`` (nested dicts, lists, tensors, numbers) are equal bit for bit."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            assert_identical(a[key], b[key], f"{path}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for index, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{path}[{index}]")
    else:
        assert a == b, path
