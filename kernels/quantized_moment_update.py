"""Block-wise quantized Adam moments: storage format, table-driven (de)quantization and the fused
moment update, PyTorch reference of :mod:`.quantized_moment_update_triton`.

This module is self-contained (it imports torch, :mod:`.layout` and :mod:`.philox` only): the quantization maps
are passed in as a :class:`Codebook` of lookup tables, built by
:mod:`lowrank_optim.quantization.maps`, which also documents the scheme as a whole. What lives
here is what the Triton kernel has to match bit for bit.

**Slots and blocks.** A moment is laid out (:mod:`.layout`) as ``n_slots`` slots of ``length``
values each:

* ``"columns"``: a right-projected ``m×r`` moment; slot ``j`` is column ``j`` (``length = m``);
* ``"rows"``: a left-projected ``r×n`` moment; slot ``i`` is row ``i`` (``length = n``);
* ``"flat"``: any other tensor, flattened: one slot of ``numel`` values.

Every slot is cut into ``⌈length / B⌉`` blocks of ``B`` consecutive values (the last one shorter
when ``B`` does not divide ``length``): a block never mixes two slots. Each block has one fp32
scale, its absmax ``a = max |x|``.

**Codes.** ``t = x / a`` (``a = 0``: ``t = 0``) is coded as the index of the nearest level of the
map, ``code = #{k : midpoint_k ≤ t}`` over the decision boundaries between consecutive levels (the
map's midpoints, nearest in its rounding domain; a tie goes to the larger level);
``x̃ = levels[code]·a``. **Stochastic rounding** (a :class:`Codebook` with ``stochastic``, the
fused update only): ``t`` between the levels ``q_k ≤ t < q_{k+1}`` takes code ``k + 1`` when
``u < 2²⁴·(t^(1/p) − q_k^(1/p))/(q_{k+1}^(1/p) − q_k^(1/p))`` and ``k`` otherwise (``p`` the
map's rounding power, 2 for the square-root map: the square roots computed correctly rounded), so
``E[x̃^(1/p)] = x^(1/p)`` for ``x`` inside the map's range: an exponential moving average whose
per-step change is far below a level's spacing (``v``: ``(1 − β2)·(R² − v)``, 0.1% of ``v``) keeps
moving on average, where rounding to the nearest level would hold it still. ``u`` (24 bits) is a
hash of the value, its gradient and the step count ``t``: Philox-4x32-10
(:func:`.philox.philox_randint4x`) at the counter ``(bits(x) ∧ H, bits(R) ∧ H, t mod 2³², 0)``
under a fixed key, ``bits`` the fp32 bit pattern and ``H`` (:data:`HASHED_BITS`) keeping its
exponent and top 7 mantissa bits (the bf16 part of the magnitude: ``v`` depends on ``R`` only through
``R²``, so a negated gradient, ``maximize=True``, draws the same noise). It depends on nothing else — not on
the value's position or the parameter — so it is the same in any chunking, FSDP2 sharding,
backend, data-parallel replica and resumed run, with nothing to store; ``t`` makes it fresh at
every step even where the value and the gradient repeat (a zero gradient, a stationary value).
NOTE: the 16 cleared bits keep a difference of a few ulps between two computations (the fused
weight update's last bit on another backend, then the gradients it changes) from redrawing the
noise of every value it reaches: Triton against PyTorch on a toy model, 6 steps, drifted apart by
0.080 of a weight hashing all bits, 0.045 with 8 cleared, 0.002–0.0095 with 16. A few-ulp
difference now changes ``u`` with probability about 2⁻¹⁴, and the code only where ``u`` and the
chance of rounding up nearly tie, as with rounding to nearest. Values within 2⁻⁸ of each other
with gradients within 2⁻⁸ share a draw in a step: a harmless correlation.

Codes are uint8; 4-bit codes are packed two per byte along the slot,
value ``2k`` of a slot in the low nibble of byte ``k``, value ``2k + 1`` in the high nibble (an odd
slot's last high nibble is 0, never read).

**Storage** keeps the moment's natural orientation, so a slot remap is one gather along the slot
dimension of both tensors and the codes shard like the moment along its length dimension (under
FSDP2 each rank runs these functions on its own rows: :mod:`lowrank_optim.quantization.sharded`):

==========  ==============  ==========================  ==========================
layout      moment          codes (uint8)               scales (fp32)
==========  ==============  ==========================  ==========================
columns     ``(m, r)``      ``(⌈m·b/8⌉, r)``            ``(⌈m/B⌉, r)``
rows        ``(r, n)``      ``(r, ⌈n·b/8⌉)``            ``(r, ⌈n/B⌉)``
flat        any, ``N``      ``(⌈N·b/8⌉,)``              ``(⌈N/B⌉,)``
==========  ==============  ==========================  ==========================

**The fused update** (:func:`quantized_adam_moment_update_`), all arithmetic fp32::

    m ← deq(m̃)·β1 + R·(1 − β1)            v ← deq(ṽ)·β2 + (R·R)·(1 − β2)
    N = (m / (√v / √bc2 + ε)) / bc1         from these fp32 moments, before re-quantization
    m̃, ṽ ← quantize(m), quantize(v)

NOTE: every expression is written as a fixed sequence of separately rounded IEEE fp32 operations
(no ``alpha=`` adds, which CPU kernels may fuse into an FMA; a correctly rounded square root), in
the order the Triton kernel uses (which runs with FP fusion off and round-to-nearest sqrt and
division): both paths then produce the same fp32 values, hence the same codes.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .layout import check_layout, slot_broadcast_shape, slot_dim
from .philox import philox_randint4x

BITS = (8, 4)
CODE_DTYPE = torch.uint8
SCALE_DTYPE = torch.float32
NOISE_KEY = 0x2545_F491_4F6C_DD1D      # the Philox key of the stochastic rounding (any fixed 63-bit value)
NOISE_BITS = 24                         # u has 24 random bits: exact in fp32
HASHED_BITS = 0x7FFF0000                # the bits of x and R the noise reads: the bf16 part of |x|, |R|
_WORD = 0xFFFFFFFF


class Codebook(NamedTuple):
    """The lookup tables of one quantization map on one device.

    ``levels``: fp32, ``2**bits`` values in ``[-1, 1]``, non-decreasing: the map's levels, then
    the top level repeated for codes a map does not use (so any byte decodes inside the table).
    ``midpoints``: fp32, ``2**bits − 1`` values, the decision boundaries between the map's levels
    (``(q_k + q_{k+1}) / 2``, or ``((√q_k + √q_{k+1}) / 2)²`` for a map that rounds in the
    square-root domain; computed in float64, then rounded) padded with ``+inf``, so a branchless binary search of
    ``bits`` steps finds every code and never returns an unused one.
    ``fill_code``: the code of the level nearest zero, written where a slot starts from zero.
    ``stochastic``: the fused update rounds stochastically to the two neighbouring levels
    (module doc) instead of to the nearest; only for a map whose ``2**bits`` levels are all
    distinct (an unsigned one). ``power``: the map's rounding domain ``t^(1/power)`` (1 or 2), in
    which stochastic rounding is unbiased (the midpoints already hold it for rounding to nearest)."""

    levels: torch.Tensor
    midpoints: torch.Tensor
    fill_code: int
    stochastic: bool = False
    power: int = 1


# ------------------------------------------------------------------------------------- checks
def check_bits(bits) -> None:
    if bits not in BITS or isinstance(bits, bool):
        raise ValueError(f"Invalid bits: {bits!r} (expected 8 or 4)")


def check_block_size(block_size) -> None:
    """A power of two from 8 to 4096: the Triton kernel tiles a block with ``tl.arange``."""
    if isinstance(block_size, bool) or not isinstance(block_size, int) or not 8 <= block_size <= 4096 \
            or block_size & (block_size - 1):
        raise ValueError(f"Invalid block_size: {block_size!r} (expected a power of two from 8 to 4096)")


def slot_geometry(shape, layout: str) -> tuple[int, int]:
    """``(n_slots, length)`` of a moment of ``shape`` in ``layout``."""
    check_layout(layout)
    shape = tuple(shape)
    if layout == "flat":
        return 1, math.prod(shape)
    if len(shape) != 2:
        raise ValueError(f"layout {layout!r} needs a 2-D moment, got shape {shape}")
    rows, cols = shape
    return (cols, rows) if layout == "columns" else (rows, cols)


def packed_length(length: int, bits: int) -> int:
    """Bytes of codes for ``length`` values."""
    return length if bits == 8 else (length + 1) // 2


def fill_byte(fill_code: int, bits: int) -> int:
    """The byte of codes that stores ``fill_code`` in every value it holds (two at 4 bits)."""
    return fill_code if bits == 8 else fill_code | (fill_code << 4)


def storage_shapes(shape, bits: int, layout: str, block_size: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(codes shape, scales shape)`` of a moment of ``shape`` (module table)."""
    check_bits(bits)
    check_block_size(block_size)
    n_slots, length = slot_geometry(shape, layout)
    code_len, n_blocks = packed_length(length, bits), -(-length // block_size)
    if layout == "flat":
        return (code_len,), (n_blocks,)
    if layout == "columns":
        return (code_len, n_slots), (n_blocks, n_slots)
    return (n_slots, code_len), (n_slots, n_blocks)


def check_state(name: str, codes: torch.Tensor, scales: torch.Tensor, shape, bits: int, layout: str,
                block_size: int) -> None:
    """ValueError naming the moment when ``codes``/``scales`` are not the storage of ``shape``."""
    code_shape, scale_shape = storage_shapes(shape, bits, layout, block_size)
    if codes.dtype != CODE_DTYPE or scales.dtype != SCALE_DTYPE:
        raise ValueError(f"{name}: codes must be uint8 and scales float32, got {codes.dtype} and {scales.dtype}")
    if tuple(codes.shape) != code_shape or tuple(scales.shape) != scale_shape:
        raise ValueError(f"{name}: codes of shape {tuple(codes.shape)} and scales of shape {tuple(scales.shape)} "
                         f"are not the {bits}-bit {layout!r} storage of a moment of shape {tuple(shape)} with "
                         f"block_size={block_size} (expected {code_shape} and {scale_shape})")


def check_slot_remap(source_slots: torch.Tensor, layout: str, storage: torch.Tensor) -> None:
    """ValueError unless ``source_slots`` has one entry per slot of ``storage`` (a moment, or its
    codes or scales) in the ``"columns"`` or ``"rows"`` layout."""
    dim = slot_dim(layout)
    if dim is None:
        raise ValueError("a slot remap needs the 'columns' or 'rows' layout, got 'flat'")
    n_slots = storage.shape[dim]
    if source_slots.ndim != 1 or source_slots.numel() != n_slots:
        raise ValueError(f"source_slots of shape {tuple(source_slots.shape)} do not index the {n_slots} slots "
                         f"of a {layout!r} moment")


# --------------------------------------------------------------------------- slot-major views
def _slot_major(storage: torch.Tensor, layout: str) -> torch.Tensor:
    """A ``(n_slots, ·)`` view of a moment or of its codes/scales storage."""
    if layout == "flat":
        return storage.reshape(1, -1)
    return storage.t() if layout == "columns" else storage


def _natural(slot_major: torch.Tensor, layout: str) -> torch.Tensor:
    """The storage orientation of a ``(n_slots, ·)`` tensor (contiguous)."""
    if layout == "flat":
        return slot_major.reshape(-1).contiguous()
    return (slot_major.t() if layout == "columns" else slot_major).contiguous()


def _pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``(n_slots, length)`` uint8 codes → ``(n_slots, packed_length)`` bytes."""
    if bits == 8:
        return codes
    if codes.shape[1] % 2:
        codes = F.pad(codes, (0, 1))                    # the unused high nibble of an odd slot: 0
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def _unpack(packed: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    if bits == 8:
        return packed
    return torch.stack((packed & 15, packed >> 4), dim=-1).reshape(packed.shape[0], -1)[:, :length]


# ---------------------------------------------------------------------- (de)quantization
def quantize_blockwise(x: torch.Tensor, codebook: Codebook, *, bits: int, layout: str, block_size: int,
                       noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, scales)`` of ``x`` (any float dtype; quantized from its fp32 values): to the
    nearest level, or stochastically with ``noise`` (:func:`rounding_noise` of ``x``, its shape)."""
    storage_shapes(x.shape, bits, layout, block_size)            # validates
    slots = _slot_major(x.float(), layout).contiguous()
    n_slots, length = slots.shape
    n_blocks = -(-length // block_size)
    # zero padding leaves every block's absmax unchanged; the padded codes are cut off below
    padding = (0, n_blocks * block_size - length)
    blocks = F.pad(slots, padding).view(n_slots, n_blocks, block_size)
    scales = blocks.abs().amax(dim=-1) if n_blocks else blocks.new_zeros(n_slots, 0)
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    normalized = blocks / safe.unsqueeze(-1)
    if noise is None:
        codes = torch.bucketize(normalized, codebook.midpoints, right=True)
    else:
        block_noise = F.pad(_slot_major(noise, layout), padding).view(n_slots, n_blocks, block_size)
        codes = _stochastic_codes(normalized, block_noise, codebook.levels, codebook.power)
    codes = codes.to(CODE_DTYPE).view(n_slots, -1)[:, :length]
    return _natural(_pack(codes, bits), layout), _natural(scales, layout)


# ------------------------------------------------------------------------- stochastic rounding
def rounding_noise(values: torch.Tensor, grad: torch.Tensor, step: int) -> torch.Tensor:
    """``u`` of each value (int64 in ``[0, 2²⁴)``, ``values``' shape): the top 24 bits of word 0 of
    Philox-4x32-10 keyed by :data:`NOISE_KEY` at the counter ``(bits(x) ∧ H, bits(R) ∧ H,
    t mod 2³², 0)``: the bf16 part of the magnitudes of the new moment value and of its gradient,
    and the step ``t`` (module doc)."""
    value_bits = values.float().contiguous().view(torch.int32).long().bitwise_and_(HASHED_BITS)
    grad_bits = grad.float().contiguous().view(torch.int32).long().bitwise_and_(HASHED_BITS).bitwise_left_shift_(32)
    word, *_ = philox_randint4x(torch.tensor(NOISE_KEY, device=values.device), value_bits.bitwise_or_(grad_bits),
                                third_word=int(step) & _WORD)
    return word.bitwise_right_shift_(32 - NOISE_BITS)


def _root(x: torch.Tensor, power: int) -> torch.Tensor:
    """``x^(1/power)`` in fp32, the square root correctly rounded (through float64, as the kernel's
    ``tl.sqrt_rn``)."""
    return x if power == 1 else torch.sqrt(x.double()).float()


def _stochastic_codes(normalized: torch.Tensor, noise: torch.Tensor, levels: torch.Tensor, power: int) -> torch.Tensor:
    """Codes of ``t`` (int64) rounded to the level below or above it, up with probability
    ``(t^(1/p) − q_k^(1/p))/(q_{k+1}^(1/p) − q_k^(1/p))``: ``k = #{j ≥ 1 : q_j ≤ t}``, at most
    ``2**bits − 2``."""
    lower = torch.bucketize(normalized, levels[1:], right=True).clamp_(max=levels.numel() - 2)
    low, high = _root(levels[lower], power), _root(levels[lower + 1], power)
    chance = (_root(normalized, power) - low) / (high - low)
    return lower + (noise.float() < chance * float(1 << NOISE_BITS))


def unpack_codes(codes: torch.Tensor, *, bits: int, layout: str, shape) -> torch.Tensor:
    """The codes (int64) of every value of a moment of ``shape``, in the moment's shape."""
    n_slots, length = slot_geometry(shape, layout)
    slot_codes = _unpack(_slot_major(codes, layout), bits, length).long()
    if layout == "flat":
        return slot_codes.reshape(shape)
    return slot_codes.t().contiguous() if layout == "columns" else slot_codes


def dequantize_blockwise(codes: torch.Tensor, scales: torch.Tensor, codebook: Codebook, *, bits: int,
                         layout: str, block_size: int, shape) -> torch.Tensor:
    """The fp32 moment of ``shape`` that ``codes``/``scales`` store: ``levels[code]·scale``."""
    check_state("moment", codes, scales, shape, bits, layout, block_size)
    n_slots, length = slot_geometry(shape, layout)
    slot_codes = _unpack(_slot_major(codes, layout), bits, length)
    values = codebook.levels[slot_codes.long()]
    per_value_scales = _slot_major(scales, layout).repeat_interleave(block_size, dim=1)[:, :length]
    values = values * per_value_scales
    if layout == "flat":
        return values.reshape(shape)
    return values.t().contiguous() if layout == "columns" else values.contiguous()


def remap_quantized_slots(codes: torch.Tensor, scales: torch.Tensor, source_slots: torch.Tensor, *, layout: str,
                          bits: int, fill_code: int) -> tuple[torch.Tensor, torch.Tensor]:
    """New ``(codes, scales)`` whose slot ``j`` holds old slot ``source_slots[j]`` (zero where −1).

    A whole slot moves with its codes and its scales, so dequantizing the result equals remapping
    the dequantized moment, exactly. New slots get scale 0 (so they dequantize to 0) and
    ``fill_code``."""
    check_slot_remap(source_slots, layout, codes)
    kept = source_slots.view(slot_broadcast_shape(layout)) >= 0
    index = source_slots.clamp(min=0)
    dim = slot_dim(layout)
    new_codes = codes.index_select(dim, index).masked_fill_(~kept, fill_byte(fill_code, bits))
    new_scales = scales.index_select(dim, index) * kept.to(scales.dtype)
    return new_codes, new_scales


# ------------------------------------------------------------------------------ fused update
def quantized_adam_moment_update_(
    grad: torch.Tensor,
    m_codes: torch.Tensor,
    m_scales: torch.Tensor,
    v_codes: torch.Tensor,
    v_scales: torch.Tensor,
    *,
    m_codebook: Codebook,
    v_codebook: Codebook,
    beta1: float,
    beta2: float,
    eps: float | torch.Tensor,
    bias_correction1: float | torch.Tensor,
    bias_correction2: float | torch.Tensor,
    bits: int,
    layout: str,
    block_size: int,
    step: int,
    source_slots: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(N, m_codes, m_scales, v_codes, v_scales)`` (module doc for the math); ``step``, the step
    count, enters the noise of stochastic rounding.

    Without ``source_slots`` the four state tensors are updated in place and returned as they are;
    with them (int64, one source slot or −1 per slot) the state is first remapped
    (:func:`remap_quantized_slots`) and new tensors are returned, the inputs left untouched.
    ``bias_correction1/2`` and ``eps`` may be tensors broadcasting against the moment (per-slot
    corrections). ``N`` is fp32 in the gradient's shape."""
    shape = grad.shape
    check_state("exp_avg", m_codes, m_scales, shape, bits, layout, block_size)
    check_state("exp_avg_sq", v_codes, v_scales, shape, bits, layout, block_size)
    if source_slots is not None:
        m_codes, m_scales = remap_quantized_slots(m_codes, m_scales, source_slots, layout=layout, bits=bits,
                                                  fill_code=m_codebook.fill_code)
        v_codes, v_scales = remap_quantized_slots(v_codes, v_scales, source_slots, layout=layout, bits=bits,
                                                  fill_code=v_codebook.fill_code)
    common = dict(bits=bits, layout=layout, block_size=block_size)
    exp_avg = dequantize_blockwise(m_codes, m_scales, m_codebook, shape=shape, **common)
    exp_avg_sq = dequantize_blockwise(v_codes, v_scales, v_codebook, shape=shape, **common)
    grad = grad.float()
    # per-slot values as fp32 tensors, as the kernel reads them (a float64 tensor would promote)
    as32 = lambda value: value.to(torch.float32) if isinstance(value, torch.Tensor) else value
    eps, bias_correction1, bias_correction2 = as32(eps), as32(bias_correction1), as32(bias_correction2)
    exp_avg = exp_avg * beta1 + grad * (1.0 - beta1)
    exp_avg_sq = exp_avg_sq * beta2 + (grad * grad) * (1.0 - beta2)
    sqrt_bias_correction2 = bias_correction2.sqrt() if isinstance(bias_correction2, torch.Tensor) \
        else math.sqrt(bias_correction2)
    # NOTE: the square root through float64 is correctly rounded on every device (the kernel's
    # tl.sqrt_rn is; torch.sqrt on some CPUs is off by an ulp), and so are its fp32 results
    denom = torch.sqrt(exp_avg_sq.double()).float() / sqrt_bias_correction2 + eps
    update = (exp_avg / denom) / bias_correction1
    new_m_codes, new_m_scales = quantize_blockwise(exp_avg, m_codebook, **common)
    v_noise = rounding_noise(exp_avg_sq, grad, step) if v_codebook.stochastic else None
    new_v_codes, new_v_scales = quantize_blockwise(exp_avg_sq, v_codebook, noise=v_noise, **common)
    for tensor, new in ((m_codes, new_m_codes), (m_scales, new_m_scales), (v_codes, new_v_codes),
                        (v_scales, new_v_scales)):
        tensor.copy_(new)
    return update, m_codes, m_scales, v_codes, v_scales
