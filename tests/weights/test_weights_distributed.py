"""Int8 weights under DDP (two gloo ranks on CPU): every rank steps its replica with
``int8_update_`` and the parameter's rounding generator, on the all-reduced gradient, and the
replicas stay bit-identical (codes and scales), while they do change.

DDP is built with ``init_sync=False``: its initial broadcast concatenates the int8 weights with
the other parameters, which torchao's tensor refuses; the replicas need no broadcast, every rank
converting the same initial weights.
"""
import torch
from support.distributed_harness import WORLD_SIZE, assert_identical, half, make_tall_wide, run_and_collect
from torch import nn

from lowrank_optim.rounding import rounding_generator
from lowrank_optim.weights import int8_update_, is_int8_weight, quantize_model_weights

STEPS = 3


def _batch(step: int):
    generator = torch.Generator().manual_seed(700 + step)
    return torch.randn(8, 8, generator=generator), torch.randn(8, 6, generator=generator)


def _worker(rank: int, out_dir: str) -> None:
    model = make_tall_wide()
    quantize_model_weights(model, include_head=True)
    ddp = nn.parallel.DistributedDataParallel(model, init_sync=False)
    for step in range(STEPS):
        x, target = _batch(step)
        model.zero_grad()
        nn.functional.mse_loss(ddp(x[half(rank)]), target[half(rank)]).backward()
        with torch.no_grad():
            for name, param in model.named_parameters():
                if is_int8_weight(param):
                    generator = rounding_generator(name, step, param.device)
                    int8_update_(param, param.grad, a=0.999, b=0.1, generator=generator)
                else:
                    param.sub_(0.1 * param.grad)
    torch.save(model.state_dict(), f"{out_dir}/state-{rank}.pt")


def test_replicas_stay_bit_identical(tmp_path):
    states = run_and_collect(_worker, tmp_path, ["state"])["state"]
    assert len(states) == WORLD_SIZE and "tall.weight.int8_codes" in states[0]
    assert_identical(states[0], states[1])
    start = make_tall_wide()
    quantize_model_weights(start, include_head=True)
    assert not torch.equal(states[0]["mid.weight.int8_codes"], start.state_dict()["mid.weight.int8_codes"])
