"""ReferenceAPOLLOAdamW against its two peers, step by step in float64.

apollo-torch 1.0.3 (the authors' code, behind the paper's tables) must agree with the reference to rounding
at every step: weights, moments, the projection and the limiter's norm. Where a peer departs from the
reference (or the reference's paper mode from apollo-torch), a test states the difference and asserts it.
experiments/results/APOLLO_DIFFERENCES.md lists every difference.
"""
import io
import math

import pytest
import torch
from support.apollo_cases import GAP, STEPS, apollo_gradient, apollo_params, set_apollo_gradients
from support.oracles import (
    apollo_torch_adamw,
    apollo_torch_projector,
    pytorch_optimizer_apollo,
    pytorch_optimizer_galore_projector,
)
from support.toy import make_model, max_rel_diff, train, twin

from lowrank_optim.reference import ReferenceAPOLLOAdamW
from lowrank_optim.reference.apollo import next_projection_seed, projection_seed, random_projection

# Same float64 formulas in a different association order (e.g. (η_t·√α)·U against η_t·(U·√α)):
# differences are a few ulps per step; 1e-11 leaves room for 12 steps and catches any real difference
# (the smallest one below, ε placement, is 1e-4 relative).
TOLERANCE = 1e-11
CONFIGS = {   # (scale_type, rank, scale)
    "channel": ("channel", 4, 2.0),
    "tensor": ("tensor", 4, 2.0),
    "mini": ("tensor", 1, 128.0),
}


def _rel(a, b):
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def _groups(params, rank, scale_type, scale, proj_type="std", gap=GAP):
    matrices = [p for p in params if p.ndim == 2]
    others = [p for p in params if p.ndim != 2]
    group = dict(params=matrices, rank=rank, proj="random", scale_type=scale_type, scale=scale,
                 update_proj_gap=gap, proj_type=proj_type)
    return [group, dict(params=others)] if others else [group]


def _pair(config, limiter, weight_decay=0.1, proj_type="std", lr=1e-2):
    oracle_cls = apollo_torch_adamw()
    scale_type, rank, scale = CONFIGS[config]
    ours_params, oracle_params = apollo_params(), apollo_params()
    ours = ReferenceAPOLLOAdamW(_groups(ours_params, rank, scale_type, scale, proj_type), lr=lr,
                                weight_decay=weight_decay, norm_growth_limit=1.01 if limiter else None)
    oracle = oracle_cls(_groups(oracle_params, rank, scale_type, scale, proj_type), lr=lr,
                        weight_decay=weight_decay, disable_nl=not limiter)
    return ours, ours_params, oracle, oracle_params


def _oracle_matrix(projector, shape):
    """apollo-torch's ``ortho_matrix`` as the reference's P (rank×compressed dimension)."""
    matrix = projector.ortho_matrix
    return matrix.T if matrix.shape[0] == shape[0] and matrix.shape[1] != shape[1] else matrix


# --- apollo-torch 1.0.3: agreement -------------------------------------------------------------------


@pytest.mark.parametrize("limiter", [True, False], ids=["limiter", "no-limiter"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_step_by_step_agreement_with_apollo_torch(config, limiter):
    ours, ours_params, oracle, oracle_params = _pair(config, limiter)
    for step in range(STEPS):
        set_apollo_gradients(ours_params, step)
        set_apollo_gradients(oracle_params, step)
        ours.step()
        oracle.step()
        for p, q in zip(ours_params, oracle_params):
            assert _rel(p.detach(), q.detach()) < TOLERANCE, (step, tuple(p.shape))
            mine, theirs = ours.state[p], oracle.state[q]
            assert _rel(mine["m"], theirs["exp_avg"]) < TOLERANCE
            assert _rel(mine["v"], theirs["exp_avg_sq"]) < TOLERANCE
            if p.ndim == 2:
                assert torch.equal(mine["P"], _oracle_matrix(theirs["projector"], p.shape))
                if limiter:
                    assert float(mine["limiter_norm"]) == pytest.approx(float(theirs["scaled_grad"]), rel=TOLERANCE)
    # two refreshes happened, with new matrices: the agreement crossed them
    first = ours.state[ours_params[0]]
    assert first["seed"] == projection_seed(1, 2) != projection_seed(1, 1)
    # the runs moved
    assert max(_rel(p.detach(), q) for p, q in zip(ours_params, apollo_params())) > 1e-2


@pytest.mark.parametrize("config", list(CONFIGS))
def test_the_limiter_changes_these_trajectories(config):
    """The limiter fires on the swinging gradients, so the limiter-on agreement above is not vacuous."""
    with_limiter, with_params, _, _ = _pair(config, True)
    without, without_params, _, _ = _pair(config, False)
    for step in range(STEPS):
        set_apollo_gradients(with_params, step)
        set_apollo_gradients(without_params, step)
        with_limiter.step()
        without.step()
    for p, q, p0 in zip(with_params, without_params, apollo_params()):
        if p.ndim == 2:   # the displacements differ by 4 to 20 % here
            assert _rel(p - p0, q - p0) > 0.02


def test_same_trajectory_as_apollo_torch_on_a_model():
    """Gradients that depend on the weights: any step's difference would grow over 20 steps."""
    oracle_cls = apollo_torch_adamw()
    ours_model = make_model(dtype=torch.float64)
    oracle_model = twin(ours_model)

    def groups(model):
        matrices = [p for p in model.parameters() if p.ndim == 2]
        return [dict(params=matrices, rank=4, proj="random", scale_type="channel", scale=1.0,
                     update_proj_gap=7, proj_type="std"),
                dict(params=[p for p in model.parameters() if p.ndim != 2])]

    ours = ReferenceAPOLLOAdamW(groups(ours_model), lr=3e-3, weight_decay=0.1)
    oracle = oracle_cls(groups(oracle_model), lr=3e-3, weight_decay=0.1)
    ours_losses = train(ours_model, ours, 20)
    oracle_losses = train(oracle_model, oracle, 20)
    assert max_rel_diff(ours_model, oracle_model) < 1e-9
    assert ours_losses == pytest.approx(oracle_losses, rel=1e-12)
    assert max_rel_diff(ours_model, make_model(dtype=torch.float64)) > 1e-2


def test_projection_rule_is_apollo_torchs():
    """The documented rule, checked against apollo-torch's own helpers, for both sides and a float32 grad."""
    projector = apollo_torch_projector()
    seed = 3
    for _ in range(3):
        assert next_projection_seed(seed) == projector.next_seed(seed)
        seed = next_projection_seed(seed)
    for shape, side in (((24, 10), "right"), ((10, 24), "left")):
        grad = torch.zeros(shape)
        theirs = projector.GradientProjector(4, proj_type="std", seed=seed).get_orthogonal_matrix(
            grad, 4, type=side, seed=seed)
        ours = random_projection(10, 4, side, seed, torch.float32)
        assert torch.equal(ours, theirs.T if side == "left" else theirs)


def test_reference_draws_nothing_from_the_global_random_state():
    params = apollo_params()
    ours = ReferenceAPOLLOAdamW(_groups(params, 4, "channel", 1.0), lr=1e-2)
    before = torch.get_rng_state()
    for step in range(STEPS):
        set_apollo_gradients(params, step)
        ours.step()
    assert torch.equal(before, torch.get_rng_state())


# --- apollo-torch 1.0.3: differences, stated and asserted ----------------------------------------------


def test_reverse_std_tensor_agrees_but_reverse_std_channel_crashes_apollo_torch():
    """apollo-torch picks the channel dimension from G's shape (apollo.py:132), not from the projected side:
    with "reverse_std" (or a forced "left"/"right" against the shape) the factors have the rank's length
    and do not broadcast against G. The reference scales along the dimension that is not compressed."""
    ours, ours_params, oracle, oracle_params = _pair("tensor", True, proj_type="reverse_std")
    for step in range(STEPS):
        set_apollo_gradients(ours_params, step)
        set_apollo_gradients(oracle_params, step)
        ours.step()
        oracle.step()
    for p, q in zip(ours_params, oracle_params):
        assert _rel(p.detach(), q.detach()) < TOLERANCE

    ours, ours_params, oracle, oracle_params = _pair("channel", True, proj_type="reverse_std")
    set_apollo_gradients(ours_params, 0)
    set_apollo_gradients(oracle_params, 0)
    ours.step()
    with pytest.raises(RuntimeError, match="must match the size"):
        oracle.step()


def _one_param_run(bias_correction, limiter, eps, steps, constant=False):
    """apollo-torch and the reference on one tall matrix, one subspace; per step, both updates' norms."""
    oracle_cls = apollo_torch_adamw()
    ours_p, oracle_p = apollo_params([(24, 10)], bias=False), apollo_params([(24, 10)], bias=False)
    ours = ReferenceAPOLLOAdamW(_groups(ours_p, 4, "tensor", 1.0, gap=100), lr=1e-2, eps=eps,
                                norm_growth_limit=1.01 if limiter else None, bias_correction=bias_correction)
    oracle = oracle_cls(_groups(oracle_p, 4, "tensor", 1.0, gap=100), lr=1e-2, eps=eps, disable_nl=not limiter)
    ours_norms, oracle_norms = [], []
    for step in range(steps):
        before = (ours_p[0].detach().clone(), oracle_p[0].detach().clone())
        grad = apollo_gradient((24, 10), 0 if constant else step, 0)
        ours_p[0].grad, oracle_p[0].grad = grad.clone(), grad.clone()
        ours.step()
        oracle.step()
        ours_norms.append(float((ours_p[0].detach() - before[0]).norm()))
        oracle_norms.append(float((oracle_p[0].detach() - before[1]).norm()))
    return ours_p[0].detach(), oracle_p[0].detach(), ours_norms, oracle_norms


def test_paper_bias_correction_differs_from_apollo_torch_only_by_eps_and_the_limiter():
    """The paper's Ñ = M̂/(√V̂+ε) against apollo-torch's M/(√V+ε) with the correction in the step size
    (apollo.py:154-163). Without ε and without the limiter they are the same update."""
    ours, oracle, _, _ = _one_param_run("moments", limiter=False, eps=0.0, steps=STEPS)
    assert _rel(ours, oracle) < TOLERANCE
    # ε: the paper adds it to √V̂, apollo-torch to √V (an ε of ε·√(1−β₂ᵗ) in the paper's terms)
    ours, oracle, _, _ = _one_param_run("moments", limiter=False, eps=1e-3, steps=STEPS)
    assert _rel(ours, oracle) > 1e-6


def test_apollo_torch_limiter_sees_the_uncorrected_update():
    """apollo-torch limits G·s before the bias correction's step size (apollo.py:187-206): with a constant
    gradient its M/√V grows as (1−β₁ᵗ)/√(1−β₂ᵗ) (×1.34 from step 1 to 2), so the limiter fires from step 2
    and damps the first steps. On the paper's bias-corrected Ñ the same gradient gives a constant update
    norm and the limiter never fires."""
    _, _, paper_norms, oracle_norms = _one_param_run("moments", limiter=True, eps=0.0, steps=8, constant=True)
    _, _, _, unlimited_norms = _one_param_run("moments", limiter=False, eps=0.0, steps=8, constant=True)
    assert paper_norms == pytest.approx([paper_norms[0]] * 8, rel=1e-9)
    assert unlimited_norms == pytest.approx(paper_norms, rel=1e-9)   # the paper's limiter did nothing
    assert oracle_norms[0] == pytest.approx(paper_norms[0], rel=1e-9)
    assert oracle_norms[1] < 0.8 * paper_norms[1]                      # apollo-torch's did
    step_run, oracle_again, _, _ = _one_param_run("step", limiter=True, eps=0.0, steps=8, constant=True)
    assert _rel(step_run, oracle_again) < TOLERANCE                    # and the default follows apollo-torch


def test_moments_reset_is_an_option_apollo_torch_does_not_have():
    """apollo-torch keeps M and V across a refresh although they then describe the old random subspace."""
    ours, ours_params, oracle, oracle_params = _pair("channel", False)
    params = apollo_params()
    reset = ReferenceAPOLLOAdamW(_groups(params, 4, "channel", 2.0), lr=1e-2, weight_decay=0.1,
                                 norm_growth_limit=None, moments="reset")
    for step in range(GAP + 1):
        for ps in (ours_params, oracle_params, params):
            set_apollo_gradients(ps, step)
        ours.step()
        oracle.step()
        reset.step()
    assert _rel(ours.state[ours_params[0]]["m"], oracle.state[oracle_params[0]]["exp_avg"]) < TOLERANCE
    assert _rel(reset.state[params[0]]["m"], oracle.state[oracle_params[0]]["exp_avg"]) > 1e-2


def _exact_factor_steps(weight, gradients, scale_type, lr=1e-2, betas=(0.9, 0.999), eps=1e-6):
    """APOLLO's rule written out with AdamW's own (full) moments: the factor s from Ñ and G themselves."""
    weight, m, v = weight.clone(), torch.zeros_like(weight), torch.zeros_like(weight)
    columns = weight.shape[0] < weight.shape[1]       # "std": a wide G is compressed on the left
    for t, grad in enumerate(gradients, start=1):
        m = betas[0] * m + (1 - betas[0]) * grad
        v = betas[1] * v + (1 - betas[1]) * grad**2
        normalized = m / (v.sqrt() + eps)
        if scale_type == "tensor":
            factor = normalized.norm() / (grad.norm() + 1e-8)
        else:
            dim = 0 if columns else 1
            factor = normalized.norm(dim=dim, keepdim=True) / (grad.norm(dim=dim, keepdim=True) + 1e-8)
        weight = weight - lr * math.sqrt(1 - betas[1]**t) / (1 - betas[0]**t) * factor * grad
    return weight


@pytest.mark.parametrize("shape", [(6, 10), (10, 6)], ids=["wide", "tall"])
@pytest.mark.parametrize("scale_type", ["channel", "tensor"])
def test_identity_projection_scales_by_the_exact_factor_of_full_moments(scale_type, shape):
    """proj="identity" (a diagnostic): R = G whatever the rank, so the moments are AdamW's own and s is the
    exact factor a random P estimates; resampling every 3 steps changes nothing."""
    generator = torch.Generator().manual_seed(3)
    start = torch.randn(shape, generator=generator, dtype=torch.float64)
    gradients = [torch.randn(shape, generator=generator, dtype=torch.float64) for _ in range(8)]
    weight = torch.nn.Parameter(start.clone())
    optimizer = ReferenceAPOLLOAdamW([dict(params=[weight], rank=2, update_proj_gap=3)], lr=1e-2, proj="identity",
                                     scale_type=scale_type, norm_growth_limit=None)
    for grad in gradients:
        weight.grad = grad.clone()
        optimizer.step()
    assert _rel(weight, _exact_factor_steps(start, gradients, scale_type)) < TOLERANCE
    assert torch.equal(optimizer.state[weight]["P"], torch.eye(min(shape), dtype=torch.float64))


@pytest.mark.parametrize(("key", "value"), [("proj", "svd"), ("scale_type", "row"), ("proj_type", "up"),
                                            ("bias_correction", "none"), ("moments", "zero")])
def test_an_unknown_choice_is_refused_by_name_as_a_default_and_in_a_group(key, value):
    """Also in a param group of its own, where the reference would otherwise fall back without a word."""
    weight = torch.nn.Parameter(torch.zeros(2, 3))
    with pytest.raises(ValueError, match=f"Invalid {key}: '{value}' \\(expected one of ") as error:
        ReferenceAPOLLOAdamW([weight], **{key: value})
    assert (error.value.key, error.value.value) == (key, value)     # the training script names its flag
    optimizer = ReferenceAPOLLOAdamW([weight])
    with pytest.raises(ValueError, match=f"Invalid {key}: '{value}' \\(expected one of "):
        optimizer.add_param_group(dict(params=[torch.nn.Parameter(torch.zeros(2, 3))], rank=1, **{key: value}))
    assert len(optimizer.param_groups) == 1


def test_a_norm_growth_limit_below_one_is_refused():
    with pytest.raises(ValueError, match="norm_growth_limit must be None or >= 1, got 0.5"):
        ReferenceAPOLLOAdamW([dict(params=[torch.nn.Parameter(torch.zeros(2, 3))], norm_growth_limit=0.5)])


def _loads_weights_only(optimizer) -> bool:
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    try:
        torch.load(buffer, weights_only=True)
    except Exception:  # noqa: BLE001 - torch raises UnpicklingError (or a RuntimeError wrapping it)
        return False
    return True


def test_state_loads_weights_only_unlike_both_peers():
    """Both peers keep a projector object in the state; the reference keeps tensors and ints."""
    ours, ours_params, oracle, oracle_params = _pair("channel", True)
    peer_params = apollo_params()
    peer = pytorch_optimizer_apollo()(_pytorch_optimizer_groups(peer_params, "channel"), lr=1e-2)
    for step in range(2):
        for ps in (ours_params, oracle_params, peer_params):
            set_apollo_gradients(ps, step)
        ours.step()
        oracle.step()
        peer.step()
    assert _loads_weights_only(ours)
    assert not _loads_weights_only(oracle)
    assert not _loads_weights_only(peer)


# --- pytorch-optimizer's APOLLO -------------------------------------------------------------------------


def _pytorch_optimizer_groups(params, scale_type, rank=4, scale=2.0):
    matrices = [p for p in params if p.ndim == 2]
    return [dict(params=matrices, rank=rank, update_proj_gap=GAP, scale=scale, projection_type="std",
                 scale_type=scale_type),
            dict(params=[p for p in params if p.ndim != 2])]


@pytest.fixture
def injected_projection(monkeypatch):
    """pytorch-optimizer draws P from the global RNG (galore.py:89-90); here its projector gets the
    reference's seeded matrix for one parameter (first seed 1) instead, and the 1-based steps of its
    refreshes are recorded."""
    projector_cls = pytorch_optimizer_galore_projector()
    refreshes = []

    def get_orthogonal_matrix(self, weights, projection_type, from_random_matrix=False):
        assert from_random_matrix
        refreshes.append(self._current_step)
        size = weights.shape[0] if projection_type == "left" else weights.shape[1]
        matrix = random_projection(size, self.rank, projection_type, projection_seed(1, len(refreshes) - 1),
                                   weights.dtype)
        return matrix.T.clone() if projection_type == "left" else matrix

    original_project = projector_cls.project

    def project(self, grad, num_steps, *args, **kwargs):
        self._current_step = num_steps
        return original_project(self, grad, num_steps, *args, **kwargs)

    monkeypatch.setattr(projector_cls, "get_orthogonal_matrix", get_orthogonal_matrix)
    monkeypatch.setattr(projector_cls, "project", project)
    return refreshes


def _single_matrix_pair(shape, scale_type, scale=2.0):
    ours_p, peer_p = apollo_params([shape], bias=False), apollo_params([shape], bias=False)
    ours = ReferenceAPOLLOAdamW(_groups(ours_p, 4, scale_type, scale), lr=1e-2)
    peer = pytorch_optimizer_apollo()(_pytorch_optimizer_groups(peer_p, scale_type, scale=scale)[:1], lr=1e-2)
    return ours, ours_p[0], peer, peer_p[0]


def test_pytorch_optimizer_plain_params_agree_and_decay_by_the_corrected_step():
    """Parameters outside a rank group: the same AdamW step by step when there is no decay. With decay,
    pytorch-optimizer multiplies by 1 − η_t·λ with η_t the bias-corrected step size (apollo.py:433-441,
    lr=step_size); the reference (and apollo-torch) subtracts η·λ·W. Checked at step 1, η_1 = 0.316·η."""
    peer_cls = pytorch_optimizer_apollo()

    def fresh():
        return [torch.nn.Parameter(torch.linspace(-1, 1, 7, dtype=torch.float64))]

    ours_p, peer_p = fresh(), fresh()
    ours = ReferenceAPOLLOAdamW(ours_p, lr=1e-2)
    peer = peer_cls(peer_p, lr=1e-2, foreach=False)
    for step in range(STEPS):
        ours_p[0].grad, peer_p[0].grad = apollo_gradient((7,), step, 0), apollo_gradient((7,), step, 0)
        ours.step()
        peer.step()
        assert _rel(ours_p[0].detach(), peer_p[0].detach()) < TOLERANCE

    bare_p, ours_p, peer_p = fresh(), fresh(), fresh()
    decay, lr = 0.1, 1e-2
    optimizers = [ReferenceAPOLLOAdamW(bare_p, lr=lr), ReferenceAPOLLOAdamW(ours_p, lr=lr, weight_decay=decay),
                  peer_cls(peer_p, lr=lr, weight_decay=decay, foreach=False)]
    for ps, optimizer in zip((bare_p, ours_p, peer_p), optimizers):
        ps[0].grad = apollo_gradient((7,), 0, 0)
        optimizer.step()
    bare = bare_p[0].detach()
    step_size = lr * math.sqrt(1 - 0.999) / (1 - 0.9)
    assert _rel(ours_p[0].detach(), bare * (1 - lr * decay)) < TOLERANCE
    assert _rel(peer_p[0].detach(), bare * (1 - step_size * decay)) < TOLERANCE
    assert _rel(peer_p[0].detach(), ours_p[0].detach()) > 1e-4


def test_pytorch_optimizer_refreshes_one_step_early(injected_projection):
    """pytorch-optimizer counts steps per group after the increment (apollo.py:324, 383): it refreshes
    before steps 1, gap, 2·gap (the first subspace serves gap − 1 steps); apollo-torch and the reference
    before steps 1, gap+1, 2·gap+1. The moments agree until the peer's early refresh."""
    ours, p, peer, q = _single_matrix_pair((24, 10), "channel")
    for step in range(STEPS):
        p.grad, q.grad = apollo_gradient(p.shape, step, 0), apollo_gradient(q.shape, step, 0)
        ours.step()
        peer.step()
        moments_agree = _rel(ours.state[p]["m"], peer.state[q]["exp_avg"]) < TOLERANCE
        assert moments_agree == (step + 1 < GAP), step + 1
    assert injected_projection == [1, GAP, 2 * GAP]
    assert ours.state[p]["seed"] == projection_seed(1, 2)   # the reference refreshed at 1, 6, 11: twice too


@pytest.mark.parametrize("shape", [(24, 10), (10, 24)], ids=["right", "left"])
@pytest.mark.parametrize("scale_type", ["channel", "tensor"])
def test_pytorch_optimizer_scales_the_projected_gradient_and_projects_back(injected_projection, shape, scale_type):
    """pytorch-optimizer multiplies the projected R (not G) by the factors (apollo.py:411), limits that,
    multiplies by √α, and projects back through P with GaLore's ``scale`` (galore.py:200-205): its update
    is α^{3/2}·η_t·Pᵀ(R·s) (left) or (R·s)·P (right), of rank ≤ r. The paper, apollo-torch and the reference
    update with √α·η_t·G·s, of full rank. Same P, same moments and factors: checked at step 1."""
    alpha = 2.0
    ours, p, peer, q = _single_matrix_pair(shape, scale_type, scale=alpha)
    start = q.detach().clone()
    grad = apollo_gradient(shape, 0, 0)
    p.grad, q.grad = grad.clone(), grad.clone()
    ours.step()
    peer.step()
    state = ours.state[p]
    projection, side = state["P"], "left" if shape[0] < shape[1] else "right"
    low_rank = projection @ grad if side == "left" else grad @ projection.T
    normalized = state["m"] / (state["v"].sqrt() + 1e-6)
    if scale_type == "tensor":
        factors = normalized.norm() / (low_rank.norm() + 1e-8)
    else:
        dim = 0 if side == "left" else 1
        factors = (normalized.norm(dim=dim) / (low_rank.norm(dim=dim) + 1e-8)).unsqueeze(dim)
    step_size = 1e-2 * math.sqrt(1 - 0.999) / (1 - 0.9)
    back = projection.T @ (low_rank * factors) if side == "left" else (low_rank * factors) @ projection
    peer_update = start - q.detach()
    ours_update = start - p.detach()
    assert _rel(peer_update, step_size * alpha**1.5 * back) < TOLERANCE
    assert _rel(ours_update, step_size * math.sqrt(alpha) * grad * factors) < TOLERANCE
    assert torch.linalg.matrix_rank(peer_update) == 4
    assert torch.linalg.matrix_rank(ours_update) == min(shape)


def test_pytorch_optimizer_draws_its_projection_from_the_global_random_state():
    """Unseeded torch.randn of both an m×r and an r×n matrix at every refresh (galore.py:89-90): it moves
    the global RNG (and so dropout and data order) and differs between runs that seed it differently."""
    peer_cls = pytorch_optimizer_apollo()
    matrices = []
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)
        q = apollo_params([(24, 10)], bias=False)
        peer = peer_cls(_pytorch_optimizer_groups(q, "channel")[:1], lr=1e-2)
        q[0].grad = apollo_gradient((24, 10), 0, 0)
        before = torch.get_rng_state()
        peer.step()
        assert not torch.equal(before, torch.get_rng_state())
        matrices.append(peer.state[q[0]]["projector"].ortho_matrix.clone())
    assert not torch.equal(matrices[0], matrices[1])
