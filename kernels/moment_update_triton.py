"""Kernel 1: the projected Adam moment update in one pass, Triton.

Same math as the reference :func:`.moment_update.adam_moment_update_`, element by element over the
low-rank gradient ``R`` (fp32 or bf16; moments any float dtype, usually fp32)::

    m ← β1·m + (1 − β1)·R
    v ← β2·v + (1 − β2)·R²
    N = (m / bc1) / (√(v / bc2) + ε)

with the bias corrections ``bc1, bc2`` and ``ε`` passed as runtime scalars (they change every step:
no recompilation), or, for per-slot bias correction, as one value per slot: for 2-D moments whose
slots are the columns (right projection, ``m×r``) or the rows (left, ``r×n``), element ``(i, j)``
uses ``bc1[s], bc2[s], ε[s]`` with ``s = j`` or ``s = i``. Arithmetic is fp32; ``m``, ``v`` and
``N`` are stored in the moments' dtype.

With ``source_slots`` (a transporting refresh of a column-subset subspace, :mod:`.slot_remap`) the
old moments are read gathered by slot and the results written to fresh tensors: the remap costs no
extra pass. Gathering in place would race (one program overwrites a slot another still has to
read), hence the new tensors. Per-slot corrections index the new slots (the slot written).

Bytes moved per element (the benchmark's GB/s): read ``R``, ``m``, ``v``; write ``m``, ``v``,
``N``: ``size(R) + 5·size(moment)``, 22 B for bf16 ``R`` and fp32 moments (per-slot corrections
add ``12·r`` bytes per call, not per element).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .layout import slot_dim
from .triton_support import autotune_options, check_launchable

_CONFIGS = [
    triton.Config({"BLOCK_SIZE": 1024}, num_warps=4),
    triton.Config({"BLOCK_SIZE": 2048}, num_warps=8),
    triton.Config({"BLOCK_SIZE": 4096}, num_warps=8),
    triton.Config({"BLOCK_SIZE": 512}, num_warps=2),
]


# NOTE: in place on the moments when no remap is asked for (exp_avg_in is exp_avg_out), so the
# autotuner must put them back after timing each config: restore_value.
@triton.autotune(configs=_CONFIGS, key=["n_elements", "HAS_REMAP", "PER_SLOT"],
                 restore_value=["exp_avg_out_ptr", "exp_avg_sq_out_ptr"], **autotune_options())
@triton.jit
def _adam_moment_kernel(
    grad_ptr, exp_avg_in_ptr, exp_avg_sq_in_ptr, exp_avg_out_ptr, exp_avg_sq_out_ptr, update_ptr,
    source_slots_ptr, slot_bias_correction1_ptr, slot_sqrt_bias_correction2_ptr, slot_eps_ptr,
    n_elements, n_cols,
    beta1, one_minus_beta1, beta2, one_minus_beta2, eps, bias_correction1, sqrt_bias_correction2,
    HAS_REMAP: tl.constexpr, PER_SLOT: tl.constexpr, SLOTS_ARE_COLUMNS: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    offsets = tl.program_id(0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    in_bounds = offsets < n_elements
    # The slot of each element (dead code, removed by the compiler, on the plain scalar path).
    row = offsets // n_cols
    col = offsets % n_cols
    slot = col if SLOTS_ARE_COLUMNS else row
    grad = tl.load(grad_ptr + offsets, mask=in_bounds).to(tl.float32)
    if HAS_REMAP:
        source = tl.load(source_slots_ptr + slot, mask=in_bounds, other=-1)
        if SLOTS_ARE_COLUMNS:
            source_offsets = row * n_cols + source
        else:
            source_offsets = source * n_cols + col
        kept = in_bounds & (source >= 0)
        exp_avg = tl.load(exp_avg_in_ptr + source_offsets, mask=kept, other=0.0).to(tl.float32)
        exp_avg_sq = tl.load(exp_avg_sq_in_ptr + source_offsets, mask=kept, other=0.0).to(tl.float32)
    else:
        exp_avg = tl.load(exp_avg_in_ptr + offsets, mask=in_bounds).to(tl.float32)
        exp_avg_sq = tl.load(exp_avg_sq_in_ptr + offsets, mask=in_bounds).to(tl.float32)
    if PER_SLOT:
        # NOTE: out-of-bounds lanes read 1 for every correction (ε included) so that they never
        # divide by 0 (their m, v are undefined); nothing of theirs is stored.
        bias_correction1 = tl.load(slot_bias_correction1_ptr + slot, mask=in_bounds, other=1.0)
        sqrt_bias_correction2 = tl.load(slot_sqrt_bias_correction2_ptr + slot, mask=in_bounds, other=1.0)
        eps = tl.load(slot_eps_ptr + slot, mask=in_bounds, other=1.0)

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


def _slot_vector(name: str, value: float | torch.Tensor, shape: torch.Size, dim: int,
                 device: torch.device) -> torch.Tensor:
    """``value`` as a contiguous fp32 vector of one value per slot: a number is repeated; a tensor
    must broadcast against the moments (``shape``) along their slot dimension only (``(1, r)``
    or ``(r,)`` when slots are columns, ``(r, 1)`` when they are rows, or a single value)."""
    n_slots = shape[dim]
    if not isinstance(value, torch.Tensor):
        return torch.full((n_slots,), value, dtype=torch.float32, device=device)
    slot_shape = (1, n_slots) if dim == 1 else (n_slots, 1)
    aligned = zip(reversed(value.shape), reversed(slot_shape))
    if value.ndim > 2 or any(size not in (1, target) for size, target in aligned):
        raise ValueError(f"per-slot {name} of shape {tuple(value.shape)} does not broadcast along the {n_slots} "
                         f"slots (dim {dim}) of moments of shape {tuple(shape)}")
    # NOTE: per-slot corrections are fp32, as the library computes them (fp64 ones are rounded).
    # The result may be a view of ``value``: read it only.
    return value.to(device=device, dtype=torch.float32).expand(slot_shape).reshape(n_slots).contiguous()


def adam_moment_update_triton(
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    beta1: float,
    beta2: float,
    eps: float | torch.Tensor,
    bias_correction1: float | torch.Tensor,
    bias_correction2: float | torch.Tensor,
    source_slots: torch.Tensor | None = None,
    layout: str = "columns",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(N, m, v)``: the normalized update and the updated moments.

    Without ``source_slots`` the moments are updated in place and returned as they are; with them
    (int64, one source slot or −1 per slot of the 2-D moments in ``layout``, ``"columns"`` or
    ``"rows"``, :mod:`.layout`) the moments are remapped on the fly and new tensors returned. When
    any of ``eps``, ``bias_correction1``, ``bias_correction2`` is a tensor, all three are read per
    slot (numbers then apply to every slot; shapes in :func:`_slot_vector`); otherwise they are
    runtime scalars. ``"flat"`` moments take neither.
    """
    if exp_avg.shape != grad.shape or exp_avg_sq.shape != grad.shape:
        raise ValueError(f"moment shapes {tuple(exp_avg.shape)}, {tuple(exp_avg_sq.shape)} "
                         f"do not match the gradient's {tuple(grad.shape)}")
    if not (exp_avg.is_contiguous() and exp_avg_sq.is_contiguous()):
        raise ValueError("the moments must be contiguous (they are updated in place)")
    check_launchable(grad, exp_avg, exp_avg_sq)
    grad = grad.contiguous()
    has_remap = source_slots is not None
    per_slot = any(isinstance(value, torch.Tensor) for value in (eps, bias_correction1, bias_correction2))
    dim = slot_dim(layout)
    if (has_remap or per_slot) and (grad.ndim != 2 or dim is None):
        raise ValueError(f"slot remaps and per-slot corrections need 2-D moments in the 'columns' or 'rows' "
                         f"layout, got moments of shape {tuple(grad.shape)} in the {layout!r} layout")
    if has_remap:
        if source_slots.shape != (grad.shape[dim],):
            raise ValueError(f"source_slots of shape {tuple(source_slots.shape)} do not index dim {dim} "
                             f"of moments of shape {tuple(grad.shape)}")
        exp_avg_out, exp_avg_sq_out = torch.empty_like(exp_avg), torch.empty_like(exp_avg_sq)
    else:
        exp_avg_out, exp_avg_sq_out = exp_avg, exp_avg_sq
    if per_slot:
        slot_vectors = [_slot_vector("bias_correction1", bias_correction1, grad.shape, dim, grad.device),
                        _slot_vector("bias_correction2", bias_correction2, grad.shape, dim, grad.device).sqrt(),
                        _slot_vector("eps", eps, grad.shape, dim, grad.device)]
        scalars = (0.0, 1.0, 1.0)                      # unread: the kernel loads the vectors
    else:
        slot_vectors = [grad] * 3                      # unread placeholders
        scalars = (eps, bias_correction1, math.sqrt(bias_correction2))
    update = torch.empty_like(exp_avg)
    n_elements = grad.numel()
    if n_elements == 0:
        return update, exp_avg_out, exp_avg_sq_out
    n_cols = grad.shape[-1] if grad.ndim else 1

    def grid(meta):
        return (triton.cdiv(n_elements, meta["BLOCK_SIZE"]),)

    _adam_moment_kernel[grid](
        grad, exp_avg, exp_avg_sq, exp_avg_out, exp_avg_sq_out, update,
        source_slots if has_remap else grad, *slot_vectors, n_elements, n_cols,
        beta1, 1.0 - beta1, beta2, 1.0 - beta2, *scalars,
        HAS_REMAP=has_remap, PER_SLOT=per_slot, SLOTS_ARE_COLUMNS=dim == 1,
    )
    return update, exp_avg_out, exp_avg_sq_out
