"""``APOLLOAdamW`` and ``APOLLOMini``: step by step in float64 against the independent reference
(:class:`~lowrank_optim.reference.ReferenceAPOLLOAdamW`) and the authors' apollo-torch 1.0.3, across
resamples; the DCT variant; what the modes do with an update that scales the full gradient."""
import math
import warnings

import pytest
import torch
from support.apollo_cases import GAP, apollo_params, set_apollo_gradients
from support.oracles import apollo_torch_adamw
from support.toy import loss_of, make_model, max_rel_diff, train, train_in_micro_batches, twin

from lowrank_optim import APOLLOAdamW, APOLLOMini
from lowrank_optim.projectors import random as random_projection
from lowrank_optim.reference import ReferenceAPOLLOAdamW

TOLERANCE = 1e-11        # float64, the same formulas in another association order (a few ulps per step)
CONFIGS = {"channel": dict(scale_type="channel", rank=4, scale=2.0),
           "tensor": dict(scale_type="tensor", rank=4, scale=2.0),
           "mini": dict(scale_type="tensor", rank=1, scale=128.0)}


def _groups(params, config, **extra):
    settings = dict(CONFIGS[config])
    rank = settings.pop("rank")
    return [dict(params=params[:3], rank=rank, update_proj_gap=GAP, **settings, **extra), dict(params=params[3:])]


@pytest.mark.parametrize("basis", ["cached", "generated"])
@pytest.mark.parametrize("limiter", [True, False], ids=["limiter", "no_limiter"])
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("oracle", ["reference", "apollo_torch"])
def test_every_step_agrees_in_float64_across_resamples(oracle, config, limiter, basis):
    ours_params, their_params = apollo_params(), apollo_params()
    ours = APOLLOAdamW(_groups(ours_params, config), lr=1e-2, weight_decay=0.1,
                       norm_growth_limit=1.01 if limiter else None, basis=basis)
    if oracle == "reference":
        theirs = ReferenceAPOLLOAdamW(_groups(their_params, config, proj="random"), lr=1e-2, weight_decay=0.1,
                                      norm_growth_limit=1.01 if limiter else None)
    else:
        theirs = apollo_torch_adamw()(_groups(their_params, config, proj="random", proj_type="std"), lr=1e-2,
                                      weight_decay=0.1,
                                      disable_nl=not limiter)
    for step in range(12):                       # resamples before steps 1, 6, 11
        set_apollo_gradients(ours_params, step)
        set_apollo_gradients(their_params, step)
        ours.step()
        theirs.step()
        for a, b in zip(ours_params, their_params):
            assert (a - b).abs().max() / b.abs().max() < TOLERANCE, f"step {step + 1}"


@pytest.mark.parametrize("basis", ["cached", "generated"])
def test_p_is_drawn_once_per_refresh_when_cached_and_at_every_step_when_generated(monkeypatch, basis):
    draws = []
    monkeypatch.setattr(random_projection, "gaussian_projection",
                        lambda *args: draws.append(args[0]) or random_projection.torch.randn(args[1], args[2]))
    params = apollo_params()
    optimizer = APOLLOAdamW(_groups(params, "channel"), lr=1e-2, basis=basis)
    for step in range(12):                       # refreshes before steps 1, 6, 11
        set_apollo_gradients(params, step)
        optimizer.step()
    projectors = [optimizer.plan_of(p).projector for p in params[:3]]
    if basis == "cached":    # one draw per refresh: the overlap's new P is the projection's, the old one cached
        assert len(draws) == 3 * 3 and all(projector._drawn is not None for projector in projectors)
    else:                    # every step, plus the old P of the two later refreshes for their overlap
        assert len(draws) == 3 * (12 + 2) and all(projector._drawn is None for projector in projectors)
    assert all(0 < float(stats["overlap"]) < 1 for stats in optimizer.refresh_stats.values())


@pytest.mark.parametrize("size, rank", [(24, 4), (10, 9), (64, 1)])
def test_the_overlap_is_that_of_the_orthonormalized_projections(size, rank):
    old = random_projection.gaussian_projection(3, size, rank, "left")
    new = random_projection.gaussian_projection(4, size, rank, "left")
    q_old, q_new = torch.linalg.qr(old.double())[0], torch.linalg.qr(new.double())[0]
    expected = float((q_old.T @ q_new).square().sum() / rank)
    # fp32 Gram of fp32 draws, float64 after: relative error ≲ cond(P)²·2^-24 (cond ≈ 20 at 10×9)
    assert float(random_projection.projection_overlap(old, new)) == pytest.approx(expected, rel=1e-4)
    assert float(random_projection.projection_overlap(old, old)) == pytest.approx(1.0, rel=1e-5)


def test_apollo_mini_is_rank_1_tensor_wise_with_scale_128():
    model = make_model(dtype=torch.float64)
    rows = {row.name: row for row in APOLLOMini(model.named_parameters()).projection_summary()}
    assert rows["up.weight"].projected and rows["up.weight"].rank == 1 and not rows["embed.weight"].projected

    def groups(m, **projected):        # the same positions in both (the seeds follow them)
        weights = [m.up.weight, m.down.weight]
        rest = [p for p in m.parameters() if all(p is not w for w in weights)]
        return [dict(params=weights, **projected), dict(params=rest, rank=None)]

    reference_model = twin(model)
    optimizer = APOLLOMini(groups(model, rank=1), lr=1e-3)
    group = optimizer.param_groups[0]
    assert (group["scale_type"], group["scale"], group["rank"]) == ("tensor", 128.0, 1)
    reference = ReferenceAPOLLOAdamW(groups(reference_model, rank=1, scale_type="tensor", scale=128.0), lr=1e-3)
    train(model, optimizer, 4)
    train(reference_model, reference, 4)
    assert max_rel_diff(model, reference_model) < 1e-10


def test_the_state_is_a_seed_not_a_matrix_and_loads_with_weights_only(tmp_path):
    model = make_model()
    optimizer = APOLLOAdamW(model.named_parameters(), lr=1e-3, rank=4)
    train(model, optimizer, 2)
    state = optimizer.state[model.up.weight]
    assert set(state) == {"step", "exp_avg", "exp_avg_sq", "proj_seed", "limiter_norm"}
    assert state["proj_seed"].dtype == torch.int64 and state["proj_seed"].ndim == 0
    torch.save(optimizer.state_dict(), tmp_path / "state.pt")
    restored = APOLLOAdamW(twin(model).named_parameters(), lr=1e-3, rank=4)
    restored.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))


@pytest.mark.parametrize("moments", ["keep", "transport"])
def test_the_dct_variant_selects_columns_and_transports_exactly(moments):
    model = make_model()
    optimizer = APOLLOAdamW(model.named_parameters(), lr=1e-3, rank=4, proj="dct", update_proj_gap=2,
                            moments=moments)
    losses = train(model, optimizer, 6)
    assert all(math.isfinite(loss) for loss in losses)
    assert optimizer.state[model.up.weight]["proj_indices"].shape == (4,)


def test_backward_projection_is_refused_by_name_and_step_in_backward_accumulates_the_full_gradient():
    with pytest.raises(ValueError, match=r"up\.weight .*update_rule='apollo' needs each step's full gradient"):
        APOLLOAdamW(make_model().named_parameters(), rank=4, backward_projection=True)
    standard, in_backward = make_model(dtype=torch.float64), make_model(dtype=torch.float64)
    reference = APOLLOAdamW(standard.named_parameters(), lr=1e-2, rank=4, update_proj_gap=3)
    reference.stagger_refreshes(True)
    train_in_micro_batches(standard, reference, 7, 2)
    optimizer = APOLLOAdamW(in_backward.named_parameters(), lr=1e-2, rank=4, update_proj_gap=3,
                            step_in_backward=True, accumulation_steps=2)
    train_in_micro_batches(in_backward, optimizer, 7, 2)
    assert max_rel_diff(in_backward, standard) < 1e-12


def _mini_with_the_head_at_rank_1(model, **kwargs):
    """The 7B memory recipe of ``docs/apollo.md`` (2.079 B/param): the head in a param group of its own
    at rank 1, the rest under APOLLO-Mini's own rule, 8-bit moments."""
    named = list(model.named_parameters())
    head = [(name, p) for name, p in named if name.startswith("head")]
    rest = [(name, p) for name, p in named if not name.startswith("head")]
    return APOLLOMini([{"params": head, "rank": 1}, {"params": rest}], lr=1e-2, update_proj_gap=3, moment_bits=8,
                      **kwargs)


# With the head in its own group, the toy's rest ends with its only down weight, whose shape the rule
# cannot tell from an output head's (a LLaMA ends with a down_proj shaped like the others: no warning).
@pytest.mark.filterwarnings("ignore:APOLLOMini. cannot tell from its shape")
def test_the_7b_memory_recipe_steps_in_backward_exactly_as_the_standard_loop():
    """Head at rank 1 (a ``k×1`` moment pair and a seed), the embedding's moments in 8 bits, every
    parameter stepped in its gradient hook: bit for bit the standard loop over 7 steps (2 resamples)."""
    standard, in_backward = make_model(vocab=512), make_model(vocab=512)
    train_in_micro_batches(standard, _mini_with_the_head_at_rank_1(standard), 7, 1)
    optimizer = _mini_with_the_head_at_rank_1(in_backward, step_in_backward=True)
    train_in_micro_batches(in_backward, optimizer, 7, 1)
    assert max_rel_diff(in_backward, standard) == 0.0
    head, embedding = optimizer.state[in_backward.head.weight], optimizer.state[in_backward.embed.weight]
    assert head["exp_avg"].shape == head["exp_avg_sq"].shape == (512, 1) and "proj_seed" in head
    assert embedding["exp_avg_codes"].dtype == embedding["exp_avg_sq_codes"].dtype == torch.uint8


@pytest.mark.parametrize("kwargs, message", [
    (dict(scale_type="row"), r"Invalid scale_type: 'row' \(expected one of 'channel', 'tensor'\)"),
    (dict(norm_growth_limit=0.5), r"Invalid norm_growth_limit: 0\.5"),
    (dict(seed=-1), r"Invalid seed: -1"),
    (dict(proj="svd"), r"Invalid proj: 'svd' \(expected one of 'random', 'dct'\)"),
    (dict(moments="transport"), r"Invalid moments: 'transport' with proj='random'"),
])
def test_bad_settings_are_refused_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        APOLLOAdamW(make_model().parameters(), **kwargs)


def test_an_update_rule_of_another_optimizer_is_refused_and_dct_adam_can_run_apollo():
    from lowrank_optim import DCTProjAdam

    with pytest.raises(ValueError, match=r"Invalid update_rule: 'adamw'"):
        APOLLOAdamW([{"params": [torch.nn.Parameter(torch.randn(8, 8))], "update_rule": "adamw"}])
    model = make_model()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optimizer = DCTProjAdam(model.named_parameters(), rank=4, update_rule="apollo", residual="none")
    train(model, optimizer, 3)
    assert "limiter_norm" in optimizer.state[model.up.weight]
    loss_of(model, 0)
