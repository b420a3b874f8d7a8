"""What ``param.grad`` holds once the backward pass has projected or stepped the parameter.

Every way of clipping reads ``param.grad``: ``torch.nn.utils.clip_grad_norm_`` by whatever
reference, ``get_total_norm`` + ``clip_grads_with_norm_``, accelerate's
``Accelerator.clip_grad_norm_`` and Hugging Face Trainer's ``max_grad_norm``. A freed gradient
(``None``) is skipped by all of them: they would return a norm that leaves the projected weights
out and clip them not at all (GaLore's "grad norm 0"). So the in-backward modes leave a *stand-in*
in ``param.grad``: a tensor of the parameter's shape, dtype and device that owns no storage of
that size and answers the few operations gradient code uses; any other operation raises an error
naming the parameter and the mode. No torch function is patched: the stand-ins exist only on the
optimizer's own parameters, and only until :meth:`step` or ``zero_grad``.

* :class:`ProjectedGradient` (``backward_projection=True``) *is* the projected gradient
  ``Ĝ = R·Pᵀ`` (or ``P·R``) in factored form: it owns the accumulator ``R`` (``m×r`` or
  ``r×n``). ``P`` has orthonormal columns, so ``‖Ĝ‖₂ = ‖R‖₂``: a norm is ``R``'s, scaling scales
  ``R``, and every route above clips by the norm the optimizer uses, as
  :func:`lowrank_optim.clip_grad_norm_` does. The autograd engine's accumulation into an existing
  gradient (``grad += G`` at the next micro-batch) projects ``G`` into ``R``; zeroing zeroes ``R``.
  With ``process_group``, the optimizer averages ``R`` across ranks inside :meth:`step`, so a norm
  taken before is refused (clip with :func:`lowrank_optim.clip_grad_norm_`).
* :class:`SteppedGradient` (``step_in_backward=True``) stands for a gradient the parameter's step
  already used inside the backward pass. Its 2-norm is the one of what that step used (recorded
  then: logging a gradient norm works); scaling it (clipping) raises, since nothing is left to
  clip; zeroing does nothing.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils._pytree import tree_leaves

aten = torch.ops.aten

CLIP_HINT = ("clip with lowrank_optim.clip_grad_norm_(optimizer, max_norm) (Hugging Face Trainer: "
             "max_grad_norm=0 and lowrank_optim.integrations.transformers.ClipInOptimizerCallback)")


class GradientStandIn(torch.Tensor):
    """A storage-less tensor with its parameter's metadata; subclasses say what each supported
    operation means (:meth:`norm_of`, :meth:`scale_`, :meth:`accumulate_`, :meth:`zero_in_place`)
    and what the mode is (:meth:`refusal`)."""

    label: str

    @staticmethod
    def __new__(cls, param: torch.Tensor, label: str):
        stand_in = torch.Tensor._make_wrapper_subclass(cls, param.shape, dtype=param.dtype, device=param.device)
        stand_in.label = label
        return stand_in

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.label})"

    def refusal(self, operation: str) -> str:
        raise NotImplementedError

    def norm_of(self, ord: float) -> torch.Tensor:
        raise RuntimeError(self.refusal("a norm"))

    def scale_(self, factor) -> None:
        raise RuntimeError(self.refusal("scaling (gradient clipping)"))

    def accumulate_(self, grad: torch.Tensor) -> None:
        raise RuntimeError(self.refusal("accumulating another gradient"))

    def zero_in_place(self) -> None:
        raise RuntimeError(self.refusal("zeroing"))

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is aten._foreach_norm.Scalar:
            ord = args[1] if len(args) > 1 else kwargs.get("ord", 2)
            return [torch.linalg.vector_norm(t, ord, dtype=kwargs.get("dtype")) for t in args[0]]
        if func in (aten._foreach_mul_.Tensor, aten._foreach_mul_.Scalar):
            for tensor in args[0]:
                tensor.mul_(args[1])
            return None
        if func is aten._foreach_zero_.default:
            for tensor in args[0]:
                tensor.zero_()
            return None
        stand_in = args[0]
        if not isinstance(stand_in, GradientStandIn):          # a stand-in as another operand: refused
            stand_in = next(leaf for leaf in tree_leaves((args, kwargs)) if isinstance(leaf, GradientStandIn))
            raise RuntimeError(stand_in.refusal(str(func)))
        if func is aten.linalg_vector_norm.default:
            ord = args[1] if len(args) > 1 else kwargs.get("ord", 2)
            dim = args[2] if len(args) > 2 else kwargs.get("dim")
            keepdim = args[3] if len(args) > 3 else kwargs.get("keepdim", False)
            if dim is not None or keepdim:
                raise RuntimeError(stand_in.refusal(f"a norm along dim={dim!r}"))
            norm = stand_in.norm_of(float(ord))
            return norm if kwargs.get("dtype") is None else norm.to(kwargs["dtype"])
        if func in (aten.mul_.Tensor, aten.mul_.Scalar):
            stand_in.scale_(args[1])
            return stand_in
        if func is aten.add_.Tensor and kwargs.get("alpha", 1) == 1 and isinstance(args[1], torch.Tensor):
            stand_in.accumulate_(args[1])
            return stand_in
        if func is aten.zero_.default:
            stand_in.zero_in_place()
            return stand_in
        raise RuntimeError(stand_in.refusal(str(func)))


class ProjectedGradient(GradientStandIn):
    """``param.grad`` under ``backward_projection=True``: the accumulator ``low_rank`` (``R``) of
    the gradients projected so far in this step, and ``project`` (``G ↦ G·P`` or ``Pᵀ·G``) for
    the next micro-batch's gradient (module doc)."""

    low_rank: torch.Tensor
    project: Callable[[torch.Tensor], torch.Tensor]
    averaged_in_step: bool

    @staticmethod
    def __new__(cls, param: torch.Tensor, label: str, low_rank: torch.Tensor,
                project: Callable[[torch.Tensor], torch.Tensor], averaged_in_step: bool = False):
        stand_in = GradientStandIn.__new__(cls, param, label)
        stand_in.low_rank, stand_in.project, stand_in.averaged_in_step = low_rank, project, averaged_in_step
        return stand_in

    def refusal(self, operation: str) -> str:
        return (f"{self.label}: its gradient was projected in the backward pass (backward_projection=True) and "
                f"exists only as the optimizer's low-rank accumulator, which supports norms, scaling, accumulation "
                f"and zeroing; {operation} is not available")

    def _check_averaged(self) -> None:
        if self.averaged_in_step:
            raise RuntimeError(f"{self.label}: with backward_projection=True and process_group=..., the optimizer "
                               f"averages the gradients across ranks inside step(), so a norm taken before is this "
                               f"rank's alone; {CLIP_HINT}")

    def norm_of(self, ord: float) -> torch.Tensor:
        self._check_averaged()
        return torch.linalg.vector_norm(self.low_rank, ord)

    def scale_(self, factor) -> None:
        self._check_averaged()
        self.low_rank.mul_(factor)

    def accumulate_(self, grad: torch.Tensor) -> None:
        self.low_rank.add_(self.project(grad))

    def zero_in_place(self) -> None:
        self.low_rank.zero_()


class SteppedGradient(GradientStandIn):
    """``param.grad`` under ``step_in_backward=True`` between the parameter's step in its hook
    and :meth:`step`: ``norm`` is the 2-norm of the gradient that step used (module doc)."""

    norm: torch.Tensor
    accumulation_steps: int

    @staticmethod
    def __new__(cls, param: torch.Tensor, label: str, norm: torch.Tensor, accumulation_steps: int):
        stand_in = GradientStandIn.__new__(cls, param, label)
        stand_in.norm, stand_in.accumulation_steps = norm, accumulation_steps
        return stand_in

    def refusal(self, operation: str) -> str:
        return (f"{self.label}: this parameter already took its step inside the backward pass (step_in_backward=True), "
                f"so its gradient is gone and nothing is left to clip; {operation} is not available. Train without "
                f"clipping, or use backward_projection=True without step_in_backward and clip as usual")

    def norm_of(self, ord: float) -> torch.Tensor:
        if ord != 2.0:
            raise RuntimeError(self.refusal(f"a norm of order {ord:g} (only the 2-norm was recorded)"))
        return self.norm

    def accumulate_(self, grad: torch.Tensor) -> None:
        raise RuntimeError(f"{self.label}: a backward pass after this parameter took its step (accumulation_steps="
                           f"{self.accumulation_steps}) and before optimizer.step(); call step() after every "
                           f"{self.accumulation_steps} backward pass(es)")

    def zero_in_place(self) -> None:
        """Nothing to zero: the gradient was used and freed by the step."""
