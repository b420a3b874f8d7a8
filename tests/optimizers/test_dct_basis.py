import numpy as np
import pytest
import scipy.fft
import torch

from lowrank_optim.projectors.dct_basis import dct_coefficients, dct_matrix


@pytest.mark.parametrize("size", [1, 2, 7, 64, 100])
def test_basis_is_orthonormal_and_equals_scipy(size):
    c = dct_matrix(size, torch.float64, torch.device("cpu"))
    identity = torch.eye(size, dtype=torch.float64)
    torch.testing.assert_close(c @ c.T, identity, atol=1e-12, rtol=0)
    torch.testing.assert_close(c.T @ c, identity, atol=1e-12, rtol=0)
    expected = scipy.fft.dct(np.eye(size), type=2, norm="ortho", axis=0)
    torch.testing.assert_close(c, torch.from_numpy(expected), atol=1e-12, rtol=0)


def test_basis_is_built_once_per_size_dtype_device():
    a = dct_matrix(33, torch.float32, torch.device("cpu"))
    assert dct_matrix(33, torch.float32, torch.device("cpu")) is a
    assert dct_matrix(33, torch.float64, torch.device("cpu")) is not a


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("shape", [(37, 20), (20, 37), (16, 16)])
def test_fft_transform_matches_matmul(side, shape):
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    by_fft = dct_coefficients(grad, side, "fft")
    by_gemm = dct_coefficients(grad, side, "matmul")
    torch.testing.assert_close(by_fft, by_gemm, atol=1e-12, rtol=1e-12)
    # float32 input stays float32 and agrees to float32 rounding
    fp32 = dct_coefficients(grad.float(), side, "fft")
    assert fp32.dtype == torch.float32
    torch.testing.assert_close(fp32.double(), by_gemm, atol=1e-5, rtol=1e-5)
