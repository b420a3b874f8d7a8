"""``DCTProjAdam`` (alias ``DCTAdamW``): SVD-free projected AdamW on a fixed DCT basis."""
from __future__ import annotations

import torch

from .adam_form import AdamForm
from .engine import ProjectedAdamW
from .projectors import PROJECTORS
from .rank import check_rank, default_rule_rank
from .registry import register_optimizer
from .selection import NOTHING_PROJECTED_BY_DEFAULT
from .validation import check_choice

PROJ_SIDES = ("auto", "reverse_std", "left", "right")


class DCTProjAdam(ProjectedAdamW):
    r"""AdamW whose moments live in a subspace spanned by ``r`` columns of a fixed DCT basis.

    ``opt = DCTProjAdam(model.parameters())`` works as is. Each projected ``m×n`` weight keeps its
    Adam moments in an ``m×r`` (or ``r×n``) subspace spanned by ``r`` columns of the orthonormal
    DCT-II matrix ``C`` of the compressed side, re-selected every ``update_proj_gap`` steps by
    their alignment with the gradient (arXiv 2505.17967; :mod:`lowrank_optim.projectors.dct`). The
    only projection state per layer is the ``r`` selected indices; ``C`` is shared by all layers of
    one size. Everything not projected gets plain ``torch.optim.AdamW`` in the same optimizer.

    .. math::
        \begin{aligned}
        &\textbf{input}: \eta \text{ (lr)}, \beta_1, \beta_2, \epsilon, \lambda \text{ (weight decay)},
            \alpha \text{ (scale)}, r \text{ (rank)}, T \text{ (update\_proj\_gap)} \\
        &\textbf{for } t = 1, 2, \dots \textbf{ and each projected } W \in \mathbb{R}^{m\times n},\ m \ge n
            \text{ (else the transposed, left-side form)}: \\
        &\quad G \leftarrow \nabla_W f_t(W) \\
        &\quad \textbf{if } (t-1) \bmod T = 0: \quad S = G\,C,\;
            \mathrm{idx} \leftarrow \operatorname{top}_r\ \lVert S_{:,j} \rVert_2,\;
            P \leftarrow C_{:,\mathrm{idx}} \quad \text{(moments of kept columns move to their new slots)} \\
        &\quad R \leftarrow G\,P \\
        &\quad m \leftarrow \beta_1 m + (1-\beta_1) R, \quad v \leftarrow \beta_2 v + (1-\beta_2) R^2 \\
        &\quad N \leftarrow \dfrac{m/(1-\beta_1^t)}{\sqrt{v/(1-\beta_2^t)} + \epsilon} \\
        &\quad \Delta \leftarrow N P^\top + c\,\varphi \circ (G - R P^\top)
            \quad \text{(scaled residual, } \varphi_i = \lVert N_i\rVert / \lVert R_i\rVert \text{)} \\
        &\quad W \leftarrow (1 - \eta\lambda)\, W - \eta\,\alpha\,\Delta
        \end{aligned}

    Which parameters are projected (:mod:`lowrank_optim.selection`): in a group without its own
    ``rank`` (``model.parameters()``, ``model.named_parameters()``), every 2-D parameter whose
    smaller side exceeds its rank except the embedding tables (token embedding and output head,
    position and token-type embeddings: by name when names are given, by the structure of the
    parameter list otherwise; a warning names any shape the rule cannot tell; ``DCTProjAdam(model)``:
    every parameter of an ``nn.Embedding`` too). A group carrying
    its own ``rank`` projects every 2-D parameter in it (rank clamped to the smaller side);
    ``rank=None`` projects nothing. Either way a weight whose projected state would not be smaller
    than AdamW's stays plain (for an explicit rank with a warning naming it).
    :meth:`projection_summary` shows the outcome and why. (:class:`GaLoreAdamW` projects only
    groups with a ``rank``, as ``galore_torch`` does: the difference is its drop-in contract.)

    Args:
        params: parameters, named parameters, param groups, or the model itself (its named
            parameters, with its ``nn.Embedding`` tables known as such). Every keyword below except
            ``skip_nonfinite`` may be overridden per group; unknown group keys are refused.
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW`` (decay decoupled, before the update);
            defaults 1e-3, (0.9, 0.999), 1e-8, 0.0.
        rank (int | float | None, default 0.25): an int, or a fraction of the smaller side.
        update_proj_gap (int, default 200): steps between subspace refreshes.
        scale (float, default 1.0): GaLore's ``α``, multiplying the update of projected weights.
        score (str, default "l2"): column score ``‖S[:, j]‖_2`` (minimises the projection error
            among column subsets) or ``"l1"`` (the paper's).
        moments (str, default "transport"): on a refresh, ``"transport"`` moves the moments of
            columns still selected to their new slots (exact; new columns start at zero);
            ``"keep"`` leaves slot ``i`` as it is while it now holds the new ``i``-th column;
            ``"reset"`` zeroes them.
        residual (str, default "scaled"): ``"scaled"`` adds the gradient outside the subspace back,
            Adam-scaled, with Fira's growth limiter (arXiv 2410.01623,
            :mod:`lowrank_optim.residual`; one scalar of state per weight); ``"none"``: the paper's.
        update_rule (str, default "adamw"): what a projected weight does with ``R`` and its moments,
            by name in :data:`lowrank_optim.rules.RULES` (:mod:`lowrank_optim.rules`).
        bias_correction (str, default "step"): Adam's per-parameter count, or ``"slot"``: each slot
            counts from when its moments last started at zero.
        proj_side (str, default "auto"): ``"auto"`` compresses the smaller side; ``"reverse_std"``
            the larger one (moments of ``r·min(m, n)`` values, 0.36 instead of 0.57 B/param at 7B
            with 8-bit moments; measured: −0.8% validation loss on llama_tiny, +9.8% on the 3.3M
            llama_small, so not the default); ``"left"``, ``"right"``.
        transform (str, default "auto"): how ``S`` is formed on the PyTorch path: FFT on CPU, GEMM
            on GPU; ``"fft"``; ``"matmul"``.
        basis (str, default "cached"): ``"cached"`` keeps ``C`` (``k×k``) per compressed size and
            dtype used, shared by every layer of that size (LLaMA-7B, bf16 weights, 8-bit moments:
            a bf16 and an fp32 ``C`` of 4096, 0.015 B/param); ``"generated"``
            keeps none and computes the ``r`` selected columns at each use and the refresh scores
            over blocks of columns (same values; on GPU the projection is then a dense GEMM rather than
            the column-gathering kernel; :mod:`lowrank_optim.projectors.dct`).
        moments_dtype (torch.dtype | None, default None): the parameter's dtype, or e.g.
            ``torch.float32`` for fp32 moments of bf16 weights.
        moment_bits (int | None, default None): ``8`` or ``4`` stores both moments block-wise
            quantized (codes plus one fp32 scale per block of 256/128 values along the rank slots;
            :mod:`lowrank_optim.quantization`), projected and plain parameters alike; tensors under
            4096 values stay in float. ``None``: float moments in ``moments_dtype``.
        moment_block_size (int | None, default None): values per scale of quantized moments, a
            power of two from 8 to 4096 (None: 256 at 8 bits, 128 at 4, torchao's). Larger blocks
            spend fewer bytes on scales (4/B per value) and resolve outliers worse.
        bf16_stochastic_round (bool, default False): add the update to bf16 weights with unbiased
            stochastic rounding (updates below half an ulp are not lost). The weight update then runs
            on PyTorch (the moments on the resolved backend); with ``backend="triton"`` a bf16
            parameter is refused, since the fused weight update rounds to nearest.
        backend (str, default "auto"): ``"auto"`` runs the fused Triton kernels for fp32/bf16/fp16
            CUDA parameters when ``triton`` imports, else PyTorch; ``"torch"``; ``"triton"``
            (an error where the kernels cannot run; CPU tensors need ``TRITON_INTERPRET=1``).
        foreach (bool | None, default None): multi-tensor plain AdamW (None and True) or one tensor
            at a time (False).
        maximize (bool, default False): maximize the objective.
        capturable, differentiable (False only), fused (None or False only): torch's keywords;
            a ``True`` the optimizer cannot honour raises ``ValueError``.
        backward_projection (bool, default False): project each projected weight's gradient inside
            the backward pass into an ``m×r``/``r×n`` accumulator, held in ``.grad`` by a
            :class:`~lowrank_optim.gradient_stand_ins.ProjectedGradient` (exact accumulation; every
            clipping route clips by its norm; :mod:`lowrank_optim.backward_projection`).
        step_in_backward (bool, default False): backward projection, and every parameter's whole
            step taken in its hook at the window's last backward pass: no gradient outlives the
            backward pass; no global-norm clipping (:mod:`lowrank_optim.backward_projection`).
        accumulation_steps (int, default 1): backward passes per step under ``step_in_backward``.
        process_group (default None): under backward projection, the group the optimizer
            all-reduces projected and plain gradients over itself (instead of a DDP wrapper).
        skip_nonfinite (bool, default False): skip a step whose gradients hold inf/nan (counted
            in ``skipped_steps``) instead of raising at a refresh.

    Defaults chosen by measurement (``score="l2"``, ``moments="transport"``, ``residual="scaled"``),
    on a byte-level tiny LLaMA (4 layers, width 128, rank 32, gap 50, α 0.25, lr 0.01, 300 steps;
    final validation loss, GaLoreAdamW at the same rank 1.890): the paper's plain method (l1/keep)
    1.975 (+4.5%), l2/keep 1.960, l2/transport 1.941, l2/reset 1.973, per-slot bias correction
    2.004, l2/transport + residual **1.861 (−1.5%)**. The README's results section has the table.

    ``torch.compile(opt.step)`` gives the eager trajectory (the step's bookkeeping runs eagerly,
    the tensor math is compiled; :mod:`lowrank_optim.engine`). Under FSDP2 each rank scores the
    columns on its own shard and one all-reduce of the scores per refresh gives every rank the
    same indices (:mod:`lowrank_optim.sharding`).
    """

    adam_form = AdamForm.TORCH
    side_key = "proj_side"

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, *, rank: int | float | None = 0.25,
                 update_proj_gap: int = 200, scale: float = 1.0, score: str = "l2",
                 moments: str = "transport", proj_side: str = "auto", transform: str = "auto", basis: str = "cached",
                 bias_correction: str = "step", residual: str = "scaled",
                 update_rule: str = "adamw", moments_dtype: torch.dtype | None = None,
                 moment_bits: int | None = None, moment_block_size: int | None = None,
                 bf16_stochastic_round: bool = False,
                 backend: str = "auto", foreach: bool | None = None, maximize: bool = False,
                 capturable: bool = False, differentiable: bool = False, fused: bool | None = None,
                 backward_projection: bool = False, step_in_backward: bool = False, accumulation_steps: int = 1,
                 process_group=None, skip_nonfinite: bool = False):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rank=rank,
                        update_proj_gap=update_proj_gap, scale=scale, score=score, moments=moments,
                        proj_side=proj_side, transform=transform, basis=basis, moments_dtype=moments_dtype,
                        bias_correction=bias_correction, residual=residual, update_rule=update_rule,
                        backend=backend,
                        moment_bits=moment_bits, moment_block_size=moment_block_size,
                        bf16_stochastic_round=bf16_stochastic_round)
        super().__init__(params, defaults, skip_nonfinite=skip_nonfinite, foreach=foreach, maximize=maximize,
                         capturable=capturable, differentiable=differentiable, fused=fused,
                         backward_projection=backward_projection, step_in_backward=step_in_backward,
                         accumulation_steps=accumulation_steps, process_group=process_group)

    def _validate_group(self, group: dict) -> None:
        check_rank(group["rank"])
        check_choice("proj_side", group["proj_side"], PROJ_SIDES)
        for key, choices in PROJECTORS["dct"].options.items():
            check_choice(key, group[key], choices)

    def _projection_rank(self, group: dict, param: torch.Tensor, rank_given: bool, vocabulary: bool) -> int | None:
        return default_rule_rank(group["rank"], param.shape, rank_given, vocabulary)

    def _projector_name(self, group: dict) -> str:
        return "dct"

    def _nothing_projected_warning(self) -> str:
        return NOTHING_PROJECTED_BY_DEFAULT


DCTAdamW = DCTProjAdam
register_optimizer("dct_adamw", DCTProjAdam)
