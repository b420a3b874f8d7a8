"""Quantized-moment helpers shared by the quantization and kernel tests."""
from __future__ import annotations

from lowrank_optim.moments import QUANTIZED_KEYS, QuantizedMoments


def quantized_step(grad, *state, bits, layout, backend="torch", block_size=None, **scalars):
    """``(N, m_codes, m_scales, v_codes, v_scales)`` of one step of :class:`QuantizedMoments`
    holding ``state`` (the library's maps and block size, through the kernels' dispatcher)."""
    moments = QuantizedMoments(dict(zip(QUANTIZED_KEYS, state)), bits, layout, tuple(grad.shape),
                               block_size=block_size)
    update = moments.step(backend, grad, **scalars)
    return (update, *(moments.state[key] for key in QUANTIZED_KEYS))
