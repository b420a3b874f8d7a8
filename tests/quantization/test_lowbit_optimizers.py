"""``moment_bits`` (8 / 4) in the optimizers: what is stored, how it trains against float moments,
bytes, bit-identical resume across refreshes, stochastic rounding of bf16 weights, refusals.

The scheme itself (maps, blocks, the fused update, slot remaps) is tested against its float64
reference in tests/quantization/test_quantization_*.py."""
import pytest
import torch
from support.toy import make_model, projected_groups, train, twin

from lowrank_optim import DCTProjAdam, GaLoreAdamW, GaLoreAdamW8bit, SSTAdamW, convert_to_sst, optimizer_state_bytes

# Wide enough that embedding, head and the projected moments (1100×4 right, 4×1100 left) reach
# the 4096 values from which moments are quantized.
WIDE = dict(vocab=300, d=16, hidden=1100)


def _dct(model, **kwargs):
    return DCTProjAdam(model.named_parameters(), lr=3e-3, rank=4, update_proj_gap=3, **kwargs)


def _galore(model, **kwargs):
    return GaLoreAdamW(projected_groups(model, 4, update_proj_gap=3), lr=3e-3, **kwargs)


BUILDS = {"dct": _dct, "galore": _galore, "galore_transport": lambda m, **kw: _galore(m, moments="transport", **kw)}


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("name", list(BUILDS))
def test_projected_and_plain_moments_are_quantized(name, bits):
    model = make_model(**WIDE)
    optimizer = BUILDS[name](model, moment_bits=bits)
    train(model, optimizer, 1)
    for param in (model.up.weight, model.down.weight, model.embed.weight, model.head.weight):
        state = optimizer.state[param]
        assert {"exp_avg_codes", "exp_avg_scales", "exp_avg_sq_codes", "exp_avg_sq_scales"} <= set(state)
        assert "exp_avg" not in state and state["exp_avg_codes"].dtype == torch.uint8
    assert "exp_avg" in optimizer.state[model.norm.weight]          # 16 values: stays in float


@pytest.mark.parametrize("bits, loss_tolerance, path_tolerance", [(8, 0.002, 0.15), (4, 0.01, 0.7)])
@pytest.mark.parametrize("name", list(BUILDS))
def test_low_bit_training_tracks_float_moments(name, bits, loss_tolerance, path_tolerance):
    """Over 20 steps: mean loss within 0.2% (8-bit) / 1% (4-bit) of float moments, and the distance
    between the two runs' parameters, relative to how far float moments moved them, below 15% /
    70% (measured 2.3% / 45% for the DCT, 8.9% at 8 bits for GaLore, whose SVD refreshes follow the
    perturbed weights; a 4-bit first moment has 16 levels per block)."""
    start, float_model, low_model = make_model(**WIDE), make_model(**WIDE), make_model(**WIDE)
    reference = sum(train(float_model, BUILDS[name](float_model), 20)) / 20
    low = sum(train(low_model, BUILDS[name](low_model, moment_bits=bits), 20)) / 20
    assert abs(low - reference) < loss_tolerance * reference
    apart = _distance(low_model, float_model) / _distance(float_model, start)
    assert apart < path_tolerance, apart


def _distance(a, b) -> float:
    return float(sum((p.detach().double() - q.detach().double()).square().sum()
                     for p, q in zip(a.parameters(), b.parameters())).sqrt())


def test_eight_bit_projected_moments_take_at_most_027_of_fp32():
    """The issue's 4096×1024 weight at rank 256: moments 4096×256, one fp32 scale per 256 codes."""
    weight = torch.nn.Parameter(torch.zeros(4096, 1024))
    sizes = {}
    for bits in (None, 8):
        optimizer = DCTProjAdam([{"params": [weight], "rank": 256}], moment_bits=bits, residual="none")
        expected = optimizer.projection_summary().state_bytes
        weight.grad = torch.randn(4096, 1024, generator=torch.Generator().manual_seed(0))
        optimizer.step()
        assert optimizer_state_bytes(optimizer) == expected
        sizes[bits] = expected - 256 * 8                          # less the indices
    assert sizes[None] == 2 * 4096 * 256 * 4
    assert sizes[8] <= 0.27 * sizes[None]


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("name", list(BUILDS))
def test_resume_across_refreshes_is_bit_identical(tmp_path, name, bits):
    model = make_model(**WIDE)
    optimizer = BUILDS[name](model, moment_bits=bits)
    train(model, optimizer, 4)                                     # refreshes at steps 0 and 3
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, tmp_path / "ckpt.pt")
    train(model, optimizer, 5, start=4)                            # crosses the refresh at 6

    restored_model = make_model(seed=7, **WIDE)
    restored = BUILDS[name](restored_model, moment_bits=bits)
    checkpoint = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    restored_model.load_state_dict(checkpoint["model"])
    restored.load_state_dict(checkpoint["optimizer"])
    assert restored.state[restored_model.up.weight]["exp_avg_codes"].dtype == torch.uint8
    train(restored_model, restored, 5, start=4)
    for p, q in zip(model.parameters(), restored_model.parameters()):
        assert torch.equal(p, q)
    for p, q in zip(model.parameters(), restored_model.parameters()):
        for key, value in optimizer.state[p].items():
            assert torch.equal(torch.as_tensor(restored.state[q][key]), torch.as_tensor(value)), key


def test_galore_8bit_takes_galore_torchs_constructor():
    model = make_model(**WIDE)
    groups = [{"params": [model.up.weight, model.down.weight], "rank": 4, "update_proj_gap": 3, "scale": 0.25,
               "proj_type": "std"}, {"params": [p for n, p in model.named_parameters() if n not in
                                                ("up.weight", "down.weight")]}]
    optimizer = GaLoreAdamW8bit(groups, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False,
                                optim_bits=32, args=None, min_8bit_size=4096, percentile_clipping=100,
                                block_wise=True, is_paged=False)
    assert optimizer.defaults["moment_bits"] == 8 and optimizer.defaults["weight_decay"] == 1e-2
    train(model, optimizer, 2)
    assert optimizer.state[model.up.weight]["exp_avg_codes"].dtype == torch.uint8
    with pytest.raises(ValueError, match=r"Invalid percentile_clipping: 50 \(GaLoreAdamW8bit supports only 100\)"):
        GaLoreAdamW8bit(groups, percentile_clipping=50)


def test_sst_quantizes_its_factors_and_resumes(tmp_path):
    def build(seed=0):
        model = convert_to_sst(make_model(seed=seed, **WIDE), rank=4, target_modules=("up", "down"))
        return model, SSTAdamW(model.parameters(), lr=1e-2, update_interval=2, moment_bits=8)

    model, optimizer = build()
    train(model, optimizer, 3)
    layer = model.up
    assert optimizer.state[layer.U_active]["exp_avg_codes"].dtype == torch.uint8       # 1100×4 columns
    assert "exp_avg" in optimizer.state[layer.s]                                        # 16 values: float
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, tmp_path / "sst.pt")
    train(model, optimizer, 3, start=3)
    restored_model, restored = build(seed=5)
    checkpoint = torch.load(tmp_path / "sst.pt", weights_only=True)
    restored_model.load_state_dict(checkpoint["model"])
    restored.load_state_dict(checkpoint["optimizer"])
    train(restored_model, restored, 3, start=3)
    for p, q in zip(model.parameters(), restored_model.parameters()):
        assert torch.equal(p, q)


def test_stochastic_rounding_keeps_updates_below_half_an_ulp():
    """A bf16 weight of 1.0 (ulp 2^-7) and steps of ~1e-4: round-to-nearest loses every one,
    stochastic rounding moves the weights by the right amount on average."""
    def run(stochastic):
        weight = torch.nn.Parameter(torch.ones(64, 64, dtype=torch.bfloat16))
        optimizer = DCTProjAdam([{"params": [weight], "rank": None}], lr=1e-4, bf16_stochastic_round=stochastic)
        for _ in range(20):
            weight.grad = torch.ones_like(weight)                      # Adam's step ≈ lr every time
            optimizer.step()
        return weight.float()

    assert torch.equal(run(False), torch.ones(64, 64))
    moved = 1.0 - run(True).mean().item()
    assert abs(moved - 20 * 1e-4) < 0.1 * 20 * 1e-4                 # 4096 draws: a few % of noise


def test_stochastic_rounding_is_reproducible_and_resumes():
    model = make_model(dtype=torch.bfloat16, **WIDE)
    first, second = model, twin(model)
    train(first, _dct(first, bf16_stochastic_round=True), 4)
    train(second, _dct(second, bf16_stochastic_round=True), 4)
    for p, q in zip(first.parameters(), second.parameters()):
        assert torch.equal(p, q)


def test_sst_stochastic_rounding_is_the_same_for_two_optimizers():
    """The noise is keyed by the parameter's position and the step, not by anything of one
    optimizer object, so a second optimizer (another process, a resume) draws the same."""
    model = convert_to_sst(make_model(dtype=torch.bfloat16, **WIDE), rank=4, target_modules=("up", "down"))
    first, second = model, twin(model)
    for copy_ in (first, second):
        train(copy_, SSTAdamW(copy_.parameters(), lr=1e-2, update_interval=2, bf16_stochastic_round=True), 4)
    for p, q in zip(first.parameters(), second.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("block_size", [64, 2048])
@pytest.mark.parametrize("name", list(BUILDS))
def test_moment_block_size_sets_the_scales_and_the_bytes(name, block_size):
    """One scale per ``block_size`` values of each slot (a 1100×4 projected moment: 4 slots of
    1100 values) and per ``block_size`` consecutive values of a plain one (the 300×16 embedding),
    across a refresh; the summary's expected bytes are what the steps allocate."""
    model = make_model(**WIDE)
    optimizer = BUILDS[name](model, moment_bits=8, moment_block_size=block_size)
    expected = optimizer.projection_summary().state_bytes
    train(model, optimizer, 4)
    assert optimizer_state_bytes(optimizer) == expected
    for param, blocks in ((model.up.weight, 4 * -(-1100 // block_size)), (model.embed.weight, -(-4800 // block_size))):
        for prefix in ("exp_avg", "exp_avg_sq"):
            assert optimizer.state[param][f"{prefix}_scales"].numel() == blocks


@pytest.mark.parametrize("name", list(BUILDS))
def test_the_default_block_size_is_256_at_8_bits(name):
    default_model, explicit_model = make_model(**WIDE), make_model(**WIDE)
    default, explicit = BUILDS[name](default_model, moment_bits=8), BUILDS[name](explicit_model, moment_bits=8,
                                                                                  moment_block_size=256)
    train(default_model, default, 4)
    train(explicit_model, explicit, 4)
    for p, q in zip(default_model.parameters(), explicit_model.parameters()):
        assert torch.equal(p, q)
        assert default.state[p].keys() == explicit.state[q].keys()
        for key, value in default.state[p].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(explicit.state[q][key])), key


def test_a_large_block_size_resumes_bit_identically(tmp_path):
    """The saved param groups carry the block size: a fresh optimizer at the default loads it."""
    model = make_model(**WIDE)
    straight = twin(model)
    optimizer = _dct(model, moment_bits=8, moment_block_size=2048)
    train(model, optimizer, 2)
    torch.save(optimizer.state_dict(), tmp_path / "optimizer.pt")
    resumed = _dct(model, moment_bits=8)
    resumed.load_state_dict(torch.load(tmp_path / "optimizer.pt", weights_only=True))
    assert {group["moment_block_size"] for group in resumed.param_groups} == {2048}
    train(model, resumed, 2, start=2)
    train(straight, _dct(straight, moment_bits=8, moment_block_size=2048), 4)
    for p, q in zip(model.parameters(), straight.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("bad", [100, 0, 4, 8192, True, "256"])
def test_moment_block_size_is_validated(bad):
    for build in (_dct, _galore):
        with pytest.raises(ValueError, match=rf"Invalid moment_block_size: {bad!r} \(expected None or a power"):
            build(make_model(), moment_bits=8, moment_block_size=bad)


@pytest.mark.parametrize("bad", [16, 0, True, "8"])
def test_moment_bits_is_validated(bad):
    with pytest.raises(ValueError, match=rf"Invalid moment_bits: {bad!r} \(expected None, 8 or 4\)"):
        _dct(make_model(), moment_bits=bad)
    with pytest.raises(ValueError, match=r"Invalid moment_bits"):
        SSTAdamW(make_model().parameters(), moment_bits=bad)


@pytest.mark.parametrize("bits", [8, 4])
def test_fsdp2_sharded_low_bit_moments_in_one_process_equal_unsharded(tmp_path, bits):
    """A one-rank FSDP2 mesh: codes and scales are DTensors, bit for bit the unsharded run's (the
    two-rank runs, layouts and checkpoints are in tests/modes/test_fsdp_lowbit.py)."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        plain = torch.nn.Linear(64, 128)
        torch.manual_seed(0)
        layer = fully_shard(torch.nn.Linear(64, 128))
        runs = [(net, DCTProjAdam(net.named_parameters(), rank=32, update_proj_gap=2, moment_bits=bits))
                for net in (plain, layer)]
        for step in range(3):
            x = torch.randn(8, 64, generator=torch.Generator().manual_seed(step))
            for net, optimizer in runs:
                optimizer.zero_grad()
                net(x).square().mean().backward()
                optimizer.step()
        sharded = runs[1][1].state[layer.weight]
        assert isinstance(sharded["exp_avg_codes"], DTensor) and sharded["exp_avg_codes"].dtype == torch.uint8
        for key, value in runs[0][1].state[plain.weight].items():
            got = sharded[key]
            assert torch.equal(got.full_tensor() if isinstance(got, DTensor) else torch.as_tensor(got),
                               torch.as_tensor(value)), key
        assert torch.equal(layer.weight.full_tensor(), plain.weight)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("old_format, changed", [(2, "4-bit first and second moments"), (3, "4-bit first moments")])
@pytest.mark.parametrize("bits", [None, 8, 4])
def test_a_format_2_or_3_state_loads_unless_it_holds_4_bit_moments(bits, old_format, changed):
    """Formats 3 and 4 changed only maps of the 4-bit moments (state_io doc): an older state with
    4-bit moments would be misread, so it is refused by name; one without them is the same tensors."""
    model = make_model(**WIDE)
    optimizer = _dct(model, moment_bits=bits)
    train(model, optimizer, 1)
    saved = {**optimizer.state_dict(), "state_format": old_format}
    restored = _dct(model, moment_bits=bits)
    if bits == 4:
        with pytest.raises(ValueError, match=rf"state_format {old_format} with moment_bits=4 in param_groups\[0\] "
                                             rf"\(format 4 stores {changed} on other maps"):
            restored.load_state_dict(saved)
        assert not restored.state
        return
    restored.load_state_dict(saved)
    assert restored.state_dict()["state_format"] == 4
    for param in model.parameters():
        for key, value in optimizer.state[param].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(restored.state[param][key]))
