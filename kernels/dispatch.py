"""One function per operation of a projected step, routed to the PyTorch reference or the Triton
kernel by a resolved backend (``"torch"`` or ``"triton"``, see :mod:`.backend`).

The Triton modules are imported on first use only, so the package works without Triton and the
kernels are defined after the caller had its chance to set ``TRITON_INTERPRET``.

* :func:`project`: ``R = G·P`` / ``Pᵀ·G``; Triton gathers the basis columns by index (a dense
  ``P`` is one cuBLAS GEMM already and stays in PyTorch).
* :func:`adam_moment_update`: kernel 1, the moments and ``N`` in one pass, optionally remapping
  the moments' slots on the way (:mod:`.slot_remap`), with scalar or per-slot bias corrections;
* :func:`quantized_adam_moment_update`: the same step on 8/4-bit block-wise quantized moments
  (:mod:`.quantized_moment_update`), dequantized, updated and re-quantized in one pass;
* :func:`projected_weight_update_`: kernel 3, ``W ← a·W − b·ΔW`` with ``ΔW`` never materialised,
  optionally with the scaled residual (Fira) of the gradient outside the subspace;
* :func:`channel_squared_norms` and :func:`scaled_weight_update_`: APOLLO's update
  ``W ← a·W − b·(f∘G)`` with per-channel (or one) factors ``f``, and the channel norms of ``G``
  its norm-growth limiter reads (:mod:`.channel_scaling`: two memory-bound passes over ``G``);
  :func:`project_with_squared_norms`: ``R`` and those norms together (on the CPU in one pass
  over ``G``, :mod:`.projected_norms`).
* :func:`int8_weight_update_`: ``Ŵ ← SR(a·Ŵ − b·ΔW)`` on a weight stored as int8 rows and
  scales (:mod:`.int8_weight_update`), dequantized, updated and re-quantized with stochastic
  rounding in one pass.

Both moment updates take the moments' layout in one vocabulary (``"columns"``, ``"rows"``,
``"flat"``, :mod:`.layout`) and compute, in fp32 for quantized moments::

    m ← β1·m + (1 − β1)·R,    v ← β2·v + (1 − β2)·R²,    N = (m / bc1) / (√(v / bc2) + ε)

With ``backend="triton"`` every case a kernel covers runs that kernel, which raises where it
cannot run: no silent fallback to PyTorch (the dense projection above is PyTorch by design).

Column selection (kernel 2) is called by the DCT projector directly: its PyTorch path has its own
transform choice (FFT on CPU).
"""
from __future__ import annotations

import torch

from .backend import RESOLVED_BACKENDS
from .channel_scaling import channel_squared_norms as _reference_channel_squared_norms
from .channel_scaling import scaled_weight_update_ as _reference_scaled_weight_update_
from .column_select import gather_project
from .int8_weight_update import int8_weight_update_ as _reference_int8_weight_update_
from .moment_update import adam_moment_update_
from .projected_norms import project_with_squared_norms as _reference_project_with_squared_norms
from .quantized_moment_update import Codebook
from .quantized_moment_update import quantized_adam_moment_update_ as _reference_quantized_update_
from .slot_remap import remap_slots
from .weight_update import projected_weight_update_ as _reference_weight_update_


def _check_moment_backend(backend) -> None:
    if backend not in RESOLVED_BACKENDS:
        raise ValueError(f"Invalid backend: {backend!r} (expected 'torch' or 'triton'; resolve 'auto' first)")


def project(backend: str, grad: torch.Tensor, basis: torch.Tensor, indices: torch.Tensor | None,
            side: str) -> torch.Tensor:
    """``R`` for ``P = basis[:, indices]`` (or ``basis`` when ``indices`` is None)."""
    if backend == "triton" and indices is not None:
        from .column_select_triton import gather_project_triton
        return gather_project_triton(grad, basis, indices, side)
    return gather_project(grad, basis, indices, side)


def project_with_squared_norms(backend: str, grad: torch.Tensor, basis: torch.Tensor, indices: torch.Tensor | None,
                               side: str, norm_side: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(R, channel_squared_norms(grad, norm_side))``: :func:`project` and :func:`channel_squared_norms`."""
    if backend == "triton":
        return project(backend, grad, basis, indices, side), channel_squared_norms(backend, grad, norm_side)
    _check_moment_backend(backend)
    return _reference_project_with_squared_norms(grad, basis, indices, side, norm_side)


def adam_moment_update(backend: str, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                       *, beta1: float, beta2: float, eps: float | torch.Tensor,
                       bias_correction1: float | torch.Tensor, bias_correction2: float | torch.Tensor,
                       source_slots: torch.Tensor | None = None,
                       layout: str = "columns") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(N, m, v)`` of float moments in ``layout``; ``m``, ``v`` are the inputs updated in place,
    or new tensors when ``source_slots`` remaps their slots first. ``eps`` and the bias
    corrections are numbers or per-slot tensors broadcasting against the moments (``(1, r)`` for
    ``"columns"``, ``(r, 1)`` for ``"rows"``); both backends take either. ``N`` is in the moments'
    dtype."""
    _check_moment_backend(backend)
    scalars = dict(beta1=beta1, beta2=beta2, eps=eps, bias_correction1=bias_correction1,
                   bias_correction2=bias_correction2)
    if backend == "triton":
        from .moment_update_triton import adam_moment_update_triton
        return adam_moment_update_triton(grad, exp_avg, exp_avg_sq, source_slots=source_slots,
                                         layout=layout, **scalars)
    if source_slots is not None:
        exp_avg = remap_slots(exp_avg, source_slots, layout)
        exp_avg_sq = remap_slots(exp_avg_sq, source_slots, layout)
    return adam_moment_update_(grad, exp_avg, exp_avg_sq, **scalars), exp_avg, exp_avg_sq


def quantized_adam_moment_update(backend: str, grad: torch.Tensor, m_codes: torch.Tensor, m_scales: torch.Tensor,
                                 v_codes: torch.Tensor, v_scales: torch.Tensor, *, m_codebook: Codebook,
                                 v_codebook: Codebook, beta1: float, beta2: float, eps: float | torch.Tensor,
                                 bias_correction1: float | torch.Tensor, bias_correction2: float | torch.Tensor,
                                 bits: int, layout: str, block_size: int, step: int,
                                 source_slots: torch.Tensor | None = None,
                                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(N, m_codes, m_scales, v_codes, v_scales)`` of quantized moments (the maps of ``m`` and
    ``v`` as codebooks on the gradient's device, ``block_size`` resolved): the state is updated in
    place and returned, or, with ``source_slots`` (the DCT transport), remapped first into new
    tensors. ``N`` is fp32. Per-slot corrections: tensors with one value per slot. ``step``: the
    step count, a word of the stochastic rounding's noise."""
    _check_moment_backend(backend)
    arguments = dict(m_codebook=m_codebook, v_codebook=v_codebook, beta1=beta1, beta2=beta2, eps=eps,
                     bias_correction1=bias_correction1, bias_correction2=bias_correction2, bits=bits,
                     layout=layout, block_size=block_size, step=step, source_slots=source_slots)
    if backend == "triton":
        from .quantized_moment_update_triton import quantized_adam_moment_update_triton
        return quantized_adam_moment_update_triton(grad, m_codes, m_scales, v_codes, v_scales, **arguments)
    return _reference_quantized_update_(grad, m_codes, m_scales, v_codes, v_scales, **arguments)


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


def channel_squared_norms(backend: str, matrix: torch.Tensor, side: str | None) -> torch.Tensor:
    """``‖matrix_c‖²`` per channel of ``side`` (1-D), or ``‖matrix‖²`` (0-d) for ``side`` None, in at
    least fp32 (fp32 from Triton, which takes 2-D matrices)."""
    _check_moment_backend(backend)
    if backend == "triton":
        from .channel_scaling_triton import channel_squared_norms_triton
        return channel_squared_norms_triton(matrix, side)
    return _reference_channel_squared_norms(matrix, side)


def scaled_weight_update_(backend: str, weight: torch.Tensor, grad: torch.Tensor, factors: torch.Tensor, side: str,
                          *, a: float, b: float) -> None:
    """``W ← a·W − b·(f∘G)`` in place, ``factors`` ``f`` one per channel of ``side`` or 0-d
    (:mod:`.channel_scaling`)."""
    _check_moment_backend(backend)
    if backend == "triton":
        from .channel_scaling_triton import scaled_weight_update_triton_
        scaled_weight_update_triton_(weight, grad, factors, side, a=a, b=b)
    else:
        _reference_scaled_weight_update_(weight, grad, factors, side, a=a, b=b)


def int8_weight_update_(backend: str, codes: torch.Tensor, scales: torch.Tensor, delta: torch.Tensor, *, a: float,
                        b: float, seed: torch.Tensor) -> None:
    """``Ŵ ← SR(a·Ŵ − b·ΔW)`` in place on an int8 weight's ``codes`` and ``scales``, the rounding
    noise from ``seed``; both backends write the same bits (:mod:`.int8_weight_update`)."""
    _check_moment_backend(backend)
    if backend == "triton":
        from .int8_weight_update_triton import int8_weight_update_triton_
        int8_weight_update_triton_(codes, scales, delta, a=a, b=b, seed=seed)
    else:
        _reference_int8_weight_update_(codes, scales, delta, a=a, b=b, seed=seed)
