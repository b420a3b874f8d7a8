"""Reference GaLore AdamW, ALGORITHMS.md §2: Hugging Face AdamW on an SVD-projected gradient."""
from __future__ import annotations

import math

import torch


class ReferenceGaLoreAdamW(torch.optim.Optimizer):
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0,
                 update_proj_gap=200, scale=1.0, proj_type="std", moments="keep"):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      update_proj_gap=update_proj_gap, scale=scale,
                                      proj_type=proj_type, moments=moments))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                projected = group.get("rank") is not None and p.ndim == 2
                self._step(group, p, projected)

    def _step(self, group, p, projected):
        state = self.state[p]
        grad = p.grad
        side = _side(p.shape, group["proj_type"]) if projected else None
        if projected:
            if "P" not in state or state["step"] % group["update_proj_gap"] == 0:
                new = _svd_basis(grad, group["rank"], side)
                if "P" in state:
                    _change_moments(state, state["P"], new, side, group["moments"])
                state["P"] = new
            grad = grad @ state["P"] if side == "right" else state["P"].T @ grad
        if "m" not in state:
            state["m"] = torch.zeros_like(grad)
            state["v"] = torch.zeros_like(grad)
        state["step"] = state.get("step", 0) + 1
        beta1, beta2 = group["betas"]
        state["m"] = beta1 * state["m"] + (1 - beta1) * grad
        state["v"] = beta2 * state["v"] + (1 - beta2) * grad * grad
        step_size = group["lr"] * math.sqrt(1 - beta2 ** state["step"]) / (1 - beta1 ** state["step"])
        normalized = state["m"] / (state["v"].sqrt() + group["eps"])
        if projected:
            normalized = normalized @ state["P"].T if side == "right" else state["P"] @ normalized
            normalized = normalized * group["scale"]
        p.sub_(step_size * normalized)
        p.sub_(group["lr"] * group["weight_decay"] * p)


def _side(shape, proj_type):
    tall = shape[0] >= shape[1]
    return {"std": "right" if tall else "left", "reverse_std": "left" if tall else "right",
            "left": "left", "right": "right"}[proj_type]


def _svd_basis(grad, rank, side):
    u, _, vh = torch.linalg.svd(grad.float(), full_matrices=False)
    basis = vh[:rank].T if side == "right" else u[:, :rank]
    return basis.to(grad.dtype)


def _change_moments(state, old, new, side, policy):
    if policy == "keep":
        return
    if policy == "reset":
        state["m"] = torch.zeros_like(state["m"])
        state["v"] = torch.zeros_like(state["v"])
        return
    rotation = new.T @ old                      # coordinates: new = rotation · old
    if side == "right":
        state["m"] = state["m"] @ rotation.T
        state["v"] = state["v"] @ (rotation * rotation).T
    else:
        state["m"] = rotation @ state["m"]
        state["v"] = (rotation * rotation) @ state["v"]
