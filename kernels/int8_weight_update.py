"""Int8 weights stored for training: the row-wise format, (de)quantization and the stochastically
rounded update ``W ← SR(a·Ŵ − b·ΔW)``, PyTorch reference of :mod:`.int8_weight_update_triton`.

Self-contained (torch and :mod:`.philox` only); :mod:`lowrank_optim.weights` builds the weights
on it. What lives here is what the Triton kernel matches bit for bit.

**Format.** An ``m×n`` weight is ``m`` int8 rows ``q`` (codes in ``[−127, 127]``, never −128)
and one scale ``s_i`` per row, in :data:`SCALE_DTYPES` (the dtype the weight computes in)::

    Ŵ[i, j] = s_i · q[i, j]

**Scale.** ``s_i = a_i / 127`` with ``a_i = max_j |W[i, j]|``, in fp32 to nearest for fp32
scales and then rounded *up* to the next bf16 value for bf16 scales: ``t = W / s_i`` then stays in
``[−127, 127]`` up to the fp32 rounding of ``a_i / 127`` and of the division (one ulp, ``2⁻¹⁷``
of a step at 127), which is clamped. (Rounding a bf16 scale to nearest instead, as torchao's
``quantize_int8_rowwise`` does, puts the row's absmax up to half a bf16 ulp, ``127·2⁻⁹`` steps,
above 127, where it is clipped: a bias at each row's largest weight, in most rows.) A zero row
has ``s_i = 0`` and codes 0.

**Rounding.** Round to nearest (``quantize_rows`` without a seed: the conversion; error at most
``s_i / 2`` per value), or stochastic (unbiased)::

    q = ⌊t⌋ + [u < t − ⌊t⌋],   u = (x_{i·n + j} >> 8) · 2⁻²⁴      ⇒   E[q] = t

The probability of rounding up is ``⌈f·2²⁴⌉·2⁻²⁴`` for the fp32 fraction ``f = t − ⌊t⌋``:
exactly ``f`` when ``|t| ≥ 1/2`` (``f`` is then a multiple of ``2⁻²⁴``), within ``2⁻²³``
otherwise, so ``E[q] = t`` to ``2⁻²³`` of a step. The noise is counter-based: ``x_p`` is word
``p mod 4`` of Philox-4x32-10 at counter ``⌊p / 4⌋`` (:func:`.philox.philox_words`, Triton's
``tl.randint4x``): the same ``seed`` gives the same codes on every device, chunking and backend.

**The update** (:func:`int8_weight_update_`), fp32 throughout, per row::

    w = (q·s)·a − ΔW·b            s_new = scale(max_j |w_j|)            q_new = SR(w / s_new)

so ``E[s_new·q_new] = a·Ŵ − b·ΔW``: the weight moves by ``b·ΔW`` in expectation even when that
is far below half a step ``s_i / 2`` (round to nearest would leave it where it is).

NOTE: each expression is a fixed sequence of separately rounded fp32 operations (products and
differences never fused into an FMA, correctly rounded division), the order the kernel uses with
FP fusion off; the comparison with ``u`` and the floor are exact. Both paths then write the same
codes and scales on finite inputs. Non-finite ``W``, ``ΔW``, ``a`` or ``b`` are the caller's to
refuse (the rows they touch are undefined).
"""
from __future__ import annotations

import torch

from .philox import philox_words

CODE_DTYPE = torch.int8
SCALE_DTYPES = (torch.float32, torch.bfloat16)
CODE_MAX = 127
_NOISE_BITS = 24                       # u has 24 random bits: exact in fp32
# Rows per pass bound the temporaries (a few fp32 and int64 words per value, a dozen int64 words per
# Philox counter) to a few MB, near the caches: 2^18 and 2^19 values measured fastest on one CPU
# thread (2^16 about 1.3× slower, 2^20 about 2×).
_CHUNK_VALUES = 1 << 18


def check_storage(codes: torch.Tensor, scales: torch.Tensor) -> None:
    """ValueError unless ``codes`` (``m×n`` int8) and ``scales`` (``m`` values of a scale dtype)
    store one weight."""
    if codes.dtype != CODE_DTYPE or codes.ndim != 2:
        raise ValueError(f"int8 weight codes must be a 2-D int8 tensor, got {codes.dtype} of shape "
                         f"{tuple(codes.shape)}")
    if scales.dtype not in SCALE_DTYPES or tuple(scales.shape) != (codes.shape[0],):
        raise ValueError(f"int8 weight scales must be {codes.shape[0]} values of torch.float32 or torch.bfloat16 "
                         f"(one per row), got {scales.dtype} of shape {tuple(scales.shape)}")


def check_update(codes: torch.Tensor, scales: torch.Tensor, delta: torch.Tensor, seed: torch.Tensor) -> None:
    """ValueError naming the argument that does not fit an int8 weight update."""
    check_storage(codes, scales)
    if delta.shape != codes.shape or not delta.is_floating_point():
        raise ValueError(f"delta of {delta.dtype} and shape {tuple(delta.shape)} does not update an int8 weight of "
                         f"shape {tuple(codes.shape)} (expected a float tensor of that shape)")
    if seed.dtype != torch.int64 or seed.numel() != 1:
        raise ValueError(f"seed must be one int64 value, got {seed.dtype} of shape {tuple(seed.shape)}")


def row_scales(absmax: torch.Tensor, scale_dtype: torch.dtype) -> torch.Tensor:
    """The scales (fp32 values of ``scale_dtype``) of rows with fp32 ``absmax``: ``absmax / 127``,
    rounded up to bf16 for bf16 scales (module doc)."""
    scales = absmax / float(CODE_MAX)
    if scale_dtype == torch.bfloat16:
        # NOTE: the fp32 pattern plus 0xFFFF, low 16 bits cut: the next bf16 at or above (positive values)
        bits = (scales.view(torch.int32) + 0xFFFF) & -0x10000
        scales = bits.view(torch.float32)
    return scales


def _codes_of_rows(rows: torch.Tensor, scale_dtype: torch.dtype, seed: torch.Tensor | None,
                   first_row: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, fp32 scales)`` of fp32 ``rows``, row ``first_row`` of the weight first (it names
    the noise positions)."""
    scales = row_scales(rows.abs().amax(dim=1), scale_dtype)
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    t = (rows / safe[:, None]).clamp_(-CODE_MAX, CODE_MAX)
    if seed is None:
        return t.round_().to(CODE_DTYPE), scales
    words = philox_words(seed, first_row * rows.shape[1], rows.numel(), rows.device).view(rows.shape)
    noise = words.bitwise_right_shift_(32 - _NOISE_BITS).float()
    low = t.floor()
    rounded_up = noise < t.sub_(low).mul_(float(1 << _NOISE_BITS))      # t now holds the scaled fraction
    return low.to(CODE_DTYPE).add_(rounded_up), scales                   # ≤ 127: t = 127 never rounds up


def _row_chunks(n_rows: int, n_cols: int):
    step = max(1, _CHUNK_VALUES // max(n_cols, 1))
    return [(start, min(start + step, n_rows)) for start in range(0, n_rows, step)]


def quantize_rows(weight: torch.Tensor, *, scale_dtype: torch.dtype,
                  seed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, scales)`` of a 2-D float ``weight`` (quantized from its fp32 values): round to
    nearest, or stochastically with the noise of ``seed`` (one int64 value in ``[0, 2⁶³)``)."""
    if weight.ndim != 2 or not weight.is_floating_point():
        raise ValueError(f"an int8 weight is a 2-D float matrix, got {weight.dtype} of shape {tuple(weight.shape)}")
    if scale_dtype not in SCALE_DTYPES:
        raise ValueError(f"Invalid scale_dtype: {scale_dtype} (expected torch.float32 or torch.bfloat16)")
    codes = torch.empty(weight.shape, dtype=CODE_DTYPE, device=weight.device)
    scales = torch.empty(weight.shape[0], dtype=scale_dtype, device=weight.device)
    for start, stop in _row_chunks(*weight.shape):
        chunk_codes, chunk_scales = _codes_of_rows(weight[start:stop].float(), scale_dtype, seed, start)
        codes[start:stop] = chunk_codes
        scales[start:stop] = chunk_scales      # exact: the values are the scale dtype's
    return codes, scales


def dequantize_rows(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``Ŵ = s_i·q[i, j]``, computed in fp32 (exact for bf16 scales), returned in ``dtype``
    (default: the scales' dtype)."""
    check_storage(codes, scales)
    values = codes.float() * scales.float()[:, None]
    return values.to(dtype or scales.dtype)


def int8_weight_update_(codes: torch.Tensor, scales: torch.Tensor, delta: torch.Tensor, *, a: float, b: float,
                        seed: torch.Tensor) -> None:
    """``Ŵ ← SR(a·Ŵ − b·ΔW)`` in place on ``codes``/``scales`` (module doc), ``delta`` ``ΔW`` in
    any float dtype and the weight's shape, the noise from ``seed``."""
    check_update(codes, scales, delta, seed)
    a32, b32 = torch.tensor(a, dtype=torch.float32), torch.tensor(b, dtype=torch.float32)
    for start, stop in _row_chunks(*codes.shape):
        scale = scales[start:stop].float()[:, None]
        rows = codes[start:stop].float().mul_(scale).mul_(a32).sub_(delta[start:stop].float() * b32)
        new_codes, new_scales = _codes_of_rows(rows, scales.dtype, seed, start)
        codes[start:stop] = new_codes
        scales[start:stop] = new_scales
