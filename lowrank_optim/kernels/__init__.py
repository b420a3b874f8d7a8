"""Compute kernels of the projected optimizers: ``lowrank_optim.kernels``, the only name they are
imported by. Every operation has a pure-PyTorch reference; accelerated versions sit beside it.

The modules live in the repository's top-level folder ``kernels/``, which has no ``__init__.py``:
a bare ``import kernels`` never runs this project's code, and an installed ``kernels`` package
(Hugging Face's, which transformers imports) always outranks the folder. A built wheel copies the
modules here (``package_dir`` in ``setup.cfg``); in a source checkout (editable install, or Python
started in the repository root) this package adds the folder to its ``__path__``.
"""
from pathlib import Path as _Path

_SOURCE_FOLDER = _Path(__file__).resolve().parents[2] / "kernels"
if not (_Path(__file__).with_name("dispatch.py")).is_file() and (_SOURCE_FOLDER / "dispatch.py").is_file():
    __path__.append(str(_SOURCE_FOLDER))
