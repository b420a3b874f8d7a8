"""The top-level folder ``kernels/`` is the package ``lowrank_optim.kernels`` and never a top-level
``kernels``: it has no ``__init__.py``, so an installed ``kernels`` package (Hugging Face's, which
transformers >= 5.25 imports while a model module loads) always outranks it, from the repository
root too. In a checkout ``lowrank_optim/kernels/__init__.py`` adds the folder to its ``__path__``;
a wheel copies the modules into ``lowrank_optim/kernels/`` (``package_dir`` in ``setup.cfg``)."""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import torch
from lowrank_optim.kernels.backend import triton_available

from lowrank_optim import DCTProjAdam

REPO_ROOT = Path(__file__).resolve().parents[2]
KERNELS_DIR = REPO_ROOT / "kernels"

# Run in a fresh interpreter: the `kernels` it imports is not this repository's folder, transformers
# builds a model module (which imports `kernels` since 5.25), and the library's kernels import.
CHECK_IMPORTS = f"""
import pathlib, kernels, lowrank_optim.kernels.dispatch
from transformers import LlamaForCausalLM
import lowrank_optim
assert kernels.__file__ is not None, "a namespace package of the folder, not the installed package"
origin = pathlib.Path(kernels.__file__).resolve()
assert not origin.is_relative_to({str(KERNELS_DIR)!r}), origin
print(pathlib.Path(lowrank_optim.__file__).resolve())
print(pathlib.Path(lowrank_optim.kernels.dispatch.__file__).resolve())
"""


def _run(code: str, cwd: Path, python: str = sys.executable, pythonpath: list[str] | None = None) -> list[str]:
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(pythonpath)
    completed = subprocess.run([python, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed.stdout.split()


def _require_hub_kernels() -> None:
    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the `kernels` package is not installed (transformers >= 5.25 brings it)")


def test_the_folder_is_no_package_and_every_module_is_one_of_lowrank_optim_kernels():
    assert not (KERNELS_DIR / "__init__.py").exists()
    for path in sorted(KERNELS_DIR.glob("*.py")):
        if path.stem.endswith("_triton") and not triton_available():
            continue
        module = importlib.import_module(f"lowrank_optim.kernels.{path.stem}")
        assert Path(module.__file__).resolve() == path.resolve(), path.stem


def test_the_optimizers_step_through_it():
    weight = torch.nn.Parameter(torch.randn(16, 8, generator=torch.Generator().manual_seed(0)))
    before = weight.detach().clone()
    weight.grad = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
    DCTProjAdam([weight], rank=2, backend="torch").step()
    assert torch.isfinite(weight).all() and not torch.equal(weight, before)


def test_from_the_repository_root_the_installed_kernels_package_wins():
    """``python -m pytest``, ``python -m experiments.pretrain``, any script: the root is first on
    ``sys.path``."""
    _require_hub_kernels()
    library, dispatch = _run(CHECK_IMPORTS, cwd=REPO_ROOT, pythonpath=[str(REPO_ROOT)])
    assert Path(library).is_relative_to(REPO_ROOT) and Path(dispatch).parent == KERNELS_DIR


def test_from_another_folder_the_installed_library_imports(tmp_path):
    _require_hub_kernels()
    try:
        importlib.metadata.version("lowrank-optim")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("lowrank-optim is not installed in this environment (pip install -e .)")
    _, dispatch = _run(CHECK_IMPORTS, cwd=tmp_path)
    assert Path(dispatch).name == "dispatch.py"


def test_a_built_wheel_installs_lowrank_optim_kernels_and_no_top_level_kernels(tmp_path):
    """Build a wheel from a copy of the sources, install it into a scratch venv (torch and the
    `kernels` package borrowed from this environment), import it from elsewhere."""
    _require_hub_kernels()
    source = tmp_path / "source"
    source.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, source / name)
    for name in ("lowrank_optim", "kernels"):
        shutil.copytree(REPO_ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(tmp_path / "dist"), str(source)], check=True, capture_output=True, timeout=300)
    wheel = next((tmp_path / "dist").glob("lowrank_optim-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert not any(name.startswith("kernels/") for name in names)
    assert "lowrank_optim/kernels/__init__.py" in names and "lowrank_optim/kernels/dispatch.py" in names

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    python = str(venv / "bin" / "python")
    subprocess.run([sys.executable, "-m", "pip", "--python", python, "install", "--quiet", "--no-deps",
                    "--no-index", str(wheel)], check=True, capture_output=True, timeout=300)
    borrowed = sysconfig.get_paths()["purelib"]           # torch, transformers, kernels; not the editable finder
    site = Path(_run("import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp_path, python=python)[0])
    (site / "borrowed.pth").write_text(borrowed + "\n")
    library, dispatch = _run(CHECK_IMPORTS, cwd=tmp_path, python=python)
    assert Path(library).is_relative_to(venv) and Path(dispatch).is_relative_to(venv)
