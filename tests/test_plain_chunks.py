"""The plain single-tensor AdamW step in chunks equals the step in one piece, bit for bit."""
import pytest
import torch

from lowrank_optim.adam_form import AdamForm
from lowrank_optim.moments import Moments
from lowrank_optim.plain_adamw import single_tensor_adamw_
from lowrank_optim.rounding import rounding_generator

SHAPE = (70, 100)          # 7000 values: quantized (>= 4096), chunks of 1024 end in a partial block


def _steps(chunk_values, dtype, bits, rounding):
    torch.manual_seed(0)
    param = torch.randn(SHAPE).to(dtype)
    state = {}
    moments = Moments.of(state, SHAPE, None, bits)
    moments.create(torch.float32 if dtype == torch.bfloat16 else dtype, param.device, like=param)
    for step in range(1, 4):
        grad = torch.randn(SHAPE, generator=torch.Generator().manual_seed(step)).to(dtype)
        generator = rounding_generator("w", step, param.device) if rounding else None
        single_tensor_adamw_(param, grad, moments, step, chunk_values=chunk_values, lr=1e-2, beta1=0.9, beta2=0.99,
                             eps=1e-8, weight_decay=0.1, form=AdamForm.TORCH, generator=generator)
    return param, state


@pytest.mark.parametrize("dtype, bits, rounding", [
    (torch.float32, None, False), (torch.bfloat16, None, False), (torch.float32, 8, False),
    (torch.float32, 4, False), (torch.bfloat16, 8, True)])
def test_chunks_equal_one_piece(dtype, bits, rounding):
    whole_param, whole_state = _steps(10**9, dtype, bits, rounding)
    param, state = _steps(1024, dtype, bits, rounding)
    assert torch.equal(param, whole_param)
    assert state.keys() == whole_state.keys()
    for key in state:
        assert torch.equal(state[key], whole_state[key]), key


def test_a_quantized_chunk_must_start_on_a_block():
    state = {}
    moments = Moments.of(state, SHAPE, None, 8)
    moments.create(torch.float32, torch.device("cpu"))
    with pytest.raises(ValueError, match="start=100"):
        moments.flat_chunk(100, 2000)
