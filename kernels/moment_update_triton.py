"""Kernel 1: the projected Adam moment update in one pass, Triton.

Same math as the reference :func:`.moment_update.adam_moment_update_`, element by element over the
low-rank gradient ``R`` (fp32 or bf16; moments any float dtype, usually fp32)::

    m ← β1·m + (1 − β1)·R
    v ← β2·v + (1 − β2)·R²
    N = (m / bc1) / (√(v / bc2) + ε)

with the bias corrections ``bc1, bc2`` passed as runtime scalars (they change every step: no
recompilation). Arithmetic is fp32; ``m``, ``v`` and ``N`` are stored in the moments' dtype.

With ``source_slots`` (a transporting refresh of a column-subset subspace, :mod:`.slot_remap`) the
old moments are read gathered by slot and the results written to fresh tensors: the remap costs no
extra pass. Gathering in place would race (one program overwrites a slot another still has to
read), hence the new tensors.

Bytes moved per element (the benchmark's GB/s): read ``R``, ``m``, ``v``; write ``m``, ``v``,
``N``: ``size(R) + 5·size(moment)``, 22 B for bf16 ``R`` and fp32 moments.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .triton_support import autotune_options, check_launchable

_CONFIGS = [
    triton.Config({"BLOCK_SIZE": 1024}, num_warps=4),
    triton.Config({"BLOCK_SIZE": 2048}, num_warps=8),
    triton.Config({"BLOCK_SIZE": 4096}, num_warps=8),
    triton.Config({"BLOCK_SIZE": 512}, num_warps=2),
]


# NOTE: in place on the moments when no remap is asked for (exp_avg_in is exp_avg_out), so the
# autotuner must put them back after timing each config: restore_value.
@triton.autotune(configs=_CONFIGS, key=["n_elements", "HAS_REMAP"],
                 restore_value=["exp_avg_out_ptr", "exp_avg_sq_out_ptr"], **autotune_options())
@triton.jit
def _adam_moment_kernel(
    grad_ptr, exp_avg_in_ptr, exp_avg_sq_in_ptr, exp_avg_out_ptr, exp_avg_sq_out_ptr, update_ptr,
    source_slots_ptr, n_elements, n_cols,
    beta1, one_minus_beta1, beta2, one_minus_beta2, eps, bias_correction1, sqrt_bias_correction2,
    HAS_REMAP: tl.constexpr, SLOTS_ARE_COLUMNS: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    offsets = tl.program_id(0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    in_bounds = offsets < n_elements
    grad = tl.load(grad_ptr + offsets, mask=in_bounds).to(tl.float32)
    if HAS_REMAP:
        row = offsets // n_cols
        col = offsets % n_cols
        if SLOTS_ARE_COLUMNS:
            source = tl.load(source_slots_ptr + col, mask=in_bounds, other=-1)
            source_offsets = row * n_cols + source
        else:
            source = tl.load(source_slots_ptr + row, mask=in_bounds, other=-1)
            source_offsets = source * n_cols + col
        kept = in_bounds & (source >= 0)
        exp_avg = tl.load(exp_avg_in_ptr + source_offsets, mask=kept, other=0.0).to(tl.float32)
        exp_avg_sq = tl.load(exp_avg_sq_in_ptr + source_offsets, mask=kept, other=0.0).to(tl.float32)
    else:
        exp_avg = tl.load(exp_avg_in_ptr + offsets, mask=in_bounds).to(tl.float32)
        exp_avg_sq = tl.load(exp_avg_sq_in_ptr + offsets, mask=in_bounds).to(tl.float32)

    exp_avg = beta1 * exp_avg + one_minus_beta1 * grad
    exp_avg_sq = beta2 * exp_avg_sq + one_minus_beta2 * grad * grad
    # NOTE: round-to-nearest sqrt and division (tl.sqrt / "/" are approximate on GPUs): the kernel
    # is memory-bound, so IEEE rounding costs nothing and keeps it within an ulp of the reference.
    denom = tl.div_rn(tl.sqrt_rn(exp_avg_sq), sqrt_bias_correction2) + eps
    update = tl.div_rn(tl.div_rn(exp_avg, denom), bias_correction1)

    moment_dtype = exp_avg_out_ptr.dtype.element_ty
    tl.store(exp_avg_out_ptr + offsets, exp_avg.to(moment_dtype), mask=in_bounds)
    tl.store(exp_avg_sq_out_ptr + offsets, exp_avg_sq.to(moment_dtype), mask=in_bounds)
    tl.store(update_ptr + offsets, update.to(moment_dtype), mask=in_bounds)


def adam_moment_update_triton(
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    beta1: float,
    beta2: float,
    eps: float,
    bias_correction1: float,
    bias_correction2: float,
    source_slots: torch.Tensor | None = None,
    slot_dim: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(N, m, v)``: the normalized update and the updated moments.

    Without ``source_slots`` the moments are updated in place and returned as they are; with them
    (int64, one source slot or −1 per slot along ``slot_dim`` of the 2-D moments) the moments are
    remapped on the fly and new tensors returned.
    """
    if exp_avg.shape != grad.shape or exp_avg_sq.shape != grad.shape:
        raise ValueError(f"moment shapes {tuple(exp_avg.shape)}, {tuple(exp_avg_sq.shape)} "
                         f"do not match the gradient's {tuple(grad.shape)}")
    if not (exp_avg.is_contiguous() and exp_avg_sq.is_contiguous()):
        raise ValueError("the moments must be contiguous (they are updated in place)")
    check_launchable(grad, exp_avg, exp_avg_sq)
    grad = grad.contiguous()
    has_remap = source_slots is not None
    if has_remap:
        if grad.ndim != 2 or source_slots.shape != (grad.shape[slot_dim],):
            raise ValueError(f"source_slots of shape {tuple(source_slots.shape)} do not index dim {slot_dim} "
                             f"of moments of shape {tuple(grad.shape)}")
        exp_avg_out, exp_avg_sq_out = torch.empty_like(exp_avg), torch.empty_like(exp_avg_sq)
    else:
        exp_avg_out, exp_avg_sq_out = exp_avg, exp_avg_sq
    update = torch.empty_like(exp_avg)
    n_elements = grad.numel()
    if n_elements == 0:
        return update, exp_avg_out, exp_avg_sq_out
    n_cols = grad.shape[-1] if grad.ndim else 1

    def grid(meta):
        return (triton.cdiv(n_elements, meta["BLOCK_SIZE"]),)

    _adam_moment_kernel[grid](
        grad, exp_avg, exp_avg_sq, exp_avg_out, exp_avg_sq_out, update,
        source_slots if has_remap else grad, n_elements, n_cols,
        beta1, 1.0 - beta1, beta2, 1.0 - beta2, eps, bias_correction1, math.sqrt(bias_correction2),
        HAS_REMAP=has_remap, SLOTS_ARE_COLUMNS=slot_dim == 1,
    )
    return update, exp_avg_out, exp_avg_sq_out
