"""Kernel 3 (Triton back-projection GEMM with the weight update in its epilogue) against float64.

Without a GPU the kernel runs on CPU tensors under TRITON_INTERPRET=1, set before it is defined.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

from lowrank_optim.kernels.weight_update import projected_weight_update_  # noqa: E402
from lowrank_optim.kernels.weight_update_triton import projected_weight_update_triton_  # noqa: E402

from lowrank_optim.projectors.dct_basis import dct_matrix  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(70, 45), (45, 70), (33, 96), (96, 33)]
RANK = 7
HYPER = dict(lr=0.05, scale=0.5, weight_decay=0.1)
# (weight dtype, update dtype) -> relative tolerance. fp32: ΔW entries are r-term fp32 dot products
# (r = 7, error ≲ r·2^-24), scaled by ηα and added to W with one rounding: 1e-5. bf16 W: the kernel
# rounds the fp32 result once to bf16 (half an ulp, 2^-9 ≈ 2e-3): 4e-3. bf16 N: bf16 operands
# multiply exactly and accumulate in fp32, then W (fp32 here) is rounded once: 1e-5 against a
# reference computed from the same bf16 operands.
TOLERANCES = {(torch.float32, torch.float32): 1e-5, (torch.bfloat16, torch.float32): 4e-3,
              (torch.float32, torch.bfloat16): 1e-5}


def _problem(shape, side, weight_dtype, update_dtype, dense, seed=0):
    generator = torch.Generator().manual_seed(seed)
    m, n = shape
    size = n if side == "right" else m
    weight = torch.randn(shape, generator=generator).to(weight_dtype)
    update = torch.randn((m, RANK) if side == "right" else (RANK, n), generator=generator).to(update_dtype)
    basis = dct_matrix(size, update_dtype, torch.device("cpu"))
    indices = torch.randperm(size, generator=generator)[:RANK]
    if dense:                                   # GaLore: a dense k×r P, no indices
        basis, indices = basis[:, indices].contiguous(), None
    else:                                       # DCT: the column-major C the projector passes
        basis = basis.T.contiguous().T
    on_device = [t.to(DEVICE) if t is not None else None for t in (weight, update, basis, indices)]
    return on_device


@pytest.mark.parametrize("decay_before_update", [True, False], ids=["torch-form", "hf-form"])
@pytest.mark.parametrize("dense", [False, True], ids=["gathered", "dense"])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtypes", list(TOLERANCES), ids=lambda d: f"W{d[0]}-N{d[1]}".replace("torch.", ""))
def test_update_matches_float64(dtypes, shape, side, dense, decay_before_update):
    weight_dtype, update_dtype = dtypes
    if update_dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the interpreter's bf16 dot is wrong; runs on GPU")
    weight, update, basis, indices = _problem(shape, side, weight_dtype, update_dtype, dense)
    expected = weight.double()
    projected_weight_update_(expected, update.double(), basis.double(), indices, side,
                             decay_before_update=decay_before_update, **HYPER)
    # The first call for a new shape autotunes on GPU: restore_value must leave one update only.
    projected_weight_update_triton_(weight, update, basis, indices, side,
                                    decay_before_update=decay_before_update, **HYPER)
    assert weight.dtype == weight_dtype
    tolerance = TOLERANCES[dtypes]
    torch.testing.assert_close(weight.double(), expected, rtol=tolerance,
                               atol=tolerance * float(expected.abs().max()))


def test_no_weight_decay_is_a_plain_update():
    weight, update, basis, indices = _problem((33, 21), "right", torch.float32, torch.float32, dense=False)
    expected = weight.double() - 0.05 * 0.5 * (update.double() @ basis.double()[:, indices].T)
    projected_weight_update_triton_(weight, update, basis, indices, "right", lr=0.05, scale=0.5,
                                    weight_decay=0.0, decay_before_update=False)
    torch.testing.assert_close(weight.double(), expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def test_update_of_the_wrong_shape_is_rejected():
    weight, update, basis, indices = _problem((33, 21), "right", torch.float32, torch.float32, dense=False)
    with pytest.raises(ValueError, match="do not fit"):
        projected_weight_update_triton_(weight, update.T, basis, indices, "right", decay_before_update=True, **HYPER)
