"""The rule for quantized moments of FSDP2-sharded parameters (lowrank_optim.quantization.sharded),
without processes: where it allows a layout, each rank quantizing its own rows gives exactly its
DTensor chunk of the unsharded codes and scales (so precision never depends on the mesh); where it
does not, it says why. The two-rank runs are in tests/modes/test_fsdp_lowbit.py."""
import pytest
import torch

from lowrank_optim.quantization import quantize
from lowrank_optim.quantization.sharded import chunk_lengths, sharded_blocks_problem

# (moment shape, layout, sharded dim): right-projected m×r, left-projected r×n, plain parameters
CASES = [((1023, 8), "columns", 0), ((4, 1024), "rows", 1), ((256, 18), "flat", 0), ((4095,), "flat", 0),
         ((1000, 6), "columns", 0), ((17, 256), "flat", 0), ((16, 256), "flat", 1), ((11008, 2), "columns", 0)]


def _split(tensor: torch.Tensor, dim: int, shards: int) -> list[torch.Tensor]:
    return list(torch.split(tensor, chunk_lengths(tensor.shape[dim], shards), dim=dim))


# every (case, bits, block size, ranks) the rule allows: 23 of the 72 combinations
ALLOWED = [(shape, layout, dim, bits, block_size, shards) for shape, layout, dim in CASES
           for bits, block_size in ((8, 256), (4, 128), (8, 8)) for shards in (2, 3, 8)
           if sharded_blocks_problem(shape, layout, bits, block_size, dim, shards) is None]


@pytest.mark.parametrize("shape, layout, dim, bits, block_size, shards", ALLOWED)
def test_allowed_layouts_quantize_each_shard_as_its_chunk_of_the_whole(shape, layout, dim, bits, block_size, shards):
    moment = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    whole = quantize(moment, bits, True, layout, block_size=block_size)
    for rank, local in enumerate(_split(moment, dim, shards)):
        own = quantize(local, bits, True, layout, block_size=block_size)
        for stored, mine in zip(whole, own):
            assert torch.equal(_split(stored, dim, shards)[rank], mine), (rank, stored.shape)


def test_which_layouts_are_allowed_and_why_not():
    assert sharded_blocks_problem((1023, 8), "columns", 4, 128, 0, 2) is None          # 512/511 rows
    assert sharded_blocks_problem((4, 1024), "rows", 8, 256, 1, 2) is None
    assert sharded_blocks_problem((256, 18), "flat", 4, 128, 0, 2) is None             # 2304 values per rank
    assert sharded_blocks_problem((4095,), "flat", 4, 128, 0, 2) is None               # odd, 2048/2047
    assert sharded_blocks_problem((11008, 8), "columns", 8, 256, 0, 8) == (
        "1376 rows per rank (1376 values of a slot) are not a multiple of moment_block_size=256, so a block "
        "would straddle two shards (pass a moment_block_size that divides them; it applies to an unsharded run "
        "alike)")
    assert sharded_blocks_problem((11008, 8), "columns", 8, 32, 0, 8) is None          # the remedy
    assert sharded_blocks_problem((17, 256), "flat", 8, 256, 0, 2) == (
        "its rows split [9, 8] over 2 ranks, but its codes of shape (4352,) would split [2176, 2176] (a flat "
        "moment's storage shards like its rows only when the ranks divide the rows evenly)")
    assert "sharded along dim 1, across its blocks" in sharded_blocks_problem((16, 256), "flat", 8, 256, 1, 2)
    assert "sharded along dim 1" in sharded_blocks_problem((1024, 8), "columns", 8, 256, 1, 2)
    assert chunk_lengths(10, 4) == [3, 3, 3, 1] and chunk_lengths(5, 4) == [2, 2, 1, 0]
