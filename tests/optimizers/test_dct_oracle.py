"""DCTProjAdam against the paper's code (ista-daslab-optimizers 1.1.15 DCTAdamW), one selection.

The oracle builds one DCT matrix from the first 2-D weight it meets, so every 2-D weight of the
model must share its smaller dimension. With ``update_proj_gap`` longer than the run it selects
once (step 1); across refreshes it is no oracle (its keep depends on ``topk(sorted=False)``).
"""
import pytest
import torch
from support.oracles import ista_dct_adamw
from support.toy import max_rel_diff
from torch import nn

from lowrank_optim import DCTProjAdam

# Same float32 math in a different order (slot order, ε placement): rounding only.
TOLERANCE = 1e-5


class SharedSide(nn.Module):
    """2-D weights (24, 16), (16, 40), (16, 16): the smaller side is 16 everywhere."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 24)
        self.b = nn.Linear(40, 16)
        self.c = nn.Linear(16, 16)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.c(torch.tanh(self.b(torch.cat([h, h[:, :16]], dim=1))))


def _run(model, optimizer, steps):
    for step in range(steps):
        x = torch.randn(8, 16, generator=torch.Generator().manual_seed(step))
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_single_selection_trajectory_equals_paper_code(weight_decay):
    oracle_cls = ista_dct_adamw()
    torch.manual_seed(0)
    ours_model = SharedSide()
    oracle_model = SharedSide()
    oracle_model.load_state_dict(ours_model.state_dict())
    rank, steps = 5, 25
    ours = DCTProjAdam([{"params": list(ours_model.parameters()), "rank": rank}], lr=1e-2,
                       weight_decay=weight_decay, update_proj_gap=10_000, score="l1", scale=1.0,
                       transform="matmul", residual="none")
    oracle = oracle_cls(oracle_model.parameters(), lr=1e-2, weight_decay=weight_decay, rank=rank,
                        proj="dct", update_proj_gap=10_000, sim_type="matmul", ell_norm=1)
    _run(ours_model, ours, steps)
    _run(oracle_model, oracle, steps)
    assert max_rel_diff(ours_model, oracle_model) < TOLERANCE
    assert max_rel_diff(ours_model, SharedSide()) > 1e-2
    for p, q in zip(ours_model.parameters(), oracle_model.parameters()):
        if p.ndim == 2:
            selected = ours.state[p]["proj_indices"]
            assert sorted(selected.tolist()) == sorted(oracle.state[q]["fft-low-rank-projector"].indices_crt.tolist())
