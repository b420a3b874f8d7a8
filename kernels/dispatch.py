"""One function per operation of a projected step, routed to the PyTorch reference or the Triton
kernel by a resolved backend (``"torch"`` or ``"triton"``, see :mod:`.backend`).

The Triton modules are imported on first use only, so the package works without Triton and the
kernels are defined after the caller had its chance to set ``TRITON_INTERPRET``.

* :func:`project`: ``R = G·P`` / ``Pᵀ·G``; Triton gathers the basis columns by index (a dense
  ``P`` is one cuBLAS GEMM already and stays in PyTorch).
* :func:`adam_moment_update`: kernel 1, the moments and ``N`` in one pass, optionally remapping
  the moments' slots on the way (:mod:`.slot_remap`), with scalar or per-slot bias corrections.
* :func:`projected_weight_update_`: kernel 3, ``W ← a·W − b·ΔW`` with ``ΔW`` never materialised,
  optionally with the scaled residual (Fira) of the gradient outside the subspace.

With ``backend="triton"`` every case a kernel covers runs that kernel, which raises where it
cannot run: no silent fallback to PyTorch (the dense projection above is PyTorch by design).

Column selection (kernel 2) is called by the DCT projector directly: its PyTorch path has its own
transform choice (FFT on CPU).
"""
from __future__ import annotations

import torch

from .column_select import gather_project
from .moment_update import adam_moment_update_
from .slot_remap import remap_slots
from .weight_update import projected_weight_update_ as _reference_weight_update_


def project(backend: str, grad: torch.Tensor, basis: torch.Tensor, indices: torch.Tensor | None,
            side: str) -> torch.Tensor:
    """``R`` for ``P = basis[:, indices]`` (or ``basis`` when ``indices`` is None)."""
    if backend == "triton" and indices is not None:
        from .column_select_triton import gather_project_triton
        return gather_project_triton(grad, basis, indices, side)
    return gather_project(grad, basis, indices, side)


def adam_moment_update(backend: str, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                       *, beta1: float, beta2: float, eps: float | torch.Tensor,
                       bias_correction1: float | torch.Tensor, bias_correction2: float | torch.Tensor,
                       source_slots: torch.Tensor | None = None,
                       slot_dim: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(N, m, v)``; ``m``, ``v`` are the inputs updated in place, or new tensors when
    ``source_slots`` remaps them first. ``eps`` and the bias corrections are numbers or per-slot
    tensors broadcasting against the moments along ``slot_dim`` (``(1, r)`` for ``m×r`` moments,
    ``(r, 1)`` for ``r×n``); both backends take either."""
    scalars = dict(beta1=beta1, beta2=beta2, eps=eps, bias_correction1=bias_correction1,
                   bias_correction2=bias_correction2)
    if backend == "triton":
        from .moment_update_triton import adam_moment_update_triton
        return adam_moment_update_triton(grad, exp_avg, exp_avg_sq, source_slots=source_slots,
                                         slot_dim=slot_dim, **scalars)
    if source_slots is not None:
        exp_avg = remap_slots(exp_avg, source_slots, slot_dim)
        exp_avg_sq = remap_slots(exp_avg_sq, source_slots, slot_dim)
    return adam_moment_update_(grad, exp_avg, exp_avg_sq, **scalars), exp_avg, exp_avg_sq


def projected_weight_update_(backend: str, param: torch.Tensor, update: torch.Tensor, basis: torch.Tensor,
                             indices: torch.Tensor | None, side: str, *, lr: float, scale: float,
                             weight_decay: float, decay_before_update: bool,
                             residual_grad: torch.Tensor | None = None,
                             residual_low_rank_grad: torch.Tensor | None = None,
                             residual_coefficients: torch.Tensor | None = None) -> None:
    """``W ← a·W − b·ΔW`` in place, with the scaled residual when ``residual_grad`` (``G``),
    ``residual_low_rank_grad`` (``R``) and ``residual_coefficients`` (``c·φ``) are given
    (:mod:`.weight_update`)."""
    arguments = dict(lr=lr, scale=scale, weight_decay=weight_decay, decay_before_update=decay_before_update,
                     residual_grad=residual_grad, residual_low_rank_grad=residual_low_rank_grad,
                     residual_coefficients=residual_coefficients)
    if backend == "triton":
        from .weight_update_triton import projected_weight_update_triton_
        projected_weight_update_triton_(param, update, basis, indices, side, **arguments)
    else:
        _reference_weight_update_(param, update, basis, indices, side, **arguments)
