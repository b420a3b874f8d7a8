"""Reference APOLLO AdamW (Zhu et al., arXiv 2412.05270, Algorithm 1) with apollo-torch 1.0.3's conventions.

For a projected weight ``W`` (m×n) with gradient ``G`` and a random projection ``P`` (r×k, k the compressed
dimension), one step is::

    R   = P·G  (left: k = m, R is r×n)    or    R = G·Pᵀ  (right: k = n, R is m×r)
    M   = β₁M + (1−β₁)R,   V = β₂V + (1−β₂)R²
    Ñ   = M / (√V + ε)                           bias_correction="step"    (apollo-torch, the default)
    Ñ   = M̂ / (√V̂ + ε)                           bias_correction="moments" (the paper's Algorithm 1)
    s   = ‖Ñ[:, j]‖ / (‖R[:, j]‖ + 1e-8)         channel, left: one factor per column j of G
    s   = ‖Ñ[i, :]‖ / (‖R[i, :]‖ + 1e-8)         channel, right: one factor per row i of G
    s   = ‖Ñ‖ / (‖R‖ + 1e-8)                      tensor (APOLLO-Mini: rank 1, scale 128)
    U   = limit(G ⊙ s)                            Fira's norm-growth limiter, γ = norm_growth_limit
    W  ← W − η_t·√scale·U,   then   W ← W − η·λ·W     (decay after the update, on the updated W)

with ``η_t = η·√(1−β₂ᵗ)/(1−β₁ᵗ)`` for "step" and ``η_t = η`` for "moments". The limiter keeps
``‖U_t‖ ≤ γ·‖U_{t−1}‖`` (``U_{t−1}`` as limited); the first step of a parameter only records its norm.

The projection (what the engine must reproduce to match this reference bit for bit in float64):

* ``s₀ = group["seed"] + position``, ``position`` the 1-based index of the parameter among all
  parameters of all groups, in order (apollo-torch: ``state["seed"] = params_idx``, group seed 0).
* ``s_{k+1} = next_projection_seed(s_k)``: the last of 15 ``torch.randint(0, 2**63 − 1)`` draws of a CPU
  ``torch.Generator`` seeded with ``s_k`` (apollo-torch's ``next_seed``).
* refresh ``k`` happens before the step whose count of previous steps is ``k·update_proj_gap``
  (1-based steps 1, gap+1, 2·gap+1, …), and uses ``s_k``.
* ``P_k = randn(shape, generator=CPU Generator().manual_seed(s_k), dtype=float32) / sqrt(r)`` computed in
  float32, then cast to the gradient's dtype; ``shape`` is (m, r) for left (``P = that.T``) and (r, n) for
  right. apollo-torch draws on the gradient's device: its CUDA matrices differ from these CPU ones.

``proj="identity"`` (not in the paper or the peers, a diagnostic): ``P = I`` of the compressed size, whatever
``rank`` says, so ``R = G``, the moments are AdamW's own and ``s`` is the exact factor that a random ``P``
estimates from r rows (channel: ``‖Ñ[:, j]‖/‖G[:, j]‖``; tensor: ``‖Ñ‖/‖G‖``). It saves no memory; it
separates the cost of estimating ``s`` from the cost of the rule ``G ⊙ s`` itself
(experiments/results/APOLLO.md, "estimate or rule?").

The moments are kept across a refresh by default (apollo-torch), although they then live in the old
random subspace; ``moments="reset"`` zeroes them instead. Parameters that are not 2-D, or in a group
without an integer ``rank``, get plain AdamW in the same bias-correction and decay conventions.
``proj_type`` is GaLore's: "std" compresses the smaller dimension (right when m ≥ n), "reverse_std"
the larger one, "left"/"right" force the side; the channel factors always run along the dimension that
is not compressed. See experiments/results/APOLLO_DIFFERENCES.md for every difference with the paper
and the peers.
"""
from __future__ import annotations

import math

import torch

from lowrank_optim.validation import check_choice

NEXT_SEED_DRAWS = 15   # apollo-torch random_projector.ADV_DEFAULT
NORM_GUARD = 1e-8      # apollo-torch adds it to ‖R‖ in the scaling factor and to the limiter's old norm


def next_projection_seed(seed: int) -> int:
    """apollo-torch's ``next_seed``: the last of 15 int64 draws from a CPU generator seeded with ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    return int(torch.randint(0, torch.iinfo(torch.int64).max, (NEXT_SEED_DRAWS,), generator=generator)[-1])


def projection_seed(first_seed: int, refresh: int) -> int:
    """The seed of refresh ``refresh`` (0 = the first projection) of a parameter whose first seed is ``first_seed``."""
    seed = first_seed
    for _ in range(refresh):
        seed = next_projection_seed(seed)
    return seed


def random_projection(size: int, rank: int, side: str, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``P`` (rank×size), entries N(0, 1/rank), drawn in float32 on the CPU from ``seed``, then cast to ``dtype``."""
    generator = torch.Generator().manual_seed(seed)
    shape = (size, rank) if side == "left" else (rank, size)
    draw = torch.randn(shape, generator=generator, dtype=torch.float32) / math.sqrt(rank)
    draw = draw.to(dtype)
    return draw.T if side == "left" else draw


def projection_side(shape: tuple[int, int], proj_type: str) -> str:
    """GaLore's rule: "std" compresses the smaller dimension (right when rows ≥ columns)."""
    tall = shape[0] >= shape[1]
    return {"std": "right" if tall else "left", "reverse_std": "left" if tall else "right",
            "left": "left", "right": "right"}[proj_type]


class ReferenceAPOLLOAdamW(torch.optim.Optimizer):
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, update_proj_gap=200,
                 scale=1.0, proj_type="std", scale_type="channel", proj="random", seed=0, norm_growth_limit=1.01,
                 bias_correction="step", moments="keep"):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      update_proj_gap=update_proj_gap, scale=scale, proj_type=proj_type,
                                      scale_type=scale_type, proj=proj, seed=seed,
                                      norm_growth_limit=norm_growth_limit, bias_correction=bias_correction,
                                      moments=moments))

    def add_param_group(self, param_group):
        """Each group's keys are checked with the defaults filled in, before the group is added."""
        _check_keys({**self.defaults, **param_group})
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if group.get("rank") is not None and p.ndim == 2:
                    self._projected(group, p)
                else:
                    self._plain(group, p)
        return loss

    def _position(self, p) -> int:
        everything = [q for group in self.param_groups for q in group["params"]]
        return next(i for i, q in enumerate(everything) if q is p) + 1

    def _plain(self, group, p):
        state = self.state[p]
        if not state:
            state.update(step=0, m=torch.zeros_like(p), v=torch.zeros_like(p))
        state["step"] += 1
        normalized, step_size = _adam(state, p.grad, group)
        p.sub_(step_size * normalized)
        _decay(p, group)

    def _projected(self, group, p):
        state = self.state[p]
        grad = p.grad
        side = projection_side(p.shape, group["proj_type"])
        size = p.shape[0] if side == "left" else p.shape[1]
        rank = group["rank"]
        if not state:
            state.update(step=0, seed=group["seed"] + self._position(p))
        if state["step"] % group["update_proj_gap"] == 0:
            if "P" in state:
                state["seed"] = next_projection_seed(state["seed"])
                if group["moments"] == "reset":
                    state["m"] = torch.zeros_like(state["m"])
                    state["v"] = torch.zeros_like(state["v"])
            state["P"] = _projection(group["proj"], size, rank, side, state["seed"], grad.dtype)
        projection = state["P"]
        low_rank = projection @ grad if side == "left" else grad @ projection.T
        if "m" not in state:
            state["m"] = torch.zeros_like(low_rank)
            state["v"] = torch.zeros_like(low_rank)
        state["step"] += 1
        normalized, step_size = _adam(state, low_rank, group)
        scaled = grad * _scaling(normalized, low_rank, side, group["scale_type"])
        if group["norm_growth_limit"] is not None:
            scaled = _limit(state, scaled, group["norm_growth_limit"])
        p.sub_(step_size * math.sqrt(group["scale"]) * scaled)
        _decay(p, group)


def _check_keys(group):
    """A ValueError naming the key and the value for anything the reference does not implement."""
    choices = {"scale_type": ("channel", "tensor"), "proj": ("random", "identity"),
               "proj_type": ("std", "reverse_std", "left", "right"), "bias_correction": ("step", "moments"),
               "moments": ("keep", "reset")}
    for key, allowed in choices.items():
        check_choice(key, group[key], allowed)
    limit = group["norm_growth_limit"]
    if limit is not None and not limit >= 1.0:
        raise ValueError(f"norm_growth_limit must be None or >= 1, got {limit}")


def _projection(proj, size, rank, side, seed, dtype):
    """``P``: the seeded random one (rank×size), or for "identity" ``I`` (size×size, whatever ``rank`` says)."""
    if proj == "identity":
        return torch.eye(size, dtype=dtype)
    return random_projection(size, rank, side, seed, dtype)


def _adam(state, grad, group):
    """(Ñ, step size) in the group's bias-correction convention."""
    beta1, beta2 = group["betas"]
    t = state["step"]
    state["m"] = beta1 * state["m"] + (1 - beta1) * grad
    state["v"] = beta2 * state["v"] + (1 - beta2) * grad * grad
    if group["bias_correction"] == "moments":
        m_hat = state["m"] / (1 - beta1**t)
        v_hat = state["v"] / (1 - beta2**t)
        return m_hat / (v_hat.sqrt() + group["eps"]), group["lr"]
    step_size = group["lr"] * math.sqrt(1 - beta2**t) / (1 - beta1**t)
    return state["m"] / (state["v"].sqrt() + group["eps"]), step_size


def _scaling(normalized, low_rank, side, scale_type):
    """Factors that broadcast against G: (1, n) per column for left, (m, 1) per row for right, or a scalar."""
    if scale_type == "tensor":
        return normalized.norm() / (low_rank.norm() + NORM_GUARD)
    if side == "left":
        return (normalized.norm(dim=0) / (low_rank.norm(dim=0) + NORM_GUARD))[None, :]
    return (normalized.norm(dim=1) / (low_rank.norm(dim=1) + NORM_GUARD))[:, None]


def _limit(state, scaled, gamma):
    """Fira's norm-growth limiter: ‖U_t‖ ≤ γ‖U_{t−1}‖; the first call only records the norm."""
    norm = scaled.norm()
    if "limiter_norm" in state:
        ratio = norm / (state["limiter_norm"] + NORM_GUARD)
        if ratio > gamma:
            scaled = scaled / (ratio / gamma)
            norm = norm / (ratio / gamma)
    state["limiter_norm"] = norm
    return scaled


def _decay(p, group):
    """Decoupled decay after the update (apollo-torch, Hugging Face AdamW): W ← W − η·λ·W."""
    if group["weight_decay"] > 0:
        p.sub_(group["lr"] * group["weight_decay"] * p)
