"""Whole optimizers: ``backend="triton"`` follows the ``backend="torch"`` trajectory.

Without a GPU the kernels run on CPU tensors under TRITON_INTERPRET=1, set before they are defined.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

from support.toy import batch, make_model, max_rel_diff, projected_groups  # noqa: E402

from lowrank_optim import DCTProjAdam, GaLoreAdamW  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
STEPS = 20
# fp32 on both sides; the kernels round differently (tiled GEMM sums, one rounding of W per step
# instead of two, fused moment arithmetic), and Adam's normalization carries those last-ulp
# differences along 20 steps of lr 3e-3 (measured ≤ 2e-6): 2e-5 is rounding, not divergence.
TOLERANCE = 2e-5


def _run(make_optimizer, backend, model=None, steps=STEPS):
    """``steps`` steps of the toy language model on DEVICE (toy.train's loop, tokens moved there)."""
    model = make_model().to(DEVICE) if model is None else model
    optimizer = make_optimizer(model, backend)
    for step in range(steps):
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


@pytest.mark.parametrize("proj_side", ["left", "right"])
def test_dct_slot_bias_correction_on_triton_follows_torch(proj_side):
    """Per-slot bias corrections read by kernel 1, together with its transport remap (refreshes
    every 4 steps renumber the slots and their step counts)."""
    def make(model, backend):
        groups = projected_groups(model, 5, plain_group_keys={"rank": None})
        return DCTProjAdam(groups, lr=3e-3, weight_decay=0.01, update_proj_gap=4, scale=0.5, moments="transport",
                           bias_correction="slot", proj_side=proj_side, residual="none", backend=backend)

    torch_model, torch_optimizer = _run(make, "torch")
    triton_model, triton_optimizer = _run(make, "triton")
    assert max_rel_diff(triton_model, torch_model) < TOLERANCE
    for p, q in zip(triton_model.parameters(), torch_model.parameters()):
        if "slot_steps" in torch_optimizer.state[q]:
            assert torch.equal(triton_optimizer.state[p]["slot_steps"], torch_optimizer.state[q]["slot_steps"])


@pytest.mark.parametrize("transform", ["matmul", "auto"])     # auto: the GEMM on a GPU, the FFT on CPU
@pytest.mark.parametrize("proj_side", ["left", "right"])
def test_generated_basis_on_triton_follows_the_cached_basis_on_torch(proj_side, transform):
    """``basis="generated"`` on the Triton backend: blocked scoring GEMMs (or the FFT), a dense
    ``P`` through the moment and weight kernels, and no column-major ``C`` built for the kernels."""
    from lowrank_optim.projectors import dct

    def make(basis):
        def build(model, backend):
            groups = projected_groups(model, 5, plain_group_keys={"rank": None})
            return DCTProjAdam(groups, lr=3e-3, update_proj_gap=4, scale=0.5, proj_side=proj_side,
                               transform=transform, basis=basis, backend=backend)
        return build

    dct._column_major_dct.cache_clear()          # rebuilt on demand by later tests
    torch_model, torch_optimizer = _run(make("cached"), "torch")
    triton_model, triton_optimizer = _run(make("generated"), "triton")
    assert dct._column_major_dct.cache_info().currsize == 0
    assert max_rel_diff(triton_model, torch_model) < TOLERANCE
    for p, q in zip(triton_model.parameters(), torch_model.parameters()):
        if "proj_indices" in torch_optimizer.state[q]:
            assert torch.equal(triton_optimizer.state[p]["proj_indices"], torch_optimizer.state[q]["proj_indices"])


@pytest.mark.parametrize("proj_type", ["std", "reverse_std"])
def test_galore_triton_follows_torch(proj_type):
    def make(model, backend):
        groups = projected_groups(model, 5, update_proj_gap=4, scale=0.25, proj_type=proj_type, moments="transport")
        return GaLoreAdamW(groups, lr=3e-3, weight_decay=0.01, backend=backend)

    torch_model, _ = _run(make, "torch")
    triton_model, _ = _run(make, "triton")
    assert max_rel_diff(triton_model, torch_model) < TOLERANCE


def test_the_defaults_run_the_fused_kernels(monkeypatch):
    """Defect 6 of the engine-v2 issue: with DCTProjAdam's defaults (scaled residual) the fused
    back-projection + weight-update kernel never ran. Now every projected weight update of a
    default run goes through it with the residual's arguments, and the reference never runs."""
    from lowrank_optim.kernels import dispatch, weight_update_triton

    calls = []
    kernel = weight_update_triton.projected_weight_update_triton_

    def spy(*args, **kwargs):
        calls.append(kwargs["residual_grad"] is not None)
        return kernel(*args, **kwargs)

    def refuse(*args, **kwargs):
        raise AssertionError("the PyTorch weight update ran on the Triton backend")

    monkeypatch.setattr(weight_update_triton, "projected_weight_update_triton_", spy)
    monkeypatch.setattr(dispatch, "_reference_weight_update_", refuse)
    _run(lambda model, backend: DCTProjAdam(model.named_parameters(), rank=5, backend=backend), "triton")
    assert calls and all(calls) and len(calls) == 2 * STEPS        # up and down, every step


@pytest.mark.parametrize("bits, block_size", [(8, None), (4, None), (8, 2048)])
def test_low_bit_dct_on_triton_follows_torch(bits, block_size):
    """The fused quantized moment kernel inside the optimizer, 6 steps across a refresh. The fused
    weight update rounds W differently in its last bit (see TOLERANCE); the next gradient then
    differs in its last bits and, rarely, a moment lands on the other side of a code boundary (at 4
    bits, of its stochastic rounding's threshold): one map step in one entry, times lr. At 8 bits
    that is ≤ 1/128 of the block's absmax: 2e-3. At 4 bits a flip of v between its lowest levels
    ((k/16)², k = 1, 2) changes that entry's 1/√v by 2×: 2e-2 (measured 2.05e-3 and 9.5e-3 with two
    noise hashes). At least 99% of the code bytes equal (97% of a 4-bit v's)."""
    def make(model, backend):
        return DCTProjAdam(model.named_parameters(), lr=3e-3, rank=5, update_proj_gap=4, moment_bits=bits,
                           moment_block_size=block_size, backend=backend)

    def wide():
        return make_model(vocab=300, d=16, hidden=1100).to(DEVICE)

    torch_model, torch_optimizer = _run(make, "torch", model=wide(), steps=6)
    triton_model, triton_optimizer = _run(make, "triton", model=wide(), steps=6)
    assert max_rel_diff(triton_model, torch_model) < (2e-3 if bits == 8 else 2e-2)
    for p, q in zip(triton_model.parameters(), torch_model.parameters()):
        for key in ("exp_avg_codes", "exp_avg_sq_codes"):
            if key in torch_optimizer.state[q]:
                same = triton_optimizer.state[p][key] == torch_optimizer.state[q][key]
                # a 4-bit v byte holds two values written stochastically: measured 98.5% of bytes equal
                assert same.float().mean() > (0.97 if key == "exp_avg_sq_codes" and bits == 4 else 0.99), key
    up = [q for q in torch_model.parameters() if q.shape == (1100, 16)][0]
    assert torch_optimizer.state[up]["exp_avg_codes"].dtype == torch.uint8
