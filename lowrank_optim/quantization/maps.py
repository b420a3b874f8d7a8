"""The quantization maps: which levels a normalized moment value ``t = x / absmax ∈ [−1, 1]`` may take.

Built in float64 from their definitions (written for this library, not copied), stored as fp32
lookup tables (:class:`~lowrank_optim.kernels.quantized_moment_update.Codebook`).

**Dynamic (tree) map** (Dettmers, "8-bit approximations for parallelism in deep learning", 2016),
for ``b`` bits with ``c = b − 1`` magnitude bits when signed (one sign bit), ``c = b`` unsigned.
Read the magnitude bits as ``e`` leading zeros (the decade), an indicator 1, then ``c − 1 − e``
linear fraction bits ``f``; decade ``e`` splits ``(10^−(e+1), 10^−e]`` into ``F_e = 2^(c−1−e)``
equal bins and takes their centres::

    level(e, f) = 10^−e · (0.1 + 0.9·(f + ½) / F_e),      e = 0 … c−1,  f = 0 … F_e − 1

except that the top level (``e = 0``, ``f = F_0 − 1``) is 1 itself, so a block's absmax is stored
exactly. Relative resolution is about ``0.9/F_e`` inside a decade and the range spans ``c``
decades. The all-zero magnitude pattern is

* ``0`` in the **signed** map (first moment), 8 bits: levels ``{0} ∪ {±level(e, f)}``, symmetric,
  255 levels, magnitudes from ``5.5·10^−7`` to 1; the one spare code is never written;
* the centre of the next decade, ``0.55·10^−c``, in the **unsigned** map (second moment):
  ``2^b`` levels, none of them zero (8 bits: 256, from ``5.5·10^−9`` to 1).

**Full signed map** for the 4-bit first moment (torchao's ``AdamW4bit``; bitsandbytes'
``create_dynamic_map(signed=True, max_exponent_bits=3, total_bits=4)``): the same decades with the
top bin centre kept, ``±{.0055, .0325, .0775, .2125, .4375, .6625, .8875}``, ``0``, and ``+1`` on
the code the symmetric map leaves spare — all 16 codes used. A block's absmax is exact when it is
positive and stored as ``−0.8875`` of it when negative. Measured
(``experiments/results/LOWBIT_4BIT.md`` §9–10): the symmetric 15-level map's top step
(``0.6625 → 1``) rounds the largest momenta of a block by up to 20%; with ``0.8875`` splitting it,
the library's 4-bit AdamW ends 0.30 ± 0.16% lower at 3.3M parameters (six seeds) and 0.43 ± 0.21%
on the tiny LLaMA (three), level with torchao's within noise; making torchao's symmetric instead
(``−1`` for ``−0.8875``) cost it 0.18 ± 0.16%.

**Linear zero-free map** (torchao's ``AdamW4bit`` second moment; Li et al., "Memory efficient
optimizers with 4-bit states", 2023): ``k / 2^b`` for ``k = 1 … 2^b``.

**Square-root map** for the 4-bit second moment: the linear zero-free map applied to ``√v``, i.e.
levels ``(k / 16)²`` of ``v / absmax(v)`` (``k = 1 … 16``), rounded to the level nearest in the
square-root domain (decision boundaries ``((2k + 1) / 32)²``: :func:`midpoints` with
``power = 2``) where a value is rounded to nearest (``load``/``store``), and stochastically between
its two neighbouring levels, unbiased in ``√v``, by the step (:func:`rounds_stochastically`; the
package doc says why). Its lowest level is ``1/256`` of the block's absmax instead of ``1/16``: what a
second moment needs, because the update divides by ``√v`` and the rounding error that matters is
that of ``√v``. Measured (``experiments/results/LOWBIT_4BIT.md``, the ablation): with the linear
map a projected moment's ``v`` (slots of one DCT/SVD direction, whose rows differ by orders of
magnitude) rounds most of a block up to ``absmax/16``, shrinking those coordinates' updates by up
to 4× — the whole 4-bit loss (DCTProjAdam +2.0% at 300 steps, GaLoreAdamW +1.0%; ``m`` in 4 bits
alone costs nothing); the square-root map removes it, as do blocks of 32 (a quarter more bytes)
and Li et al.'s rank-1 normalization (a second pass over the moment).

Why no zero for ``v``: a value of ``v`` below half the lowest level is stored as 0; the next step
then has ``v = (1 − β2)·R²`` while ``m`` kept its history, so ``N = m̂/(√v̂ + ε)`` grows by up to
``1/√(1 − β2) ≈ 32`` (β2 = 0.999) for that coordinate. Rounding such values up to the lowest level
instead only shrinks their update. At 4 bits a linear map's threshold (1/32 of the block's absmax)
is hit all the time (the square-root map's is 1/1024); at 8 bits a zero level would catch values
below ``1.6·10^−7`` of the absmax (torchao's and bitsandbytes' unsigned map; rarely), and the
zero-free level costs nothing.
"""
from __future__ import annotations

import functools

import torch

from lowrank_optim.kernels.quantized_moment_update import Codebook, check_bits


def _decade_centres(magnitude_bits: int) -> torch.Tensor:
    """``level(e, f)`` of the module doc for every decade and bin, the top centre not moved, float64,
    ascending."""
    magnitudes = []
    for decade in range(magnitude_bits):
        count = 2 ** (magnitude_bits - 1 - decade)
        centres = (torch.arange(count, dtype=torch.float64) + 0.5) / count
        magnitudes.append(10.0 ** -decade * (0.1 + 0.9 * centres))
    return torch.cat(magnitudes).sort().values


def dynamic_map(bits: int, signed: bool) -> torch.Tensor:
    """The dynamic tree map (module doc), its top centre moved to 1, float64, ascending."""
    check_bits(bits)
    magnitude_bits = bits - 1 if signed else bits
    magnitudes = _decade_centres(magnitude_bits)
    magnitudes[-1] = 1.0                              # the absmax is a level
    if signed:
        levels = torch.cat((-magnitudes, torch.zeros(1, dtype=torch.float64), magnitudes))
    else:
        lowest = 10.0 ** -magnitude_bits * (0.1 + 0.9 * 0.5)            # the next decade's centre
        levels = torch.cat((torch.tensor([lowest], dtype=torch.float64), magnitudes))
    return levels.sort().values


def full_signed_map(bits: int) -> torch.Tensor:
    """The full signed map (module doc): ``±`` the decade centres, ``0`` and ``+1``; ``2^b`` levels,
    float64, ascending."""
    check_bits(bits)
    magnitudes = _decade_centres(bits - 1)
    one = torch.ones(1, dtype=torch.float64)
    return torch.cat((-magnitudes, torch.zeros(1, dtype=torch.float64), magnitudes, one)).sort().values


def linear_zero_free_map(bits: int) -> torch.Tensor:
    """``k / 2^b`` for ``k = 1 … 2^b``, float64."""
    check_bits(bits)
    count = 2 ** bits
    return torch.arange(1, count + 1, dtype=torch.float64) / count


def square_root_map(bits: int) -> torch.Tensor:
    """``(k / 2^b)²`` for ``k = 1 … 2^b``, float64: the linear zero-free map of ``√v``."""
    return linear_zero_free_map(bits).square()


def quantization_map(bits: int, signed: bool) -> torch.Tensor:
    """The map the library uses, float64, ascending: for ``m`` dynamic signed at 8 bits, the full
    signed map at 4 bits; for ``v`` dynamic zero-free unsigned at 8 bits, the square-root map at 4."""
    check_bits(bits)
    if signed:
        return dynamic_map(8, signed=True) if bits == 8 else full_signed_map(4)
    return dynamic_map(8, signed=False) if bits == 8 else square_root_map(4)


def rounding_power(bits: int, signed: bool) -> int:
    """``p`` of the domain a map rounds in, ``t^(1/p)``: 2 for the square-root map, else 1."""
    check_bits(bits)
    return 2 if (bits, signed) == (4, False) else 1


def rounds_stochastically(bits: int, signed: bool) -> bool:
    """Whether the fused step writes the moment with stochastic rounding: the 4-bit second moment
    (module doc)."""
    check_bits(bits)
    return (bits, signed) == (4, False)


def midpoints(levels: torch.Tensor, bits: int, power: int = 1) -> torch.Tensor:
    """Decision boundaries between consecutive levels, float64, padded with ``+inf`` to ``2^b − 1``:
    ``((q_k^(1/p) + q_{k+1}^(1/p)) / 2)^p``, the midpoints in the rounding domain (``power`` p)."""
    root = levels.pow(1.0 / power)
    middle = ((root[1:] + root[:-1]) / 2).pow(power)
    padding = torch.full((2 ** bits - 1 - middle.numel(),), float("inf"), dtype=torch.float64)
    return torch.cat((middle, padding))


@functools.cache
def _codebook(bits: int, signed: bool, device: str) -> Codebook:
    levels = quantization_map(bits, signed)
    fill_code = int(levels.abs().argmin())
    boundaries = midpoints(levels, bits, rounding_power(bits, signed))
    # the spare code of the 8-bit signed map decodes as the top level: every byte reads inside the table
    table = torch.cat((levels, levels[-1:].expand(2**bits - levels.numel())))
    return Codebook(table.to(device=device, dtype=torch.float32),
                    boundaries.to(device=device, dtype=torch.float32), fill_code,
                    stochastic=rounds_stochastically(bits, signed), power=rounding_power(bits, signed))


def codebook(bits: int, signed: bool, device: torch.device | str = "cpu") -> Codebook:
    """The fp32 lookup tables of :func:`quantization_map` on ``device`` (built once per device)."""
    return _codebook(bits, bool(signed), str(torch.device(device)))
