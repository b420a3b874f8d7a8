"""8/4-bit moments: each of ``m``, ``v`` stored as uint8 codes and fp32 block scales along the
slots (:mod:`lowrank_optim.quantization`). A step dequantizes to fp32, updates, computes ``N``
from those fp32 moments and re-quantizes: one pass of
:func:`lowrank_optim.kernels.dispatch.quantized_adam_moment_update` (one fused Triton kernel on
CUDA); ``load``/``store`` dequantize and quantize with the same maps.

**FSDP2.** The codes and scales of a sharded parameter's moments are DTensors of the global
storage shape, sharded like the parameter, and every operation works on this rank's shard: its
blocks are the global moment's blocks (planning refuses a layout where a block would straddle two
shards, :mod:`lowrank_optim.quantization.sharded`), so the stored bytes are those of an unsharded
run and ``torch.distributed.checkpoint`` reshards them onto any number of ranks."""
from __future__ import annotations

from collections.abc import Callable

import torch

from ..kernels.dispatch import quantized_adam_moment_update
from ..kernels.quantized_moment_update import remap_quantized_slots, rounding_noise, storage_shapes
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
    """:class:`~lowrank_optim.moments.base.Moments` stored block-wise quantized (``bits`` 8 or 4):
    codes and scales of :attr:`shape`, of which this rank holds those of :attr:`local_shape`."""

    @property
    def keys(self) -> tuple[str, ...]:
        return QUANTIZED_KEYS

    @property
    def float_dtype(self) -> torch.dtype:
        return torch.float32

    def _codes_and_scales(self, prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's codes and scales of one moment."""
        return self.unwrap(self.state[f"{prefix}_codes"]), self.unwrap(self.state[f"{prefix}_scales"])

    def _put(self, prefix: str, codes: torch.Tensor, scales: torch.Tensor) -> None:
        """Store new local ``codes`` and ``scales`` (wrapped into the global storage shapes)."""
        code_shape, scale_shape = storage_shapes(self.shape, self.bits, self.layout,
                                                 resolve_block_size(self.bits, self.block_size))
        self.state[f"{prefix}_codes"] = self.wrap(codes, code_shape)
        self.state[f"{prefix}_scales"] = self.wrap(scales, scale_shape)

    def create(self, dtype: torch.dtype, device: torch.device, like: torch.Tensor | None = None) -> None:
        """Zero codes and scales (``dtype`` and ``like`` do not apply)."""
        for prefix, signed in _MOMENTS:
            self._put(prefix, *quantized_zeros(self.shard_shape, self.bits, signed, self.layout,
                                               block_size=self.block_size, device=device))

    def load(self) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(dequantize(*self._codes_and_scales(prefix), self.bits, signed, self.shard_shape, self.layout,
                                block_size=self.block_size) for prefix, signed in _MOMENTS)

    def store(self, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, *, grad: torch.Tensor | None = None,
              step: int | None = None) -> None:
        """Re-quantize; with ``grad`` and ``step`` a map that rounds stochastically (the 4-bit ``v``)
        draws :func:`~lowrank_optim.kernels.quantized_moment_update.rounding_noise` as the fused step."""
        if (grad is None) != (step is None):
            raise ValueError(f"store: grad and step go together (grad given: {grad is not None}, step={step!r})")
        for (prefix, signed), moment in zip(_MOMENTS, (exp_avg, exp_avg_sq)):
            if tuple(moment.shape) != self.shard_shape:
                raise ValueError(f"{prefix}: a moment of shape {tuple(moment.shape)} cannot be stored in one of "
                                 f"shape {self.shard_shape}")
            stochastic = grad is not None and codebook(self.bits, signed).stochastic
            noise = rounding_noise(moment, grad, step) if stochastic else None
            for stored, new in zip(self._codes_and_scales(prefix), quantize(moment, self.bits, signed, self.layout,
                                                                            block_size=self.block_size, noise=noise)):
                stored.copy_(new)

    def step(self, backend: str, grad: torch.Tensor, *, beta1: float, beta2: float, eps, bias_correction1,
             bias_correction2, step: int, source_slots: torch.Tensor | None = None) -> torch.Tensor:
        local = [tensor for prefix, _ in _MOMENTS for tensor in self._codes_and_scales(prefix)]
        normalized, *stored = quantized_adam_moment_update(
            backend, grad, *local,
            m_codebook=codebook(self.bits, True, grad.device), v_codebook=codebook(self.bits, False, grad.device),
            beta1=beta1, beta2=beta2, eps=eps, bias_correction1=bias_correction1, bias_correction2=bias_correction2,
            bits=self.bits, layout=self.layout, block_size=resolve_block_size(self.bits, self.block_size),
            step=step, source_slots=source_slots)
        if stored[0] is not local[0]:          # a slot remap made new tensors
            for index, (prefix, _) in enumerate(_MOMENTS):
                self._put(prefix, *stored[2 * index: 2 * index + 2])
        return normalized

    def zero_(self) -> None:
        self.create(torch.float32, self._codes_and_scales("exp_avg")[0].device)

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
                                                      signed=signed, shape=self.shard_shape, layout=self.layout,
                                                      block_size=self.block_size))

    def _chunk(self, start: int, stop: int) -> QuantizedMoments:
        """Values ``start:stop`` of this rank's shard. Chunks must start on a block boundary (blocks of
        a flat moment are consecutive values; a shard starts on one)."""
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
