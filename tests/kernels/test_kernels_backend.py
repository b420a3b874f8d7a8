"""The ``backend`` option: validation, resolution per device, old checkpoints."""
import pytest
import torch
from lowrank_optim.kernels.backend import resolve_backend
from support.toy import make_model

from lowrank_optim import DCTProjAdam, GaLoreAdamW
from lowrank_optim.kernels import backend as backend_module


@pytest.mark.parametrize("optimizer", [DCTProjAdam, GaLoreAdamW])
def test_unknown_backend_is_named(optimizer):
    with pytest.raises(ValueError, match="Invalid backend: 'cuda'"):
        optimizer(make_model().parameters(), backend="cuda")


@pytest.mark.parametrize("optimizer", [DCTProjAdam, GaLoreAdamW])
def test_triton_without_triton_fails_at_construction(optimizer, monkeypatch):
    monkeypatch.setattr(backend_module, "triton_available", lambda: False)
    with pytest.raises(ValueError, match="triton package does not import"):
        optimizer(make_model().parameters(), backend="triton")
    optimizer(make_model().parameters(), backend="auto")       # auto falls back to PyTorch


def test_a_bad_group_backend_is_not_added():
    model = make_model()
    optimizer = DCTProjAdam([model.up.weight])
    with pytest.raises(ValueError, match="Invalid backend: 'gpu'"):
        optimizer.add_param_group({"params": [model.down.weight], "backend": "gpu"})
    assert len(optimizer.param_groups) == 1


def test_auto_picks_triton_on_cuda_only(monkeypatch):
    monkeypatch.setattr(backend_module, "triton_available", lambda: True)
    assert resolve_backend("auto", torch.device("cuda", 0)) == "triton"
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("auto", torch.device("cpu")) == "torch"      # the interpreter is opt-in
    assert resolve_backend("torch", torch.device("cuda", 0)) == "torch"
    assert resolve_backend("auto", torch.device("cuda", 0), (torch.bfloat16, torch.float32)) == "triton"
    assert resolve_backend("auto", torch.device("cuda", 0), (torch.float64, torch.float64)) == "torch"
    monkeypatch.setattr(backend_module, "triton_available", lambda: False)
    assert resolve_backend("auto", torch.device("cuda", 0)) == "torch"


def test_explicit_triton_runs_where_the_kernels_can(monkeypatch):
    monkeypatch.setattr(backend_module, "triton_available", lambda: True)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert resolve_backend("triton", torch.device("cuda", 0), (torch.bfloat16, torch.float32)) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("triton", torch.device("cpu"), (torch.float32, torch.float32)) == "triton"


def test_explicit_triton_that_cannot_run_raises(monkeypatch):
    """Never a silent fallback: each reason is named."""
    monkeypatch.setattr(backend_module, "triton_available", lambda: True)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"Invalid backend: 'triton' for a parameter on cpu .*TRITON_INTERPRET=1"):
        resolve_backend("triton", torch.device("cpu"), (torch.float32,))
    with pytest.raises(ValueError, match=r"Invalid backend: 'triton' for torch.float64 tensors"):
        resolve_backend("triton", torch.device("cuda", 0), (torch.float32, torch.float64))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(ValueError, match=r"for torch.float64 tensors"):
        resolve_backend("triton", torch.device("cpu"), (torch.float64,))
    monkeypatch.setattr(backend_module, "triton_available", lambda: False)
    with pytest.raises(ValueError, match=r"Invalid backend: 'triton' \(the triton package does not import"):
        resolve_backend("triton", torch.device("cuda", 0))
    with pytest.raises(ValueError, match="Invalid backend: 'cuda'"):
        resolve_backend("cuda", torch.device("cuda", 0))


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    pytest.importorskip("triton")
    from lowrank_optim.kernels.triton_support import check_launchable
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        check_launchable(torch.zeros(2))


def test_triton_rejects_dtypes_it_does_not_cover(monkeypatch):
    pytest.importorskip("triton")
    from lowrank_optim.kernels.triton_support import check_launchable
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    check_launchable(torch.zeros(2), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="float64"):
        check_launchable(torch.zeros(2, dtype=torch.float64))


@pytest.mark.parametrize("optimizer", [DCTProjAdam, GaLoreAdamW])
def test_explicit_triton_with_stochastic_rounding_is_refused_not_run_on_pytorch(optimizer, monkeypatch):
    """The fused weight update rounds to nearest: a bf16 parameter asking for both would take the
    PyTorch weight update without a word."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    def groups(dtype):
        return [{"params": [make_model(dtype=dtype).up.weight], "rank": 4}]

    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[0\] \(shape \(40, 12\)\): "
                                         r"backend='triton' with bf16_stochastic_round=True"):
        optimizer(groups(torch.bfloat16), backend="triton", bf16_stochastic_round=True)
    optimizer(groups(torch.bfloat16), backend="auto", bf16_stochastic_round=True)
    optimizer(groups(torch.float32), backend="triton", bf16_stochastic_round=True)     # fp32: no rounding to do
