"""``DCTProjAdam(basis="generated")``: no ``C`` is stored, and the trajectory is the cached basis's."""
import pytest
import torch
from lowrank_optim.kernels.column_select import scores_from_coefficients
from support.toy import make_model, max_rel_diff, projected_groups, train, train_in_micro_batches, twin

from lowrank_optim import DCTProjAdam
from lowrank_optim.projectors import dct
from lowrank_optim.projectors.dct import DCTProjector
from lowrank_optim.projectors.dct_basis import dct_coefficients, dct_columns, dct_matrix

CPU = torch.device("cpu")


@pytest.mark.parametrize("size", [1, 5, 33, 256])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_generated_columns_are_the_matrix_columns(size, dtype):
    columns = torch.randperm(size, generator=torch.Generator().manual_seed(size))[: max(1, size // 3)]
    assert torch.equal(dct_columns(size, columns, dtype), dct_matrix(size, dtype, CPU)[:, columns])


def test_generated_columns_stay_orthonormal_at_llama_7b_size():
    """The exact phase reduction keeps the argument of cos in [0, 2π) (module doc of dct_basis):
    orthonormal to 5e-15 here, where the unreduced float64 formula reaches 3e-13 (measured)."""
    size = 4096
    columns = torch.arange(size - 64, size)              # the highest frequencies: the largest phases
    p = dct_columns(size, columns, torch.float64)
    torch.testing.assert_close(p.T @ p, torch.eye(64, dtype=torch.float64), atol=2e-14, rtol=0)
    i = torch.arange(size, dtype=torch.float64).unsqueeze(1)
    exact = torch.cos(torch.pi * i * (2 * columns.double() + 1) / (2 * size)) * (2.0 / size) ** 0.5
    exact[0] /= 2 ** 0.5
    torch.testing.assert_close(p, exact, atol=1e-13, rtol=0)    # the same entries, to the unreduced one's error


@pytest.mark.parametrize("norm", ["l1", "l2"])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("block", [1, 8, 37, 64])
def test_blocked_scores_equal_the_full_transform(norm, side, block):
    grad = torch.randn((21, 37) if side == "right" else (37, 21), dtype=torch.float64,
                       generator=torch.Generator().manual_seed(block))
    full = scores_from_coefficients(dct_coefficients(grad, side, "matmul"), side, norm)
    # scores are fp32 sums (kernels.column_select): float32 rounding apart
    torch.testing.assert_close(dct._blocked_scores(grad, side, norm, block), full, atol=0, rtol=1e-6)


@pytest.mark.parametrize("transform", ["matmul", "fft"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_generated_projector_selects_and_projects_like_the_cached_one(transform, side):
    grad = torch.randn(300, 280, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    cached = DCTProjector({"score": "l2", "transform": transform, "basis": "cached"})
    generated = DCTProjector({"score": "l2", "transform": transform, "basis": "generated"})
    subspace = cached.select(grad, 24, side)
    assert torch.equal(generated.select(grad, 24, side)["indices"], subspace["indices"])
    size = grad.shape[1] if side == "right" else grad.shape[0]
    basis, indices = generated.basis_columns(subspace, size, torch.float64, "torch")
    assert indices is None and basis.shape == (size, 24) and basis.is_contiguous()
    assert torch.equal(basis, cached.basis(subspace, size, torch.float64))
    assert torch.equal(generated.project(grad, subspace, side), cached.project(grad, subspace, side))


def _groups(model, basis, **keys):
    return projected_groups(model, 5, plain_group_keys={"rank": None}, basis=basis, **keys)


@pytest.mark.parametrize("keys", [
    {"transform": "matmul", "residual": "scaled"},
    {"transform": "fft", "residual": "none", "proj_side": "left"},
    {"transform": "matmul", "residual": "none", "moments": "keep", "moment_bits": 8},
], ids=["matmul-residual", "fft-left", "matmul-8bit"])
def test_generated_basis_follows_the_cached_trajectory_float64(keys):
    cached_model = make_model(dtype=torch.float64)
    generated_model = twin(cached_model)
    options = dict(lr=3e-3, weight_decay=0.01, update_proj_gap=3, scale=0.5)
    cached = DCTProjAdam(_groups(cached_model, "cached", **keys), **options)
    generated = DCTProjAdam(_groups(generated_model, "generated", **keys), **options)
    train(cached_model, cached, 10)
    train(generated_model, generated, 10)
    assert max_rel_diff(generated_model, cached_model) <= 1e-12
    for p, q in zip(generated_model.parameters(), cached_model.parameters()):
        if "proj_indices" in cached.state[q]:
            assert torch.equal(generated.state[p]["proj_indices"], cached.state[q]["proj_indices"])


def test_generated_basis_under_step_in_backward_with_accumulation():
    cached_model = make_model(dtype=torch.float64)
    generated_model = twin(cached_model)
    options = dict(lr=3e-3, update_proj_gap=2, residual="none", step_in_backward=True, accumulation_steps=3)
    cached = DCTProjAdam(_groups(cached_model, "cached", transform="matmul"), **options)
    generated = DCTProjAdam(_groups(generated_model, "generated", transform="matmul"), **options)
    train_in_micro_batches(cached_model, cached, 6, 3)
    train_in_micro_batches(generated_model, generated, 6, 3)
    assert max_rel_diff(generated_model, cached_model) <= 1e-12


def test_generated_basis_stores_no_matrix():
    model = make_model(dtype=torch.float64)
    optimizer = DCTProjAdam(_groups(model, "generated", transform="matmul"), update_proj_gap=2)
    dct_matrix.cache_clear()                     # both caches rebuild on demand for later tests
    dct._column_major_dct.cache_clear()
    train(model, optimizer, 4)
    assert dct_matrix.cache_info().currsize == dct._column_major_dct.cache_info().currsize == 0
    assert {"proj_indices"} == {key for p in (model.up.weight, model.down.weight)
                                for key in optimizer.state[p] if key.startswith("proj_")}


def test_invalid_basis_is_refused_naming_it():
    model = make_model()
    with pytest.raises(ValueError, match=r"basis.*'dense'"):
        DCTProjAdam(model.parameters(), basis="dense")


def test_a_state_dict_without_the_basis_key_is_refused_by_name():
    """No default is guessed for a layout this version did not save (lowrank_optim.state_io)."""
    model = make_model()
    optimizer = DCTProjAdam(_groups(model, "cached"), update_proj_gap=2)
    train(model, optimizer, 2)
    saved = optimizer.state_dict()
    for group in saved["param_groups"]:
        del group["basis"]
    restored = DCTProjAdam(_groups(twin(model), "generated"), update_proj_gap=2)
    before = [dict(group) for group in restored.param_groups]
    with pytest.raises(ValueError, match=r"Invalid state_dict: param_groups\[0\] lacks 'basis'"):
        restored.load_state_dict(saved)
    assert restored.param_groups == before and not restored.state        # nothing was loaded
