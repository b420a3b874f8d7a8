"""Adam's two moments of one tensor, as the optimizer state stores them: float or 8/4-bit.

A parameter group's ``moment_bits`` (``None``, ``8`` or ``4``) chooses the storage, for projected
moments (``m×r`` / ``r×n``) and plain parameters alike, and its ``moment_block_size`` the values per
scale (None: 256 at 8 bits, 128 at 4; :mod:`lowrank_optim.quantization` has the scheme). The state
keys are::

    float:      exp_avg, exp_avg_sq                              (moments_dtype, or the parameter's)
    quantized:  exp_avg_codes, exp_avg_scales, exp_avg_sq_codes, exp_avg_sq_scales
                (uint8 codes and fp32 block scales; blocks along the rank slots)

Whether a moment is quantized is decided from the parameter's *global* moment shape (fewer than
4096 values stay in float, :func:`~lowrank_optim.quantization.moment_bits_for`), so sharding never
changes the precision. A step dequantizes to fp32, updates, computes ``N`` from those fp32 moments
and re-quantizes (one fused Triton kernel on CUDA).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .kernels.dispatch import adam_moment_update
from .kernels.slot_remap import remap_slots
from .quantization import (
    layout_for,
    moment_bits_for,
    moment_state_bytes,
    quantized_adam_moment_update_,
    quantized_zeros,
    remap_quantized_slots,
    requantize_transformed,
    resolve_block_size,
)

FLOAT_KEYS = ("exp_avg", "exp_avg_sq")
QUANTIZED_KEYS = ("exp_avg_codes", "exp_avg_scales", "exp_avg_sq_codes", "exp_avg_sq_scales")


def _identity(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


@dataclass
class Moments:
    """A view of one parameter's moments in its state dict (``bits`` None: float tensors).

    ``layout``: ``"columns"`` (right-projected ``m×r``: slots are columns), ``"rows"`` (left,
    ``r×n``) or ``"flat"`` (a plain parameter); ``shape`` is the moment's (global) shape. Float
    moments of FSDP2-sharded parameters are stored as DTensors: ``unwrap`` gives this rank's
    shard, ``wrap`` makes a stored moment of a new local one. ``block_size``: values per scale of
    quantized moments (None: the default of ``bits``)."""

    state: dict
    bits: int | None
    layout: str
    shape: tuple[int, ...]
    unwrap: Callable[[torch.Tensor], torch.Tensor] = _identity
    wrap: Callable[[torch.Tensor], torch.Tensor] = _identity
    block_size: int | None = None

    @classmethod
    def of(cls, state: dict, shape, side: str | None, moment_bits: int | None, block_size: int | None = None,
           **storage) -> Moments:
        """The moments of a tensor of moment ``shape`` (global) projected on ``side`` (None: plain)."""
        return cls(state, moment_bits_for(tuple(shape), moment_bits), layout_for(side), tuple(shape),
                   block_size=block_size, **storage)

    @property
    def exists(self) -> bool:
        return all(key in self.state for key in self.keys)

    @property
    def keys(self) -> tuple[str, ...]:
        return FLOAT_KEYS if self.bits is None else QUANTIZED_KEYS

    def create(self, dtype: torch.dtype, device: torch.device, like: torch.Tensor | None = None,
               local_shape: tuple[int, ...] | None = None) -> None:
        """Zero moments: float ones in ``dtype``, shaped like ``like`` when given (a plain
        parameter, a DTensor under FSDP2), else of ``local_shape`` (this rank's shard; default
        :attr:`shape`) passed through :attr:`wrap`."""
        if self.bits is None:
            for key in FLOAT_KEYS:
                zeros = torch.zeros_like(like, dtype=dtype) if like is not None else self.wrap(
                    torch.zeros(local_shape or self.shape, dtype=dtype, device=device))
                self.state[key] = zeros
            return
        for prefix, signed in (("exp_avg", True), ("exp_avg_sq", False)):
            codes, scales = quantized_zeros(self.shape, self.bits, signed, self.layout, block_size=self.block_size,
                                            device=device)
            self.state[f"{prefix}_codes"], self.state[f"{prefix}_scales"] = codes, scales

    def step(self, backend: str, grad: torch.Tensor, *, beta1: float, beta2: float, eps, bias_correction1,
             bias_correction2, source_slots: torch.Tensor | None = None) -> torch.Tensor:
        """One Adam moment step with gradient ``grad`` (remapping slots first when ``source_slots``);
        returns ``N = m̂/(√v̂ + ε)`` (in the float moments' dtype, or fp32)."""
        scalars = dict(beta1=beta1, beta2=beta2, eps=eps, bias_correction1=bias_correction1,
                       bias_correction2=bias_correction2, source_slots=source_slots)
        if self.bits is None:
            exp_avg, exp_avg_sq = self.unwrap(self.state["exp_avg"]), self.unwrap(self.state["exp_avg_sq"])
            normalized, new_avg, new_avg_sq = adam_moment_update(
                backend, grad, exp_avg, exp_avg_sq, slot_dim=1 if self.layout == "columns" else 0, **scalars)
            if new_avg is not exp_avg:              # a slot remap made new tensors
                self.state["exp_avg"], self.state["exp_avg_sq"] = self.wrap(new_avg), self.wrap(new_avg_sq)
            return normalized
        normalized, *stored = quantized_adam_moment_update_(
            grad, *(self.state[key] for key in QUANTIZED_KEYS), bits=self.bits, layout=self.layout,
            block_size=self.block_size, backend=backend, **scalars)
        self.state.update(zip(QUANTIZED_KEYS, stored))
        return normalized

    @property
    def float_dtype(self) -> torch.dtype:
        """The dtype ``N`` comes out in."""
        return self.state["exp_avg"].dtype if self.bits is None else torch.float32

    def zero_(self) -> None:
        """Reset both moments to zero (a ``moments="reset"`` refresh)."""
        if self.bits is None:
            for key in FLOAT_KEYS:
                self.unwrap(self.state[key]).zero_()
            return
        device = self.state["exp_avg_codes"].device
        self.create(torch.float32, device)

    def remap_slots(self, source_slots: torch.Tensor) -> None:
        """Slot ``j`` takes old slot ``source_slots[j]`` (zero where −1), for both moments."""
        if self.bits is None:
            dim = 1 if self.layout == "columns" else 0
            for key in FLOAT_KEYS:
                self.state[key] = self.wrap(remap_slots(self.unwrap(self.state[key]), source_slots, dim))
            return
        for prefix, signed in (("exp_avg", True), ("exp_avg_sq", False)):
            codes, scales = remap_quantized_slots(self.state[f"{prefix}_codes"], self.state[f"{prefix}_scales"],
                                                  source_slots, bits=self.bits, signed=signed, layout=self.layout)
            self.state[f"{prefix}_codes"], self.state[f"{prefix}_scales"] = codes, scales

    def transform_(self, first: Callable[[torch.Tensor], torch.Tensor],
                   second: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """``m ← first(m)``, ``v ← second(v)`` (an SVD subspace rotation); quantized moments are
        dequantized, transformed in fp32 and re-quantized."""
        if self.bits is None:
            for key, transform in zip(FLOAT_KEYS, (first, second)):
                moment = self.unwrap(self.state[key])
                moment.copy_(transform(moment))
            return
        for (prefix, signed), transform in zip((("exp_avg", True), ("exp_avg_sq", False)), (first, second)):
            codes, scales = requantize_transformed(
                self.state[f"{prefix}_codes"], self.state[f"{prefix}_scales"], transform, bits=self.bits,
                signed=signed, shape=self.shape, layout=self.layout, block_size=self.block_size)
            self.state[f"{prefix}_codes"], self.state[f"{prefix}_scales"] = codes, scales

    def flat_chunk(self, start: int, stop: int) -> Moments:
        """The moments of values ``start:stop`` of a ``"flat"`` (plain) moment, as views of the
        stored tensors, so stepping the chunk updates the state in place. Quantized chunks must
        start on a block boundary (blocks of a flat moment are consecutive values)."""
        if self.layout != "flat":
            raise ValueError(f"flat_chunk needs the 'flat' layout, got {self.layout!r}")
        if self.bits is None:
            views = {key: self.unwrap(self.state[key]).view(-1)[start:stop] for key in FLOAT_KEYS}
            return Moments(views, None, "flat", (stop - start,))
        block = resolve_block_size(self.bits, self.block_size)
        if start % block:
            raise ValueError(f"a quantized chunk must start on a block of {block} values, got start={start}")
        per_byte = 8 // self.bits
        views = {}
        for prefix in ("exp_avg", "exp_avg_sq"):
            views[f"{prefix}_codes"] = self.state[f"{prefix}_codes"][start // per_byte: -(-stop // per_byte)]
            views[f"{prefix}_scales"] = self.state[f"{prefix}_scales"][start // block: -(-stop // block)]
        return Moments(views, self.bits, "flat", (stop - start,), block_size=self.block_size)

    def expected_bytes(self, float_dtype: torch.dtype) -> int:
        """Bytes both moments take once created (nothing allocated)."""
        return 2 * moment_state_bytes(self.shape, self.bits, self.layout, block_size=self.block_size,
                                      float_dtype=float_dtype)
