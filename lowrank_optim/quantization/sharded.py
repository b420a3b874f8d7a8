"""Quantized moments of FSDP2-sharded parameters: when a shard layout keeps the unsharded blocks.

FSDP2 splits a parameter along one dimension ``d`` (``Shard(d)``) of length ``L`` over ``W`` ranks
as ``torch.chunk`` does: ``c = ⌈L/W⌉`` rows per rank, rank ``k`` holding rows ``[k·c, min((k+1)·c, L))``
(the last ranks fewer, possibly none). Its moments are sharded the same way, and each rank
quantizes its own values. The blocks are those of the **global** moment (:mod:`lowrank_optim.quantization`:
``B`` consecutive values along a slot, counted from the slot's start), so a rank's blocks are the
unsharded blocks exactly when every shard boundary falls on a block boundary:

* ``"columns"`` (a right-projected ``m×r`` moment of a row-sharded weight) and ``"rows"`` (a
  left-projected ``r×n`` moment of a column-sharded weight): the moment is sharded along its slot
  length, one value of a slot per row (``q = 1``);
* ``"flat"`` (a plain parameter of shape ``(L, …)`` sharded along dim 0): a row holds
  ``q = numel / L`` consecutive values of the one slot;

and a boundary ``k·c·q`` is a block boundary when ``B | c·q``. ``B`` is even (a power of two ≥ 8),
so a boundary never splits a byte of packed 4-bit codes either.

The codes and scales are stored as DTensors of the global storage shape with the parameter's
placements (so ``torch.distributed.checkpoint`` saves, loads and reshards them, also onto another
number of ranks or one process). A DTensor splits its storage by the same ``torch.chunk`` rule,
over *storage* rows (bytes of codes, blocks of scales), which must then be exactly the rank's own
storage: true for ``q = 1`` whenever ``B | c``, but for a flat parameter with uneven rows it fails
(rows 3 of 256 values on two ranks: 512 + 256 values, yet 768 bytes of codes split 384 + 384).

**The rule** (:func:`sharded_blocks_problem`): quantized moments of a sharded parameter are allowed
when the blocks and the storage split as above, and refused by name otherwise. Nothing is adapted
to the mesh — no smaller block, no per-shard blocks — so wherever a sharded run is allowed its
blocks, codes and scales are bit for bit those of the unsharded run: the precision never depends
on the mesh. The remedy a refusal names is a configuration choice that holds on every mesh: a
``moment_block_size`` that divides the rows per rank (it then applies to the unsharded run alike),
float moments for that parameter (its own param group), or a row count divisible by the ranks.
"""
from __future__ import annotations

import math

from lowrank_optim.kernels.quantized_moment_update import storage_shapes

# The dimension a moment (and its storage) of each layout may be sharded along: its slot length.
_SHARDABLE_DIM = {"columns": 0, "rows": 1, "flat": 0}


def chunk_lengths(length: int, shards: int) -> list[int]:
    """The lengths ``torch.chunk``/``Shard`` give the ``shards`` ranks: ``⌈length/shards⌉`` each,
    the last ones fewer, possibly zero."""
    chunk = -(-length // shards)
    return [max(0, min(chunk, length - rank * chunk)) for rank in range(shards)]


def sharded_blocks_problem(shape, layout: str, bits: int, block_size: int, dim: int, shards: int) -> str | None:
    """None when a quantized moment of global ``shape`` in ``layout`` (``bits``, ``block_size``),
    sharded along ``dim`` over ``shards`` ranks, keeps the unsharded blocks and storage split
    (module doc), else why not."""
    shape = tuple(shape)
    if dim != _SHARDABLE_DIM[layout] or dim >= len(shape):
        return (f"its {layout!r} moment of shape {shape} is sharded along dim {dim}, across its blocks "
                f"(quantized moments shard along dim {_SHARDABLE_DIM[layout]} only; shard it by rows, Shard(0))")
    rows = shape[dim]
    per_row = math.prod(shape) // rows if layout == "flat" else 1
    row_chunks = chunk_lengths(rows, shards)
    if row_chunks[0] < rows and row_chunks[0] * per_row % block_size:
        return (f"{row_chunks[0]} rows per rank ({row_chunks[0] * per_row} values of a slot) are not a multiple "
                f"of moment_block_size={block_size}, so a block would straddle two shards (pass a moment_block_size "
                "that divides them; it applies to an unsharded run alike)")
    # the storage is sharded along the same dim (module doc of kernels.quantized_moment_update)
    for index, (name, total) in enumerate(zip(("codes", "scales"), storage_shapes(shape, bits, layout, block_size))):
        own = [storage_shapes(_with(shape, dim, n), bits, layout, block_size)[index][dim] if n else 0
               for n in row_chunks]
        if own != chunk_lengths(total[dim], shards):
            return (f"its rows split {row_chunks} over {shards} ranks, but its {name} of shape {total} would split "
                    f"{chunk_lengths(total[dim], shards)} (a flat moment's storage shards like its rows only when "
                    "the ranks divide the rows evenly)")
    return None


def _with(shape: tuple[int, ...], dim: int, size: int) -> tuple[int, ...]:
    return shape[:dim] + (size,) + shape[dim + 1:]
