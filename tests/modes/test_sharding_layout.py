"""The shard-layout rules of :mod:`lowrank_optim.sharding` (no process group needed)."""
import pytest
import torch
from torch.distributed.tensor import Replicate, Shard

from lowrank_optim.sharding import Sharding, local_side, projection_shard_placement


def _sharding(dim):
    placements = (Replicate(),) if dim is None else (Shard(dim),)
    return Sharding(mesh=None, placements=placements, dim=dim, group=None, shape=torch.Size((6, 16)))


@pytest.mark.parametrize("shape, world, expected", [
    ((6, 16), 2, Shard(1)),      # wide, left side, columns divide evenly
    ((6, 15), 2, Shard(0)),      # wide but 15 columns do not split evenly: rows
    ((16, 6), 2, Shard(0)),      # tall: right side keeps the rows
    ((16,), 2, Shard(0)),        # 1-D
    ((6, 16), 3, Shard(0)),
])
def test_projection_shard_placement(shape, world, expected):
    assert projection_shard_placement(world)(torch.nn.Parameter(torch.zeros(shape))) == expected


def test_projection_shard_placement_follows_the_side_mode():
    tall = torch.nn.Parameter(torch.zeros(16, 6))
    assert projection_shard_placement(2, side_mode="reverse_std")(tall) == Shard(1)


@pytest.mark.parametrize("dim, side, expected", [
    (None, "left", "left"), (0, "right", "right"), (1, "left", "left"),
    (0, "left", "right"), (1, "right", "left"),
])
def test_automatic_modes_pick_the_side_that_stays_local(dim, side, expected):
    assert local_side(None if dim is None else _sharding(dim), side, "auto", "w") == expected


def test_an_explicit_side_across_the_shards_names_the_parameter():
    with pytest.raises(ValueError, match=r"layers\.0\.down\.weight.*'left'.*dimension 0"):
        local_side(_sharding(0), "left", "left", "layers.0.down.weight")


def test_plain_tensors_have_no_sharding():
    assert Sharding.of(torch.zeros(3, 3), "w") is None
