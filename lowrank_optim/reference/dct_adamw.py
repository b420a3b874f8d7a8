"""Reference DCT-projected AdamW (``torch.optim.AdamW`` conventions), ALGORITHMS.md §1 and §3."""
from __future__ import annotations

import numpy as np
import scipy.fft
import torch


def reference_dct_basis(size: int) -> torch.Tensor:
    """``scipy.fft.dct(eye(k), type=2, norm='ortho', axis=0)`` in float64."""
    return torch.from_numpy(scipy.fft.dct(np.eye(size), type=2, norm="ortho", axis=0))


class ReferenceDCTAdamW(torch.optim.Optimizer):
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 update_proj_gap=200, scale=1.0, score="l2", moments="keep", proj_side="auto"):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      update_proj_gap=update_proj_gap, scale=scale, score=score,
                                      moments=moments, proj_side=proj_side))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if group.get("rank") is not None and p.ndim == 2:
                    self._projected(group, p)
                else:
                    self._plain(group, p)

    def _plain(self, group, p):
        state = self.state[p]
        if not state:
            state.update(step=0, m=torch.zeros_like(p), v=torch.zeros_like(p))
        state["step"] += 1
        update = _adam(state, p.grad, group)
        p.mul_(1 - group["lr"] * group["weight_decay"])
        p.sub_(group["lr"] * update)

    def _projected(self, group, p):
        state = self.state[p]
        m_rows, n_cols = p.shape
        side = group["proj_side"]
        if side == "auto":
            side = "right" if m_rows >= n_cols else "left"
        size = n_cols if side == "right" else m_rows
        rank = min(group["rank"], size)
        basis = reference_dct_basis(size).to(p.dtype)
        grad = p.grad
        if not state:
            shape = (m_rows, rank) if side == "right" else (rank, n_cols)
            state.update(step=0, m=torch.zeros(shape, dtype=p.dtype), v=torch.zeros(shape, dtype=p.dtype))
        if state["step"] % group["update_proj_gap"] == 0:
            new = _select(grad, basis, side, rank, group["score"])
            if "indices" in state:
                _change_moments(state, state["indices"], new, side, group["moments"])
            state["indices"] = new
        state["step"] += 1
        chosen = basis[:, state["indices"]]
        low_rank = grad @ chosen if side == "right" else chosen.T @ grad
        update = _adam(state, low_rank, group)
        full = update @ chosen.T if side == "right" else chosen @ update
        p.mul_(1 - group["lr"] * group["weight_decay"])
        p.sub_(group["lr"] * group["scale"] * full)


def _adam(state, grad, group):
    beta1, beta2 = group["betas"]
    state["m"] = beta1 * state["m"] + (1 - beta1) * grad
    state["v"] = beta2 * state["v"] + (1 - beta2) * grad * grad
    m_hat = state["m"] / (1 - beta1 ** state["step"])
    v_hat = state["v"] / (1 - beta2 ** state["step"])
    return m_hat / (v_hat.sqrt() + group["eps"])


def _select(grad, basis, side, rank, score):
    coefficients = (grad @ basis) if side == "right" else (basis.T @ grad)
    vectors = coefficients.T if side == "right" else coefficients   # one row per candidate
    order = 1 if score == "l1" else 2
    scores = [float(torch.linalg.vector_norm(vectors[j].double(), ord=order)) for j in range(len(vectors))]
    ranked = sorted(range(len(scores)), key=lambda j: (-scores[j], j))
    return torch.tensor(ranked[:rank], dtype=torch.int64)


def _change_moments(state, old, new, side, policy):
    if policy == "keep":
        return
    for key in ("m", "v"):
        moment = state[key]
        fresh = torch.zeros_like(moment)
        if policy == "transport":
            old_list = old.tolist()
            for new_slot, index in enumerate(new.tolist()):
                if index in old_list:
                    old_slot = old_list.index(index)
                    if side == "right":
                        fresh[:, new_slot] = moment[:, old_slot]
                    else:
                        fresh[new_slot, :] = moment[old_slot, :]
        state[key] = fresh
