r"""Low-bit Adam moments: 8-bit and 4-bit block-wise quantized optimizer state.

For projected moments (``m×r`` right, ``r×n`` left) and plain parameters alike; the optimizers take
it through ``moment_bits`` (``None``: float moments; ``8``; ``4``).

The scheme
----------
**Blocks along slots.** A projected moment's slots (columns of a right-projected ``m×r`` moment,
rows of a left-projected ``r×n`` one) have scales that differ by orders of magnitude (the leading
DCT/SVD directions carry most of the gradient), so a block never mixes two slots: each slot of
``L`` values is cut into ``⌈L/B⌉`` blocks of ``B`` consecutive values, the last one shorter when
``B ∤ L``. A plain parameter is flattened into one slot. Layouts: ``"columns"``, ``"rows"``,
``"flat"`` (:mod:`lowrank_optim.kernels.layout`).

**Scale and code.** Block ``β`` with values ``x_i`` stores one fp32 scale and one code per value::

    a_β = max_{i∈β} |x_i|
    t_i = x_i / a_β                   (t_i = 0 when a_β = 0)
    c_i = argmin_k |t_i − q_k|        over the map's levels q_0 < q_1 < … (a tie: the larger level)
    x̃_i = q_{c_i} · a_β

found by a binary search over the midpoints ``(q_k + q_{k+1})/2``. Error bound: if
``q_k ≤ t_i ≤ q_{k+1}`` then ``|x̃_i − x_i| ≤ a_β (q_{k+1} − q_k)/2``; below the lowest level of a
zero-free map, ``|x̃_i − x_i| ≤ a_β (q_0 − t_i)`` (the value is rounded up). The absmax itself is
exact (``q = 1`` is a level, and so is ``q = −1`` except in the 4-bit ``m`` map, whose lowest level
is ``−0.8875``).

**Maps** (:mod:`.maps`): first moment signed, second unsigned.

=====  ===============================================  ==============================================
bits   ``m`` (signed)                                   ``v`` (unsigned, **no zero level**)
=====  ===============================================  ==============================================
8      dynamic tree: 0, ±[5.5·10^−7, 1], 255 levels      dynamic tree: [5.5·10^−9, 1], 256 levels
4      full signed: 0, ±{.0055, .0325, …, .8875}, +1    square root: (k/16)², k = 1…16, **stochastic**
=====  ===============================================  ==============================================

A zero level in ``v`` would blow up ``N = m̂/(√v̂ + ε)`` for values rounded to it (maps doc).

**Stochastic rounding of the 4-bit ``v``** (the step's; :func:`.maps.rounds_stochastically`):
``t`` between levels ``q_k ≤ t < q_{k+1}`` is written as ``q_{k+1}`` with probability
``(√t − √q_k)/(√q_{k+1} − √q_k)``, so ``E[√ṽ] = √v``: unbiased in the map's own (square-root)
domain, the one the update divides by. ``v``'s average moves by ``(1 − β2)(R² − v)``,
0.1% a step, far below the spacing of 16 levels; rounded to the nearest level it stays where it is
until the block's absmax moves, so over hundreds of steps a 4-bit ``v`` falls behind a growing
gradient and the update grows (measured on the tiny LLaMA's GaLore moments over steps 601–1000:
``‖Ñ‖/‖N‖`` 1.66 and relative error 0.90 rounded to nearest, 1.18 and 0.39 stochastically;
``experiments/results/LOWBIT_4BIT.md``). The noise is a hash of the value, its gradient and the
step count (:mod:`lowrank_optim.kernels.quantized_moment_update`): nothing stored, the same in any
chunking, sharding, backend, replica and resumed run. The first moment (``β1 = 0.9``: a tenth of
its value a step) and 8-bit ``v`` (256 levels) round to the nearest level.

**Block sizes** (:mod:`.policy`): ``B = 256`` at 8 bits, ``128`` at 4 bits: the sizes torchao uses
and bitsandbytes settled on (2048 → 256: one outlier spoils a large block's resolution; a group's
``moment_block_size`` trades that back for scale bytes, as torchao's ``block_size``); the fp32
scale adds ``32/B`` bits per value (0.125 at 8 bits, 0.25 at 4); these sizes divide the LLaMA
widths 512…4096 and 11008 (not 1376, 2736, 5461: there the last block of a slot is shorter).
Per value: ``1 + 4/256 = 1.016`` bytes at 8 bits, ``0.5 + 4/128 = 0.531`` bytes at 4 bits,
against 4 bytes of fp32.

**Storage.** Codes uint8 (4 bits: two per byte along the slot), scales fp32, as two plain tensors
per moment in the moment's orientation (:mod:`lowrank_optim.kernels.quantized_moment_update`):
state loads with ``torch.load(weights_only=True)``.

**Small tensors** (fewer than 4096 values) stay in float, decided from the moment's **global**
shape (:func:`moment_bits_for`), so FSDP2 sharding never changes the precision. Under FSDP2 a
rank quantizes its local shard with the global moment's blocks: the codes and scales are DTensors
sharded like the parameter, and a shard layout that would cut a block is refused, never adapted
(:mod:`.sharded`), so a sharded run stores the unsharded run's bytes and a checkpoint reshards
(onto any number of ranks) without re-quantizing.

**A step** (:func:`lowrank_optim.kernels.dispatch.quantized_adam_moment_update`; PyTorch, or one
fused Triton kernel; :class:`lowrank_optim.moments.QuantizedMoments` calls it)::

    m ← deq(m̃)·β1 + R·(1−β1),     v ← deq(ṽ)·β2 + R²·(1−β2)        fp32
    N = (m / bc1) / (√(v / bc2) + ε)                                  from the fp32 moments
    m̃, ṽ ← quant(m), quant(v)                                        (4-bit ṽ: stochastically)

``load``/``store`` and the transports below round to the nearest level.

**Subspace changes.** A DCT slot remap moves the codes and scales of whole slots
(:func:`lowrank_optim.kernels.quantized_moment_update.remap_quantized_slots`; exactly the remap
of the dequantized state, fused into the update by ``source_slots``); any other transport (SVD
rotation) dequantizes, transforms in fp32 and re-quantizes (:func:`requantize_transformed`).

**bf16 weights** can take the update with stochastic rounding (:func:`add_stochastic_round_`,
unbiased), so updates below half a bf16 ulp are not lost.

Dependencies: none beyond torch (and Triton for the kernel). The maps are built here from their
definitions; :mod:`.reference` is an independent float64 implementation the tests compare with.
"""
from .blockwise import dequantize, quantize, quantized_zeros, requantize_transformed
from .maps import codebook, dynamic_map, full_signed_map, linear_zero_free_map, quantization_map, square_root_map
from .policy import (
    DEFAULT_BLOCK_SIZES,
    MIN_QUANTIZED_NUMEL,
    MOMENT_BITS,
    check_moment_bits,
    check_moment_block_size,
    default_block_size,
    moment_bits_for,
    moment_state_bytes,
    resolve_block_size,
)
from .stochastic_rounding import add_stochastic_round_, stochastic_round_bf16

__all__ = [
    "DEFAULT_BLOCK_SIZES", "MIN_QUANTIZED_NUMEL", "MOMENT_BITS",
    "add_stochastic_round_", "check_moment_bits", "check_moment_block_size", "codebook", "default_block_size",
    "dequantize", "dynamic_map", "full_signed_map", "linear_zero_free_map", "moment_bits_for", "moment_state_bytes",
    "quantization_map", "quantize", "quantized_zeros", "requantize_transformed", "resolve_block_size",
    "square_root_map",
    "stochastic_round_bf16",
]
