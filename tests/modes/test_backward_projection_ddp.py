"""``backward_projection=True`` (also with ``step_in_backward``) with ``process_group``: two gloo
processes, half the batch each, all-reduce the projected gradients themselves (no
DistributedDataParallel wrapper) and match one process with the whole batch, in float64, with
bitwise-equal state on both ranks after 100 steps."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from support.distributed_harness import assert_identical, half, run_and_collect
from support.toy import batch, make_model, max_rel_diff, projected_groups
from torch import nn

from lowrank_optim import APOLLOAdamW, DCTProjAdam, GaLoreAdamW, clip_grad_norm_

STEPS = 100
TOLERANCE = 1e-10


def _dct(model, **kwargs):
    return DCTProjAdam(model.named_parameters(), lr=1e-2, rank=4, update_proj_gap=7, residual="none",
                       weight_decay=0.1, backward_projection=True, **kwargs)


def _galore(model, **kwargs):
    return GaLoreAdamW(projected_groups(model, 4, update_proj_gap=7, scale=0.5), lr=1e-2, weight_decay=0.1,
                       backward_projection=True, **kwargs)


def _dct_in_backward(model, **kwargs):
    return DCTProjAdam(model.named_parameters(), lr=1e-2, rank=4, update_proj_gap=7, residual="none",
                       weight_decay=0.1, step_in_backward=True, accumulation_steps=2, **kwargs)


def _galore_in_backward(model, **kwargs):
    return GaLoreAdamW(projected_groups(model, 4, update_proj_gap=7, scale=0.5), lr=1e-2, weight_decay=0.1,
                       step_in_backward=True, accumulation_steps=2, **kwargs)


def _apollo_in_backward(model, **kwargs):
    """APOLLO's update scales the full gradient: its weights' gradients accumulate full-size in the
    window and each hook all-reduces them whole."""
    return APOLLOAdamW(model.named_parameters(), lr=1e-2, rank=4, update_proj_gap=7, weight_decay=0.1,
                       step_in_backward=True, accumulation_steps=2, **kwargs)


SETUPS = {"dct": _dct, "galore": _galore, "dct_in_backward": _dct_in_backward,
          "galore_in_backward": _galore_in_backward, "apollo_in_backward": _apollo_in_backward}
PROJECTING = [name for name in SETUPS if not name.startswith("apollo")]


def _loss(model, step, part=slice(None)):
    tokens = batch(step)[part]
    logits = model(tokens[:, :-1])
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


def _train(model, optimizer, part=slice(None)):
    """STEPS steps, accumulation 2 (the rank's rows split in two), clipping by the library call
    (not under step_in_backward, which steps before a global norm exists: each parameter's
    window is all-reduced in its hook)."""
    sent = []
    for step in range(STEPS):
        rows = list(range(6))[part]
        for micro in (rows[: len(rows) // 2], rows[len(rows) // 2:]):
            (_loss(model, step, micro) * len(micro) / len(rows)).backward()
        if not optimizer.step_in_backward:
            clip_grad_norm_(optimizer, 1.0)
        optimizer.step()
        optimizer.zero_grad()
        sent.append(optimizer.communicated_bytes)
    return sent


def _worker(rank: int, out_dir: str) -> None:
    for name, setup in SETUPS.items():
        model = make_model(seed=3 + rank, dtype=torch.float64)        # different: the optimizer broadcasts
        optimizer = setup(model, process_group=dist.group.WORLD)
        sent = _train(model, optimizer, half(rank, rows=6))
        full = sum(p.numel() * p.element_size() for p in model.parameters())
        torch.save({"params": model.state_dict(), "optimizer": optimizer.state_dict(), "sent": sent,
                    "full": full}, f"{out_dir}/{name}-{rank}.pt")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_and_collect(_worker, tmp_path_factory.mktemp("backward_ddp"), SETUPS)


@pytest.mark.parametrize("name", SETUPS)
def test_two_ranks_with_half_batches_match_one_process(results, name):
    model = make_model(seed=3, dtype=torch.float64)
    _train(model, SETUPS[name](model))
    distributed = make_model(seed=3, dtype=torch.float64)
    distributed.load_state_dict(results[name][0]["params"])
    assert max_rel_diff(distributed, model) < TOLERANCE


@pytest.mark.parametrize("name", SETUPS)
def test_every_rank_holds_the_same_state_after_100_steps(results, name):
    first, second = results[name]
    assert_identical(first["optimizer"], second["optimizer"])
    assert_identical(first["params"], second["params"])


@pytest.mark.parametrize("name", PROJECTING)
def test_ordinary_steps_send_less_than_a_full_all_reduce(results, name):
    """DDP all-reduces every gradient in full; here projected weights send R (m×r) except at their
    staggered refreshes, and the embedding and head (full, plain) dominate this toy."""
    sent, full = results[name][0]["sent"], results[name][0]["full"]
    assert max(sent) == full                                       # the first step: every gradient full
    assert min(sent) < full


def test_apollo_sends_every_gradient_whole(results):
    sent, full = results["apollo_in_backward"][0]["sent"], results["apollo_in_backward"][0]["full"]
    assert min(sent) == max(sent) == full
