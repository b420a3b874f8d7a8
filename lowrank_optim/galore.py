"""``GaLoreAdamW``: a drop-in replacement for ``galore_torch.GaLoreAdamW``."""
from __future__ import annotations

import torch

from .adam_form import AdamForm
from .engine import ProjectedAdamW
from .projectors import projectors_of
from .quantization import MIN_QUANTIZED_NUMEL
from .rank import check_rank, resolve_rank
from .registry import register_optimizer
from .validation import InvalidHyperparameter, check_bool, check_choice

GALORE_PROJ_TYPES = ("std", "reverse_std", "left", "right")


class GaLoreAdamW(ProjectedAdamW):
    r"""GaLore (arXiv 2403.03507): AdamW on gradients projected onto their top singular vectors.

    Same constructor, param-group keys and numerics as ``galore_torch.GaLoreAdamW`` 1.0; the
    trajectory agrees with it step by step (tested). Migration::

        - from galore_torch import GaLoreAdamW
        + from lowrank_optim import GaLoreAdamW

    A param group with a ``rank`` key is projected (its 2-D parameters; 1-D ones get AdamW instead
    of crashing); every other parameter gets plain AdamW in the same (Hugging Face) form.
    ``lowrank_param_groups(model, target_modules=("attn", "mlp"), rank=128)`` builds GaLore's groups.
    So ``GaLoreAdamW(model.parameters())`` is plain AdamW (with a warning), unlike
    ``DCTProjAdam(model.parameters())``, which projects by a default rule: a drop-in for
    ``galore_torch`` must project exactly the groups ``galore_torch`` would. A weight whose projected
    state would not be smaller than AdamW's (rank near its smaller side) stays plain, with a
    warning naming it and a note in :meth:`projection_summary`.

    .. math::
        \begin{aligned}
        &\textbf{input}: \eta \text{ (lr)}, \beta_1, \beta_2, \epsilon, \lambda \text{ (weight decay)},
            \alpha \text{ (scale)}, r \text{ (rank)}, T \text{ (update\_proj\_gap)} \\
        &\textbf{for } t = 1, 2, \dots \textbf{ and each projected } W \in \mathbb{R}^{m\times n},\ m \ge n
            \text{ (proj\_type="std"; else the left-side form)}: \\
        &\quad G \leftarrow \nabla_W f_t(W) \\
        &\quad \textbf{if } (t-1) \bmod T = 0: \quad U \Sigma V^\top = \operatorname{svd}(G),\;
            P \leftarrow V_{:, :r} \quad \text{(fp32; moments kept as they are)} \\
        &\quad R \leftarrow G\,P \\
        &\quad m \leftarrow \beta_1 m + (1-\beta_1) R, \quad v \leftarrow \beta_2 v + (1-\beta_2) R^2 \\
        &\quad W \leftarrow W - \eta\,\alpha\,\frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}\,
            \frac{m}{\sqrt{v} + \epsilon}\,P^\top \\
        &\quad W \leftarrow W - \eta\lambda\, W \qquad \text{(decay after the update, Hugging Face form)}
        \end{aligned}

    Args:
        params: parameters, named parameters, param groups or the model itself (its named
            parameters); a group with ``rank`` (an int) is
            projected. Group keys: the keywords below except ``skip_nonfinite``, plus ``rank``;
            unknown keys are refused.
        lr, betas, eps, weight_decay, correct_bias: ``galore_torch``'s; defaults 1e-3,
            (0.9, 0.999), 1e-6, 0.0, True.
        no_deprecation_warning: accepted for signature compatibility; nothing is deprecated.
        update_proj_gap, scale, proj_type: ``galore_torch``'s group keys and defaults: 200, 1.0,
            ``"std"`` (the smaller side; ``"reverse_std"``, ``"left"``, ``"right"``). (Hugging
            Face's ``optim="galore_adamw"`` uses scale 0.25.)
        projector (str, default "svd"): ``"svd"``, a full thin SVD in fp32; ``"randomized_svd"``,
            a randomized range finder with power iterations (GaLore 2, arXiv 2504.20437;
            :mod:`lowrank_optim.projectors.randomized_svd`): several times cheaper refreshes.
        moments (str, default "keep"): ``"keep"`` (GaLore's), ``"reset"``, or ``"transport"``
            (``m`` rotated by ``P_newᵀP_old``, ``v`` by its element-wise square).
        residual, update_rule, bias_correction, moments_dtype, moment_bits, moment_block_size: as in
            :class:`~lowrank_optim.DCTProjAdam`; defaults ``"none"``, ``"adamw"``, ``"step"``, None,
            None (float; 8 or 4), None.
        bf16_stochastic_round, backend: as in :class:`~lowrank_optim.DCTProjAdam`; defaults False,
            ``"auto"``.
        foreach, maximize, capturable, differentiable, fused: torch's keywords (``foreach``: bool
            or None; ``capturable`` and ``differentiable``: False only; ``fused``: None or False only).
        backward_projection, step_in_backward, accumulation_steps, process_group: as in
            :class:`~lowrank_optim.DCTProjAdam` (:mod:`lowrank_optim.backward_projection`).
        skip_nonfinite (bool, default False): skip a step with an inf/nan gradient.

    Beyond ``galore_torch``: state made of tensors only (``torch.load(weights_only=True)``
    works, so training resumes); the SVD always runs in fp32; a failed SVD or a non-finite
    gradient at a refresh raises an error naming the parameter and leaves everything untouched;
    ``torch.compile(opt.step)`` gives the eager trajectory; FSDP2 (the gradient is all-gathered
    for the SVD at refreshes, :mod:`lowrank_optim.sharding`).
    """

    adam_form = AdamForm.HF
    side_key = "proj_type"
    group_only_keys = ("rank",)

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0, correct_bias: bool = True,
                 no_deprecation_warning: bool = False, *, update_proj_gap: int = 200,
                 scale: float = 1.0, proj_type: str = "std", projector: str = "svd", moments: str = "keep",
                 bias_correction: str = "step", residual: str = "none",
                 update_rule: str = "adamw", moments_dtype: torch.dtype | None = None,
                 moment_bits: int | None = None, moment_block_size: int | None = None,
                 bf16_stochastic_round: bool = False,
                 backend: str = "auto", foreach: bool | None = None, maximize: bool = False,
                 capturable: bool = False, differentiable: bool = False, fused: bool | None = None,
                 backward_projection: bool = False, step_in_backward: bool = False, accumulation_steps: int = 1,
                 process_group=None, skip_nonfinite: bool = False):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        correct_bias=correct_bias, update_proj_gap=update_proj_gap, scale=scale,
                        proj_type=proj_type, projector=projector, moments=moments, moments_dtype=moments_dtype,
                        bias_correction=bias_correction, residual=residual, update_rule=update_rule,
                        backend=backend,
                        moment_bits=moment_bits, moment_block_size=moment_block_size,
                        bf16_stochastic_round=bf16_stochastic_round)
        super().__init__(params, defaults, skip_nonfinite=skip_nonfinite, foreach=foreach, maximize=maximize,
                         capturable=capturable, differentiable=differentiable, fused=fused,
                         backward_projection=backward_projection, step_in_backward=step_in_backward,
                         accumulation_steps=accumulation_steps, process_group=process_group)

    def _validate_group(self, group: dict) -> None:
        check_rank(group.get("rank"), allow_fraction=False)
        check_choice("proj_type", group["proj_type"], GALORE_PROJ_TYPES)
        check_choice("projector", group["projector"], projectors_of("svd"))
        check_bool("correct_bias", group["correct_bias"])

    def _projection_rank(self, group: dict, param: torch.Tensor, rank_given: bool, vocabulary: bool) -> int | None:
        if group.get("rank") is None or param.ndim != 2:
            return None
        return resolve_rank(group["rank"], param.shape)

    def _projector_name(self, group: dict) -> str:
        return group["projector"]

    def _nothing_projected_warning(self) -> str:
        return ("no param group has a rank, so every parameter gets plain AdamW. Project GaLore's targets "
                "with lowrank_param_groups(model, target_modules=('attn', 'mlp'), rank=128)")


register_optimizer("galore_adamw", GaLoreAdamW)


class GaLoreAdamW8bit(GaLoreAdamW):
    """``galore_torch.GaLoreAdamW8bit``'s replacement: :class:`GaLoreAdamW` with 8-bit moments.

    Same constructor and defaults as ``galore_torch``'s (``lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
    weight_decay=1e-2``; ``min_8bit_size=4096``), so swapping the import works::

        - from galore_torch import GaLoreAdamW8bit
        + from lowrank_optim import GaLoreAdamW8bit

    The moments of projected and plain parameters are stored in 8 bits with this library's
    block-wise scheme (:mod:`lowrank_optim.quantization`, ``moment_bits=8``) instead of
    bitsandbytes' kernels; the arithmetic is :class:`GaLoreAdamW`'s (Hugging Face AdamW form,
    weight decay after the update). bitsandbytes' keywords are accepted with the values that mean
    what this optimizer does (``amsgrad=False``, ``optim_bits`` 32 or 8, ``min_8bit_size=4096``,
    ``percentile_clipping=100``, ``block_wise=True``, ``is_paged=False``, ``args=None``); any other
    value is a ``ValueError``. Every :class:`GaLoreAdamW` keyword is available after them.
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False, optim_bits: int = 32, args=None,
                 min_8bit_size: int = 4096, percentile_clipping: int = 100, block_wise: bool = True,
                 is_paged: bool = False, **kwargs):
        accepted = dict(amsgrad=(amsgrad, (False,)), optim_bits=(optim_bits, (32, 8)), args=(args, (None,)),
                        min_8bit_size=(min_8bit_size, (MIN_QUANTIZED_NUMEL,)),
                        percentile_clipping=(percentile_clipping, (100,)), block_wise=(block_wise, (True,)),
                        is_paged=(is_paged, (False,)))
        for name, (value, choices) in accepted.items():
            if value not in choices or isinstance(value, bool) != isinstance(choices[0], bool):
                raise InvalidHyperparameter(name, value, f"Invalid {name}: {value!r} (GaLoreAdamW8bit supports only "
                                            f"{' or '.join(map(repr, choices))})")
        kwargs.setdefault("moment_bits", 8)
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **kwargs)


register_optimizer("galore_adamw8bit", GaLoreAdamW8bit)
