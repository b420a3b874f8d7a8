"""``APOLLOAdamW`` and ``APOLLOMini``: SGD-like memory, AdamW-level training (arXiv 2412.05270)."""
from __future__ import annotations

import torch

from .adam_form import AdamForm
from .engine import ProjectedAdamW
from .projectors import PROJECTORS
from .rank import check_rank, default_rule_rank
from .registry import register_optimizer
from .selection import NOTHING_PROJECTED_BY_DEFAULT
from .validation import InvalidHyperparameter, check_choice

APOLLO_PROJECTIONS = ("random", "dct")
APOLLO_SIDES = ("std", "reverse_std", "left", "right")


class APOLLOAdamW(ProjectedAdamW):
    r"""APOLLO: Adam's moments kept only for a rank-``r`` projection ``R`` of each weight's gradient,
    used to scale the *full* gradient channel by channel (Zhu et al., MLSys 2025).

    ``opt = APOLLOAdamW(model.parameters())`` works as is; ``APOLLOMini`` is the rank-1, tensor-wise
    configuration. For a projected ``m×n`` weight (the math of :mod:`lowrank_optim.rules.apollo`):

    .. math::
        \begin{aligned}
        &R = P^\top G \ (\text{or } G P), \quad P \in \mathbb{R}^{k\times r}\ \text{seeded } N(0, 1/r)
            \text{ (or DCT columns), resampled every } T \text{ steps} \\
        &m \leftarrow \beta_1 m + (1-\beta_1) R, \quad v \leftarrow \beta_2 v + (1-\beta_2) R^2, \quad
            \tilde N = m / (\sqrt v + \epsilon) \\
        &s_c = \lVert \tilde N_c \rVert / \lVert R_c \rVert \ \text{(channel } c\text{, or one } s
            \text{ for the tensor)}, \quad U = \ell\,(s \circ G) \text{ (norm-growth limiter } \ell) \\
        &W \leftarrow (1 - \eta\lambda)\,\big(W - \eta\,\tfrac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}\sqrt\alpha\, U\big)
        \end{aligned}

    Optimizer state per projected weight: the two ``r×n`` (``m×r``) moments, one seed (``proj="random"``)
    or ``r`` DCT indices (``proj="dct"``), and the limiter's norm: at rank 1 (APOLLO-Mini) a few
    bytes per row. Which parameters are projected: as :class:`~lowrank_optim.DCTProjAdam` (every 2-D
    parameter but the embedding tables, in a group without its own ``rank``; a group with ``rank``
    projects every 2-D parameter; a weight the rank would not compress stays plain). Everything not
    projected gets AdamW in the same form (Hugging Face's: ``ε`` inside, decay after the update).

    The conventions are apollo-torch 1.0.3's, tested step by step in float64 against it and against
    :class:`~lowrank_optim.reference.ReferenceAPOLLOAdamW`; ``experiments/results/APOLLO_DIFFERENCES.md``
    lists every difference between the paper, apollo-torch, pytorch-optimizer and this class.

    Args:
        params: parameters, named parameters, param groups, or the model itself. Every keyword
            below except ``skip_nonfinite`` may be overridden per group; unknown group keys are refused.
        lr, betas, eps, weight_decay: AdamW's; defaults 1e-3, (0.9, 0.999), 1e-6 (apollo-torch's), 0.0.
        rank (int | float | None, default 0.25): an int, or a fraction of the smaller side.
        proj (str, default "random"): ``"random"``, the paper's seeded Gaussian ``P``, never in the state
            (:mod:`lowrank_optim.projectors.random`); ``"dct"``, DCT columns chosen by their alignment with
            the gradient as in :class:`~lowrank_optim.DCTProjAdam` (``r`` indices of state).
        scale_type (str, default "channel"): one factor per channel, or ``"tensor"`` (one per weight).
        scale (float, default 1.0): ``α``; the update is multiplied by ``√α`` (APOLLO-Mini: 128).
        update_proj_gap (int, default 200): steps between resamples (``proj="dct"``: re-selections).
        proj_type (str, default "std"): GaLore's side rule: ``"std"`` compresses the smaller side,
            ``"reverse_std"`` the larger, or ``"left"``/``"right"``.
        norm_growth_limit (float | None, default 1.01): Fira's limiter ``γ``: the update's norm grows
            at most by this factor per step; None: off.
        seed (int, default 0): ``proj="random"``'s first seed is ``seed`` plus the parameter's
            1-based position among the optimizer's parameters (apollo-torch's).
        moments (str, default "keep"): on a resample, ``"keep"`` the moments (apollo-torch's),
            ``"reset"`` them, or (``proj="dct"`` only) ``"transport"`` them to the slots of the
            columns still selected.
        basis (str, default "cached"): ``"cached"`` keeps the current ``P`` of each weight outside the state
            (``proj="random"``: ``k×r`` values per weight; ``"dct"``: one DCT matrix per size), ``"generated"``
            draws it again at each step and keeps only the seed (``proj="random"``: ``k·r`` CPU draws per
            weight and step, and off the CPU a copy the device waits for; ``experiments/results/APOLLO.md``
            measures both).
        score, transform: ``proj="dct"``'s options, as in :class:`~lowrank_optim.DCTProjAdam`.
        moments_dtype, moment_bits, moment_block_size, bf16_stochastic_round, backend: as in
            :class:`~lowrank_optim.DCTProjAdam` (8/4-bit moments of projected and plain parameters alike).
        foreach, maximize, capturable, differentiable, fused: torch's keywords.
        backward_projection: refused for projected weights (the update scales the full gradient).
        step_in_backward, accumulation_steps, process_group: as in :class:`~lowrank_optim.DCTProjAdam`;
            with ``accumulation_steps > 1`` a projected weight's full gradient accumulates through the
            window and its last backward pass steps it (exactly the standard loop).
        skip_nonfinite (bool, default False): skip a step with an inf/nan gradient.
    """

    adam_form = AdamForm.HF
    side_key = "proj_type"

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0, *, rank: int | float | None = 0.25, proj: str = "random",
                 scale_type: str = "channel", scale: float = 1.0, update_proj_gap: int = 200, proj_type: str = "std",
                 norm_growth_limit: float | None = 1.01, seed: int = 0, moments: str = "keep", score: str = "l2",
                 transform: str = "auto", basis: str = "cached", moments_dtype: torch.dtype | None = None,
                 moment_bits: int | None = None, moment_block_size: int | None = None,
                 bf16_stochastic_round: bool = False, backend: str = "auto", foreach: bool | None = None,
                 maximize: bool = False, capturable: bool = False, differentiable: bool = False,
                 fused: bool | None = None, backward_projection: bool = False, step_in_backward: bool = False,
                 accumulation_steps: int = 1, process_group=None, skip_nonfinite: bool = False):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rank=rank, proj=proj,
                        scale_type=scale_type, scale=scale, update_proj_gap=update_proj_gap, proj_type=proj_type,
                        norm_growth_limit=norm_growth_limit, seed=seed, moments=moments, score=score,
                        transform=transform, basis=basis, moments_dtype=moments_dtype, moment_bits=moment_bits,
                        moment_block_size=moment_block_size, bf16_stochastic_round=bf16_stochastic_round,
                        backend=backend, bias_correction="step", residual="none", update_rule="apollo")
        super().__init__(params, defaults, skip_nonfinite=skip_nonfinite, foreach=foreach, maximize=maximize,
                         capturable=capturable, differentiable=differentiable, fused=fused,
                         backward_projection=backward_projection, step_in_backward=step_in_backward,
                         accumulation_steps=accumulation_steps, process_group=process_group)

    def _validate_group(self, group: dict) -> None:
        check_rank(group["rank"])
        check_choice("proj", group["proj"], APOLLO_PROJECTIONS)
        check_choice("proj_type", group["proj_type"], APOLLO_SIDES)
        for key, choices in PROJECTORS["dct"].options.items():
            check_choice(key, group[key], choices)
        seed = group["seed"]
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise InvalidHyperparameter("seed", seed, f"Invalid seed: {seed!r} (expected an int >= 0)")
        if group["proj"] == "random" and group["moments"] == "transport":
            raise InvalidHyperparameter("moments", group["moments"], (
                "Invalid moments: 'transport' with proj='random' (two random subspaces share no directions to "
                "carry the moments along); pass 'keep' (apollo-torch's) or 'reset', or proj='dct'"))
        if group["update_rule"] != "apollo":
            raise InvalidHyperparameter("update_rule", group["update_rule"], (
                f"Invalid update_rule: {group['update_rule']!r} (APOLLOAdamW runs update_rule='apollo'; other "
                "rules are DCTProjAdam's and GaLoreAdamW's)"))

    def _projection_rank(self, group: dict, param: torch.Tensor, rank_given: bool, vocabulary: bool) -> int | None:
        return default_rule_rank(group["rank"], param.shape, rank_given, vocabulary)

    def _projector_name(self, group: dict) -> str:
        return group["proj"]

    def _nothing_projected_warning(self) -> str:
        return NOTHING_PROJECTED_BY_DEFAULT


class APOLLOMini(APOLLOAdamW):
    """APOLLO-Mini: :class:`APOLLOAdamW` at rank 1 with one scaling factor per weight
    (``scale_type="tensor"``) and the paper's ``scale=128`` (the update times ``√128``): SGD-like
    memory (per projected ``m×n`` weight two moments of ``max(m, n)`` values, a seed and one norm).
    Every keyword of :class:`APOLLOAdamW` is available; these three are its defaults."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.0,
                 *, rank: int | float | None = 1, scale_type: str = "tensor", scale: float = 128.0, **kwargs):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rank=rank,
                         scale_type=scale_type, scale=scale, **kwargs)


register_optimizer("apollo_adamw", APOLLOAdamW)
register_optimizer("apollo_mini", APOLLOMini)
