"""8/4-bit moments: each of ``m``, ``v`` stored as uint8 codes and fp32 block scales along the
slots (:mod:`lowrank_optim.quantization`). A step dequantizes to fp32, updates, computes ``N``
from those fp32 moments and re-quantizes: one pass of
:func:`lowrank_optim.kernels.dispatch.quantized_adam_moment_update` (one fused Triton kernel on
CUDA); ``load``/``store`` dequantize and quantize with the same maps."""
from __future__ import annotations

from collections.abc import Callable

import torch

from ..kernels.dispatch import quantized_adam_moment_update
from ..kernels.quantized_moment_update import remap_quantized_slots
from ..quantization import (
    codebook,
    dequantize,
    moment_state_bytes,
    quantize,
    quantized_zeros,
    requantize_transformed,
    resolve_block_size,
)
from .base import Moments

QUANTIZED_KEYS = ("exp_avg_codes", "exp_avg_scales", "exp_avg_sq_codes", "exp_avg_sq_scales")
# (key prefix, signed map): the first moment takes a signed map, the second an unsigned one
_MOMENTS = (("exp_avg", True), ("exp_avg_sq", False))


class QuantizedMoments(Moments):
    """:class:`~lowrank_optim.moments.base.Moments` stored block-wise quantized (``bits`` 8 or 4),
    of :attr:`shape` (never sharded)."""

    @property
    def keys(self) -> tuple[str, ...]:
        return QUANTIZED_KEYS

    @property
    def float_dtype(self) -> torch.dtype:
        return torch.float32

    def _codes_and_scales(self, prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.state[f"{prefix}_codes"], self.state[f"{prefix}_scales"]

    def _put(self, prefix: str, codes: torch.Tensor, scales: torch.Tensor) -> None:
        self.state[f"{prefix}_codes"], self.state[f"{prefix}_scales"] = codes, scales

    def create(self, dtype: torch.dtype, device: torch.device, like: torch.Tensor | None = None,
               local_shape: tuple[int, ...] | None = None) -> None:
        """Zero state (``dtype``, ``like`` and ``local_shape`` do not apply)."""
        for prefix, signed in _MOMENTS:
            self._put(prefix, *quantized_zeros(self.shape, self.bits, signed, self.layout, block_size=self.block_size,
                                               device=device))

    def load(self) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(dequantize(*self._codes_and_scales(prefix), self.bits, signed, self.shape, self.layout,
                                block_size=self.block_size) for prefix, signed in _MOMENTS)

    def store(self, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor) -> None:
        for (prefix, signed), moment in zip(_MOMENTS, (exp_avg, exp_avg_sq)):
            if tuple(moment.shape) != self.shape:
                raise ValueError(f"{prefix}: a moment of shape {tuple(moment.shape)} cannot be stored in one of "
                                 f"shape {self.shape}")
            for stored, new in zip(self._codes_and_scales(prefix),
                                   quantize(moment, self.bits, signed, self.layout, block_size=self.block_size)):
                stored.copy_(new)

    def step(self, backend: str, grad: torch.Tensor, *, beta1: float, beta2: float, eps, bias_correction1,
             bias_correction2, source_slots: torch.Tensor | None = None) -> torch.Tensor:
        normalized, *stored = quantized_adam_moment_update(
            backend, grad, *(self.state[key] for key in QUANTIZED_KEYS),
            m_codebook=codebook(self.bits, True, grad.device), v_codebook=codebook(self.bits, False, grad.device),
            beta1=beta1, beta2=beta2, eps=eps, bias_correction1=bias_correction1, bias_correction2=bias_correction2,
            bits=self.bits, layout=self.layout, block_size=resolve_block_size(self.bits, self.block_size),
            source_slots=source_slots)
        self.state.update(zip(QUANTIZED_KEYS, stored))
        return normalized

    def zero_(self) -> None:
        self.create(torch.float32, self.state["exp_avg_codes"].device)

    def remap_slots(self, source_slots: torch.Tensor) -> None:
        """Moves the codes and scales of whole slots: exactly the remap of the dequantized moments."""
        for prefix, signed in _MOMENTS:
            self._put(prefix, *remap_quantized_slots(*self._codes_and_scales(prefix), source_slots,
                                                     layout=self.layout, bits=self.bits,
                                                     fill_code=codebook(self.bits, signed).fill_code))

    def transform_(self, first: Callable[[torch.Tensor], torch.Tensor],
                   second: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Dequantized, transformed in fp32 and re-quantized."""
        for (prefix, signed), transform in zip(_MOMENTS, (first, second)):
            self._put(prefix, *requantize_transformed(*self._codes_and_scales(prefix), transform, bits=self.bits,
                                                      signed=signed, shape=self.shape, layout=self.layout,
                                                      block_size=self.block_size))

    def _chunk(self, start: int, stop: int) -> QuantizedMoments:
        """Chunks must start on a block boundary (blocks of a flat moment are consecutive values)."""
        block = resolve_block_size(self.bits, self.block_size)
        if start % block:
            raise ValueError(f"a quantized chunk must start on a block of {block} values, got start={start}")
        per_byte = 8 // self.bits
        views = {}
        for prefix, _ in _MOMENTS:
            codes, scales = self._codes_and_scales(prefix)
            views[f"{prefix}_codes"] = codes[start // per_byte: -(-stop // per_byte)]
            views[f"{prefix}_scales"] = scales[start // block: -(-stop // block)]
        return QuantizedMoments(views, self.bits, "flat", (stop - start,), block_size=self.block_size)

    def expected_bytes(self, float_dtype: torch.dtype) -> int:
        return 2 * moment_state_bytes(self.shape, self.bits, self.layout, block_size=self.block_size,
                                      float_dtype=float_dtype)
