"""``GaLoreAdamW``: a drop-in replacement for ``galore_torch.GaLoreAdamW``.

Same constructor (``lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, correct_bias=True``),
same param-group keys (a group with ``rank`` is projected; ``update_proj_gap``, ``scale``,
``proj_type`` in ``std``/``reverse_std``/``left``/``right``), same numerics: Hugging Face AdamW
(``denom = √v + ε``, step size ``η·√(1−β2^t)/(1−β1^t)``, decay ``W ← W − ηλW`` after the update),
SVD projection refreshed when ``step % update_proj_gap == 0`` (step counted from 0 before the
increment), back-projection multiplied by ``scale``. Migration::

    - from galore_torch import GaLoreAdamW
    + from lowrank_optim import GaLoreAdamW

Beyond ``galore_torch``: optimizer state is tensors only (``torch.load(weights_only=True)``
works, so training resumes); 1-D parameters inside a ``rank`` group get plain AdamW instead of
crashing; the SVD always runs in fp32; a failed SVD or a non-finite gradient at a refresh raises
an error naming the parameter and leaves every parameter and state untouched; ``moments``
(``keep``/``reset``/``transport``), ``moments_dtype`` (e.g. fp32 moments for bf16 weights) and
``backend`` (``"auto"``: fused Triton moment update and back-projection + weight update for
fp32/bf16/fp16 CUDA parameters when ``triton`` imports, else PyTorch; ``"torch"``; ``"triton"``,
which on CPU tensors needs ``TRITON_INTERPRET=1``; the SVD is PyTorch's on every backend) are
available per group.
Defaults for keys ``galore_torch`` requires in a ``rank`` group: ``update_proj_gap=200``,
``scale=1.0``, ``proj_type="std"``.
"""
from __future__ import annotations

import torch

from .adam_form import AdamForm
from .engine import ProjectedAdamW
from .rank import check_rank, resolve_rank
from .registry import register_optimizer
from .validation import check_choice

GALORE_PROJ_TYPES = ("std", "reverse_std", "left", "right")


class GaLoreAdamW(ProjectedAdamW):
    adam_form = AdamForm.HF
    side_key = "proj_type"

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0, correct_bias: bool = True,
                 no_deprecation_warning: bool = False, *, update_proj_gap: int = 200,
                 scale: float = 1.0, proj_type: str = "std", moments: str = "keep",
                 bias_correction: str = "step", residual: str = "none", moments_dtype: torch.dtype | None = None,
                 backend: str = "auto",
                 skip_nonfinite: bool = False):
        # ``no_deprecation_warning`` is accepted for signature compatibility; nothing is deprecated.
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        correct_bias=correct_bias, update_proj_gap=update_proj_gap, scale=scale,
                        proj_type=proj_type, moments=moments, moments_dtype=moments_dtype,
                        bias_correction=bias_correction, residual=residual, backend=backend,
                        projection="svd")
        super().__init__(params, defaults, skip_nonfinite=skip_nonfinite)

    def _validate_group(self, group: dict) -> None:
        check_rank(group.get("rank"), allow_fraction=False)
        check_choice("proj_type", group["proj_type"], GALORE_PROJ_TYPES)
        check_choice("projection", group["projection"], ("svd",))
        if not isinstance(group["correct_bias"], bool):
            raise ValueError(f"Invalid correct_bias: {group['correct_bias']!r} (expected a bool)")

    def _projection_rank(self, group: dict, param: torch.Tensor, name: str | None) -> int | None:
        if group.get("rank") is None or param.ndim != 2:
            return None
        return resolve_rank(group["rank"], param.shape)


register_optimizer("galore_adamw", GaLoreAdamW)
