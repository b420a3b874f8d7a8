"""The moments protocol: one parameter's Adam moments ``m``, ``v`` behind one small interface,
whatever their storage (float tensors, or 8/4-bit codes and scales).

A :class:`Moments` is a view of a state dict; the state itself holds plain tensors only. Every
storage offers

* ``load() → (m, v)`` as fp32 tensors of this rank's local shape, ``store(m, v)`` back;
* ``step``: Adam's moment update on a (projected) gradient ``R`` and the normalized update::

      m ← β1·m + (1 − β1)·R,     v ← β2·v + (1 − β2)·R²,     N = (m / bc1) / (√(v / bc2) + ε)

  with the slots remapped first when ``source_slots`` is given (a DCT subspace change);
* ``remap_slots`` (slot ``j`` ← old slot ``s_j``, zero where ``s_j = −1``), ``transform_``
  (``m ← f(m)``, ``v ← g(v)``: an SVD rotation), ``zero_``;
* ``create``, ``exists``, ``keys``, ``expected_bytes`` (the bytes ``create`` allocates) and, for a
  plain parameter, ``flat_chunk`` (a view of a range of values that steps the state in place).

``layout`` is the storage layout (:mod:`lowrank_optim.kernels.layout`): ``"columns"`` (a
right-projected ``m×r`` moment, slots are columns), ``"rows"`` (left, ``r×n``) or ``"flat"`` (a
plain parameter).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..kernels.layout import layout_for
from ..quantization import moment_bits_for


def _identity(tensor: torch.Tensor, shape=None) -> torch.Tensor:
    return tensor


@dataclass
class Moments(ABC):
    """A view of one parameter's moments in its state dict (``bits`` None: float tensors).

    ``layout``: ``"columns"``, ``"rows"`` or ``"flat"`` (module doc); ``shape`` is the moment's
    (global) shape. Moments of FSDP2-sharded parameters are stored as DTensors (float moments,
    and the codes and scales of quantized ones): ``unwrap`` gives this rank's shard, ``wrap(local,
    global_shape)`` makes a stored tensor of a new local one, and ``local_shape`` is the moment's
    shape on this rank (None: :attr:`shape`, unsharded). ``block_size``: values per scale of
    quantized moments (None: the default of ``bits``)."""

    state: dict
    bits: int | None
    layout: str
    shape: tuple[int, ...]
    unwrap: Callable[[torch.Tensor], torch.Tensor] = _identity
    wrap: Callable[[torch.Tensor, tuple[int, ...]], torch.Tensor] = _identity
    block_size: int | None = None
    local_shape: tuple[int, ...] | None = None

    @classmethod
    def of(cls, state: dict, shape, side: str | None, moment_bits: int | None, block_size: int | None = None,
           **storage) -> Moments:
        """The moments of a tensor of moment ``shape`` (global) projected on ``side`` (None: plain):
        quantized when :func:`~lowrank_optim.quantization.moment_bits_for` says so, else float."""
        return MomentSpec.of(shape, side, moment_bits, block_size).view(state, **storage)

    @property
    def shard_shape(self) -> tuple[int, ...]:
        """The moment's shape on this rank: :attr:`local_shape`, or :attr:`shape` unsharded."""
        return self.shape if self.local_shape is None else tuple(self.local_shape)

    @property
    def exists(self) -> bool:
        return all(key in self.state for key in self.keys)

    @property
    @abstractmethod
    def keys(self) -> tuple[str, ...]:
        """The state keys of the two moments."""

    @property
    @abstractmethod
    def float_dtype(self) -> torch.dtype:
        """The dtype ``N`` comes out in."""

    @abstractmethod
    def create(self, dtype: torch.dtype, device: torch.device, like: torch.Tensor | None = None) -> None:
        """Zero moments of :attr:`shard_shape`, passed through
        :attr:`wrap`: float ones in ``dtype`` (shaped like ``like`` when given: a plain parameter, a
        DTensor under FSDP2), quantized ones as codes and scales."""

    @abstractmethod
    def load(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(m, v)`` in fp32, of this rank's local shape. Float fp32 moments are the stored
        tensors themselves (an in-place edit updates the state); any other storage gives copies."""

    @abstractmethod
    def store(self, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, *, grad: torch.Tensor | None = None,
              step: int | None = None) -> None:
        """Write fp32 moments of the local shape back (in place into the stored tensors): float
        ones in their dtype, quantized ones re-quantized into their codes and scales. A rule that
        updates the moments itself passes the step's gradient ``grad`` and count ``step``: a
        storage that rounds stochastically then writes as :meth:`step` does (the same noise);
        without them it rounds to nearest."""

    @abstractmethod
    def step(self, backend: str, grad: torch.Tensor, *, beta1: float, beta2: float, eps, bias_correction1,
             bias_correction2, step: int, source_slots: torch.Tensor | None = None) -> torch.Tensor:
        """One Adam moment step with gradient ``grad`` (remapping slots first when ``source_slots``)
        on the resolved ``backend`` (``"torch"`` or ``"triton"``); returns ``N = m̂/(√v̂ + ε)`` in
        :attr:`float_dtype` (module doc for the math). ``step``: the count of the step being taken
        (≥ 1), which a storage that rounds stochastically draws its noise with."""

    @abstractmethod
    def zero_(self) -> None:
        """Reset both moments to zero (a ``moments="reset"`` refresh)."""

    @abstractmethod
    def remap_slots(self, source_slots: torch.Tensor) -> None:
        """Slot ``j`` takes old slot ``source_slots[j]`` (zero where −1), for both moments."""

    @abstractmethod
    def transform_(self, first: Callable[[torch.Tensor], torch.Tensor],
                   second: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """``m ← first(m)``, ``v ← second(v)`` (an SVD subspace rotation)."""

    def flat_chunk(self, start: int, stop: int) -> Moments:
        """The moments of values ``start:stop`` of a ``"flat"`` (plain) moment, as views of the
        stored tensors, so stepping the chunk updates the state in place."""
        if self.layout != "flat":
            raise ValueError(f"flat_chunk needs the 'flat' layout, got {self.layout!r}")
        return self._chunk(start, stop)

    @abstractmethod
    def _chunk(self, start: int, stop: int) -> Moments:
        """:meth:`flat_chunk` of a ``"flat"`` moment."""

    @abstractmethod
    def expected_bytes(self, float_dtype: torch.dtype) -> int:
        """Bytes both moments take once created (nothing allocated); ``float_dtype``: that of
        float moments."""


@dataclass(frozen=True)
class MomentSpec:
    """How a tensor's moments are stored, resolved once (a parameter's plan holds it): the storage
    class, ``bits`` (None: float), ``layout``, the global ``shape`` and ``block_size``."""

    storage: type[Moments]
    bits: int | None
    layout: str
    shape: tuple[int, ...]
    block_size: int | None = None

    @classmethod
    def of(cls, shape, side: str | None, moment_bits: int | None, block_size: int | None = None) -> MomentSpec:
        """The spec of moments of global ``shape`` projected on ``side`` (None: plain), quantized
        when :func:`~lowrank_optim.quantization.moment_bits_for` says so."""
        # NOTE: imported here because both implementations subclass Moments.
        from .float_moments import FloatMoments
        from .quantized_moments import QuantizedMoments

        shape = tuple(shape)
        bits = moment_bits_for(shape, moment_bits)
        return cls(FloatMoments if bits is None else QuantizedMoments, bits, layout_for(side), shape, block_size)

    def view(self, state: dict, **storage) -> Moments:
        """The moments ``state`` holds (``storage``: ``unwrap``/``wrap``/``local_shape`` of sharded
        moments, :func:`lowrank_optim.sharding.moment_storage`)."""
        return self.storage(state, self.bits, self.layout, self.shape, block_size=self.block_size, **storage)

    def expected_bytes(self, float_dtype: torch.dtype) -> int:
        """Bytes both moments take once created; ``float_dtype``: that of float moments."""
        return self.view({}).expected_bytes(float_dtype)
