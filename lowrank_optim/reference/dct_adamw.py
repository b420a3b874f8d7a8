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
                 update_proj_gap=200, scale=1.0, score="l2", moments="keep", proj_side="auto",
                 bias_correction="step", residual="none"):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      update_proj_gap=update_proj_gap, scale=scale, score=score,
                                      moments=moments, proj_side=proj_side,
                                      bias_correction=bias_correction, residual=residual))

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
        if side == "auto":                  # the smaller dimension is compressed
            side = "right" if m_rows >= n_cols else "left"
        elif side == "reverse_std":         # the larger one
            side = "left" if m_rows >= n_cols else "right"
        size = n_cols if side == "right" else m_rows
        rank = min(group["rank"], size)
        basis = reference_dct_basis(size).to(p.dtype)
        grad = p.grad
        if not state:
            shape = (m_rows, rank) if side == "right" else (rank, n_cols)
            state.update(step=0, m=torch.zeros(shape, dtype=p.dtype), v=torch.zeros(shape, dtype=p.dtype),
                         slot_steps=[0] * rank)
        if state["step"] % group["update_proj_gap"] == 0:
            new = _select(grad, basis, side, rank, group["score"])
            if "indices" in state:
                _change_moments(state, state["indices"], new, side, group["moments"])
            state["indices"] = new
        state["step"] += 1
        state["slot_steps"] = [t + 1 for t in state["slot_steps"]]
        chosen = basis[:, state["indices"]]
        low_rank = grad @ chosen if side == "right" else chosen.T @ grad
        if group["bias_correction"] == "slot":
            update = _adam_per_slot(state, low_rank, group, side)
        else:
            update = _adam(state, low_rank, group)
        full = update @ chosen.T if side == "right" else chosen @ update
        if group["residual"] == "scaled":
            full = full + _scaled_residual(state, grad, low_rank, update, chosen, side)
        p.mul_(1 - group["lr"] * group["weight_decay"])
        p.sub_(group["lr"] * group["scale"] * full)


def _adam(state, grad, group):
    beta1, beta2 = group["betas"]
    state["m"] = beta1 * state["m"] + (1 - beta1) * grad
    state["v"] = beta2 * state["v"] + (1 - beta2) * grad * grad
    m_hat = state["m"] / (1 - beta1 ** state["step"])
    v_hat = state["v"] / (1 - beta2 ** state["step"])
    return m_hat / (v_hat.sqrt() + group["eps"])


def _scaled_residual(state, grad, low_rank, update, chosen, side):
    """Fira: ``φ∘(G − P-part)`` with ``φ`` per row (right) / column (left), growth-limited at 1.01."""
    if side == "right":
        residual = grad - low_rank @ chosen.T
        phi = update.norm(dim=1) / low_rank.norm(dim=1)
        scaled = phi[:, None] * residual
    else:
        residual = grad - chosen @ low_rank
        phi = update.norm(dim=0) / low_rank.norm(dim=0)
        scaled = phi[None, :] * residual
    norm = float(scaled.norm())
    previous = state.get("residual_norm")
    if previous is not None and previous > 0 and norm > 1.01 * previous:
        scaled = scaled * (1.01 * previous / norm)
        norm = 1.01 * previous
    state["residual_norm"] = norm
    return scaled


def _adam_per_slot(state, grad, group, side):
    """Adam whose slot ``j`` is bias-corrected with its own count ``slot_steps[j]``."""
    beta1, beta2 = group["betas"]
    state["m"] = beta1 * state["m"] + (1 - beta1) * grad
    state["v"] = beta2 * state["v"] + (1 - beta2) * grad * grad
    update = torch.empty_like(grad)
    for j, t in enumerate(state["slot_steps"]):
        m_j = state["m"][:, j] if side == "right" else state["m"][j, :]
        v_j = state["v"][:, j] if side == "right" else state["v"][j, :]
        value = (m_j / (1 - beta1**t)) / ((v_j / (1 - beta2**t)).sqrt() + group["eps"])
        if side == "right":
            update[:, j] = value
        else:
            update[j, :] = value
    return update


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
    old_list = old.tolist()
    state["slot_steps"] = [state["slot_steps"][old_list.index(i)] if policy == "transport" and i in old_list
                           else 0 for i in new.tolist()]
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
