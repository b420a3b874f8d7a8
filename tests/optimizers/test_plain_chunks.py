"""The plain AdamW steps in chunks (single-tensor) and in batches (multi-tensor) equal the step in one
piece, bit for bit."""
import pytest
import torch

from lowrank_optim.adam_form import AdamForm
from lowrank_optim.moments import Moments
from lowrank_optim.plain_adamw import foreach_adamw_, single_tensor_adamw_
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


@pytest.mark.parametrize("form", [AdamForm.TORCH, AdamForm.HF])
@pytest.mark.parametrize("param_dtype, moment_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                                       (torch.bfloat16, torch.bfloat16)])
def test_multi_tensor_batches_equal_one_call(form, param_dtype, moment_dtype):
    """Batches of 1024 values: the 7000-value tensor in chunks, small ones grouped, a transposed
    (non-contiguous) one whole; three steps, bit for bit the single call over everything. (bf16 CPU
    kernels round the tail of a vectorised loop differently: chunks of 1000 would differ in the
    last bit there, chunks of a multiple of the vector width, as the default 2^22, do not.)"""
    def run(batch_values):
        torch.manual_seed(0)
        params = [torch.randn(SHAPE).to(param_dtype), torch.randn(300).to(param_dtype),
                  torch.randn(40, 30).to(param_dtype).T, torch.randn(5).to(param_dtype)]
        exp_avgs = [torch.zeros_like(p, dtype=moment_dtype) for p in params]
        exp_avg_sqs = [torch.zeros_like(p, dtype=moment_dtype) for p in params]
        for step in range(1, 4):
            generator = torch.Generator().manual_seed(step)
            grads = [torch.randn(p.shape, generator=generator).to(param_dtype) for p in params]
            foreach_adamw_(params, grads, exp_avgs, exp_avg_sqs, [step, step, step + 2, step], lr=1e-2, beta1=0.9,
                           beta2=0.99, eps=1e-8, weight_decay=0.1, form=form, batch_values=batch_values)
        return params + exp_avgs + exp_avg_sqs

    for chunked, whole in zip(run(1024), run(10**9)):
        assert torch.equal(chunked, whole)
