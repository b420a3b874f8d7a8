"""Float moments: ``exp_avg`` and ``exp_avg_sq`` stored as tensors of the moments' dtype (DTensors
under FSDP2), updated by the float moment kernel (:func:`lowrank_optim.kernels.dispatch.adam_moment_update`)."""
from __future__ import annotations

from collections.abc import Callable

import torch

from ..kernels.dispatch import adam_moment_update
from ..kernels.slot_remap import remap_slots
from ..quantization import moment_state_bytes
from .base import Moments

FLOAT_KEYS = ("exp_avg", "exp_avg_sq")


class FloatMoments(Moments):
    """:class:`~lowrank_optim.moments.base.Moments` stored as float tensors (``bits`` is None)."""

    @property
    def keys(self) -> tuple[str, ...]:
        return FLOAT_KEYS

    @property
    def float_dtype(self) -> torch.dtype:
        return self.state["exp_avg"].dtype

    def _local(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.unwrap(self.state["exp_avg"]), self.unwrap(self.state["exp_avg_sq"])

    def create(self, dtype: torch.dtype, device: torch.device, like: torch.Tensor | None = None) -> None:
        for key in FLOAT_KEYS:
            zeros = torch.zeros_like(like, dtype=dtype) if like is not None else self.wrap(
                torch.zeros(self.shard_shape, dtype=dtype, device=device), self.shape)
            self.state[key] = zeros

    def load(self) -> tuple[torch.Tensor, torch.Tensor]:
        exp_avg, exp_avg_sq = self._local()
        return exp_avg.float(), exp_avg_sq.float()          # fp32 moments: themselves

    def store(self, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, *, grad: torch.Tensor | None = None,
              step: int | None = None) -> None:
        for key, stored, moment in zip(FLOAT_KEYS, self._local(), (exp_avg, exp_avg_sq)):
            if moment.shape != stored.shape:
                raise ValueError(f"{key}: a moment of shape {tuple(moment.shape)} cannot be stored in one of shape "
                                 f"{tuple(stored.shape)}")
            if moment is not stored:
                stored.copy_(moment)

    def step(self, backend: str, grad: torch.Tensor, *, beta1: float, beta2: float, eps, bias_correction1,
             bias_correction2, step: int, source_slots: torch.Tensor | None = None) -> torch.Tensor:
        exp_avg, exp_avg_sq = self._local()
        normalized, new_avg, new_avg_sq = adam_moment_update(
            backend, grad, exp_avg, exp_avg_sq, beta1=beta1, beta2=beta2, eps=eps, bias_correction1=bias_correction1,
            bias_correction2=bias_correction2, source_slots=source_slots, layout=self.layout)
        if new_avg is not exp_avg:              # a slot remap made new tensors
            self.state["exp_avg"], self.state["exp_avg_sq"] = self.wrap(new_avg, self.shape), \
                self.wrap(new_avg_sq, self.shape)
        return normalized

    def zero_(self) -> None:
        for moment in self._local():
            moment.zero_()

    def remap_slots(self, source_slots: torch.Tensor) -> None:
        for key in FLOAT_KEYS:
            self.state[key] = self.wrap(remap_slots(self.unwrap(self.state[key]), source_slots, self.layout),
                                        self.shape)

    def transform_(self, first: Callable[[torch.Tensor], torch.Tensor],
                   second: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """In the moments' own dtype (no fp32 round trip)."""
        for moment, transform in zip(self._local(), (first, second)):
            moment.copy_(transform(moment))

    def _chunk(self, start: int, stop: int) -> FloatMoments:
        views = {key: self.unwrap(self.state[key]).view(-1)[start:stop] for key in FLOAT_KEYS}
        return FloatMoments(views, None, "flat", (stop - start,))

    def expected_bytes(self, float_dtype: torch.dtype) -> int:
        return 2 * moment_state_bytes(self.shape, None, self.layout, float_dtype=float_dtype)
