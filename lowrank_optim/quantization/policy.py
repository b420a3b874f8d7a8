"""Which moments are quantized, with which block size, and what they cost in bytes.

* ``moment_bits`` (the optimizers' keyword): ``None`` (float moments), ``8`` or ``4``.
* A moment with fewer than :data:`MIN_QUANTIZED_NUMEL` values stays in float whatever
  ``moment_bits`` says: its state is negligible and block statistics of tiny tensors (norm gains,
  biases) are poor. The rule is applied to the moment's **global** shape, never to a local FSDP2
  shard, so the precision of a parameter's state does not depend on the mesh (the bug of
  torchao #4912): pass ``param.shape`` of a DTensor (its global shape) for a plain parameter, the
  projected shape of it (``m×r`` / ``r×n``) for a projected one.
* Block sizes: 256 values at 8 bits, 128 at 4 bits (the package doc says why), unless a group's
  ``moment_block_size`` says otherwise.
"""
from __future__ import annotations

import math

import torch

from lowrank_optim.kernels.quantized_moment_update import (
    CODE_DTYPE,
    SCALE_DTYPE,
    check_bits,
    check_block_size,
    storage_shapes,
)
from lowrank_optim.validation import InvalidHyperparameter

MOMENT_BITS = (None, 8, 4)
MIN_QUANTIZED_NUMEL = 4096
DEFAULT_BLOCK_SIZES = {8: 256, 4: 128}


def check_moment_bits(moment_bits) -> None:
    """ValueError naming the value unless it is None, 8 or 4."""
    if moment_bits not in MOMENT_BITS or isinstance(moment_bits, bool):
        raise InvalidHyperparameter("moment_bits", moment_bits,
                                    f"Invalid moment_bits: {moment_bits!r} (expected None, 8 or 4)")


def check_moment_block_size(block_size) -> None:
    """ValueError naming the value unless it is None (the default of the bits) or a power of two
    from 8 to 4096 (what the kernels take)."""
    if block_size is None:
        return
    try:
        check_block_size(block_size)
    except ValueError:
        raise InvalidHyperparameter("moment_block_size", block_size, f"Invalid moment_block_size: {block_size!r} "
                                    "(expected None or a power of two from 8 to 4096)") from None


def default_block_size(bits: int) -> int:
    check_bits(bits)
    return DEFAULT_BLOCK_SIZES[bits]


def resolve_block_size(bits: int, block_size: int | None) -> int:
    """``block_size``, or the default for ``bits`` when None (validated)."""
    block_size = default_block_size(bits) if block_size is None else block_size
    check_block_size(block_size)
    return block_size


def moment_bits_for(global_shape, moment_bits: int | None) -> int | None:
    """The bits a moment of ``global_shape`` is stored with: ``moment_bits``, or None (float) when
    ``moment_bits`` is None or the moment has fewer than :data:`MIN_QUANTIZED_NUMEL` values.

    Takes a shape on purpose: the shape of a local shard would make the answer depend on the mesh."""
    if isinstance(global_shape, torch.Tensor):
        raise TypeError("moment_bits_for takes the moment's global shape (e.g. param.shape of a DTensor), "
                        "not a tensor: a local shard's size must not decide the precision")
    check_moment_bits(moment_bits)
    if moment_bits is None or math.prod(tuple(global_shape)) < MIN_QUANTIZED_NUMEL:
        return None
    return moment_bits


def moment_state_bytes(shape, bits: int | None, layout: str = "flat", *, block_size: int | None = None,
                       float_dtype: torch.dtype = torch.float32) -> int:
    """Bytes one moment of ``shape`` takes: codes plus scales at ``bits`` (8/4), or ``numel`` values
    of ``float_dtype`` when ``bits`` is None. Allocates nothing (memory accounting at any scale).
    Apply :func:`moment_bits_for` first to include the small-tensor rule."""
    if bits is None:
        return math.prod(tuple(shape)) * torch.empty((), dtype=float_dtype).element_size()
    code_shape, scale_shape = storage_shapes(shape, bits, layout, resolve_block_size(bits, block_size))
    code_bytes = torch.empty((), dtype=CODE_DTYPE).element_size()
    scale_bytes = torch.empty((), dtype=SCALE_DTYPE).element_size()
    return math.prod(code_shape) * code_bytes + math.prod(scale_shape) * scale_bytes
