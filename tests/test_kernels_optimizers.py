"""Whole optimizers: ``backend="triton"`` follows the ``backend="torch"`` trajectory.

Without a GPU the kernels run on CPU tensors under TRITON_INTERPRET=1, set before they are defined.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

from toy import batch, make_model, max_rel_diff, projected_groups  # noqa: E402

from lowrank_optim import DCTProjAdam, GaLoreAdamW  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
STEPS = 20
# fp32 on both sides; the kernels round differently (tiled GEMM sums, one rounding of W per step
# instead of two, fused moment arithmetic), and Adam's normalization carries those last-ulp
# differences along 20 steps of lr 3e-3 (measured ≤ 2e-6): 2e-5 is rounding, not divergence.
TOLERANCE = 2e-5


def _run(make_optimizer, backend):
    """``STEPS`` steps of the toy language model on DEVICE (toy.train's loop, tokens moved there)."""
    model = make_model().to(DEVICE)
    optimizer = make_optimizer(model, backend)
    for step in range(STEPS):
        optimizer.zero_grad(set_to_none=True)
        tokens = batch(step, vocab=model.embed.num_embeddings).to(DEVICE)
        logits = model(tokens[:, :-1])
        torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1)).backward()
        optimizer.step()
    return model, optimizer


@pytest.mark.parametrize("residual", ["none", "scaled"])   # "none": kernel 3 updates the weight
@pytest.mark.parametrize("moments", ["keep", "transport"])
@pytest.mark.parametrize("proj_side", ["left", "right"])
def test_dct_triton_follows_torch(proj_side, moments, residual):
    def make(model, backend):
        groups = projected_groups(model, 5, plain_group_keys={"rank": None})
        return DCTProjAdam(groups, lr=3e-3, weight_decay=0.01, update_proj_gap=4, scale=0.5,
                           moments=moments, proj_side=proj_side, residual=residual, backend=backend)

    torch_model, torch_optimizer = _run(make, "torch")
    triton_model, triton_optimizer = _run(make, "triton")
    assert max_rel_diff(triton_model, torch_model) < TOLERANCE
    for p, q in zip(triton_model.parameters(), torch_model.parameters()):
        if "proj_indices" in torch_optimizer.state[q]:
            assert torch.equal(triton_optimizer.state[p]["proj_indices"], torch_optimizer.state[q]["proj_indices"])
            for key in ("exp_avg", "exp_avg_sq"):
                expected = torch_optimizer.state[q][key]
                assert (triton_optimizer.state[p][key] - expected).abs().max() <= TOLERANCE * expected.abs().max()


@pytest.mark.parametrize("proj_type", ["std", "reverse_std"])
def test_galore_triton_follows_torch(proj_type):
    def make(model, backend):
        groups = projected_groups(model, 5, update_proj_gap=4, scale=0.25, proj_type=proj_type, moments="transport")
        return GaLoreAdamW(groups, lr=3e-3, weight_decay=0.01, backend=backend)

    torch_model, _ = _run(make, "torch")
    triton_model, _ = _run(make, "triton")
    assert max_rel_diff(triton_model, torch_model) < TOLERANCE
