"""Quantized-moment helpers shared by the quantization and kernel tests."""
from __future__ import annotations

import struct

import torch
from lowrank_optim.kernels.quantized_moment_update import HASHED_BITS, NOISE_BITS, NOISE_KEY

from lowrank_optim.moments import QUANTIZED_KEYS, QuantizedMoments
from lowrank_optim.quantization import dequantize
from lowrank_optim.reference.philox import reference_philox4x32


def quantized_step(grad, *state, bits, layout, backend="torch", block_size=None, step=1, **scalars):
    """``(N, m_codes, m_scales, v_codes, v_scales)`` of one step of :class:`QuantizedMoments`
    holding ``state`` (the library's maps and block size, through the kernels' dispatcher);
    ``step``, the step count of the stochastic rounding's noise."""
    moments = QuantizedMoments(dict(zip(QUANTIZED_KEYS, state)), bits, layout, tuple(grad.shape),
                               block_size=block_size)
    update = moments.step(backend, grad, step=step, **scalars)
    return (update, *(moments.state[key] for key in QUANTIZED_KEYS))


def _bits(value: float) -> int:
    return struct.unpack("<I", struct.pack("<f", value))[0]


def reference_noise(values: torch.Tensor, grad: torch.Tensor, step: int) -> torch.Tensor:
    """Each value's stochastic-rounding ``u`` from the Python-integer Philox (independent of the
    kernels' copy): word 0 at counter ``(bits(x) ∧ H, bits(R) ∧ H, step, 0)`` of the fp32 values (``H``
    keeps the exponent and the top 7 mantissa bits), key ``NOISE_KEY``, top ``NOISE_BITS`` bits."""
    key = (NOISE_KEY & 0xFFFFFFFF, NOISE_KEY >> 32)
    words = [reference_philox4x32((_bits(x) & HASHED_BITS, _bits(r) & HASHED_BITS, step, 0), key)[0]
             >> (32 - NOISE_BITS)
             for x, r in zip(values.float().reshape(-1).tolist(), grad.float().reshape(-1).tolist())]
    return torch.tensor(words, dtype=torch.int64).view(values.shape)


def fused_second_moment(grad, v_codes, v_scales, *, bits, layout, beta2, block_size=None, **_):
    """The fp32 ``v`` the fused step computes before re-quantizing it (its documented operation
    order: ``deq(ṽ)·β2 + (R·R)·(1 − β2)``), from the state before the step."""
    previous = dequantize(v_codes, v_scales, bits, False, tuple(grad.shape), layout, block_size=block_size)
    grad = grad.float()
    return previous * beta2 + (grad * grad) * (1.0 - beta2)
