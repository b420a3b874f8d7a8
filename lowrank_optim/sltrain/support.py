"""The fixed random support of SLTrain's sparse factor S, derived from a seed and the layer's name.

For a weight of shape ``(m, n) = (out_features, in_features)`` the support is
``nnz = ⌊δ·m·n⌋`` distinct flat (row-major) indices ``k = i·n + j``, drawn uniformly without
replacement and sorted ascending. It is a pure function of ``(m, n, δ, seed, name)``:

    generator seed = first 63 bits of BLAKE2b("sltrain-support|{seed}|{name}")
    support        = sort(randperm(m·n, generator)[:nnz])

so every data-parallel rank, and every restart, computes the same support without communication.
Python's ``hash()`` is never used (it is salted per process). The permutation is drawn on the CPU,
so the support does not depend on the device either. It is also kept as a persistent buffer in
the ``state_dict``, so a checkpoint restores it even if a future PyTorch changed ``randperm``.

Indices are ``int32`` when ``m·n ≤ 2³¹`` (every flat index fits), else ``int64``.
Sampling costs one ``randperm`` of ``m·n`` elements at initialisation (about 0.2 s and 45 MB for a
2048×5461 weight on one CPU core).
"""

from __future__ import annotations

import hashlib
import math
from fractions import Fraction
from numbers import Real

import torch

from ..validation import InvalidHyperparameter

_INT32_MAX = torch.iinfo(torch.int32).max


def check_density(density) -> None:
    """``density`` must be a real number with ``0 < density <= 1``."""
    if (
        not isinstance(density, Real)
        or isinstance(density, bool)
        or not math.isfinite(density)
        or not 0.0 < density <= 1.0
    ):
        raise InvalidHyperparameter("density", density,
                                    f"Invalid density: {density!r} (expected a number with 0 < density <= 1)")


def support_size(out_features: int, in_features: int, density: float) -> int:
    """``nnz = ⌊δ·m·n⌋``, reading δ as the decimal it prints as.

    ``0.29`` is stored as 0.28999…, so ``0.29 * 100`` is 28.999… in floating point; reading
    δ through its shortest decimal representation (``Fraction("0.29") = 29/100``) keeps exact
    products exact: ``support_size(10, 10, 0.29) == 29``.
    """
    check_density(density)
    return math.floor(Fraction(str(float(density))) * out_features * in_features)


def support_index_dtype(numel: int) -> torch.dtype:
    """``int32`` when every flat index ``0 … numel-1`` fits in it, else ``int64``."""
    return torch.int32 if numel - 1 <= _INT32_MAX else torch.int64


def check_seed(seed) -> None:
    """``seed`` must be an integer."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"Invalid seed: {seed!r} (expected an integer)")


def check_support_key(seed, name) -> None:
    """``seed`` must be an integer and ``name`` a string."""
    check_seed(seed)
    if not isinstance(name, str):
        raise ValueError(f"Invalid name: {name!r} (expected a string)")


def support_generator_seed(seed: int, name: str) -> int:
    """A 63-bit generator seed from ``seed`` and the layer's qualified ``name`` (stable across processes)."""
    check_support_key(seed, name)
    digest = hashlib.blake2b(f"sltrain-support|{seed}|{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def sample_support(
    out_features: int,
    in_features: int,
    density: float,
    *,
    seed: int,
    name: str,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The sorted flat indices (shape ``(⌊δ·m·n⌋,)``) of the sparse factor of layer ``name``.

    Deterministic in ``(out_features, in_features, density, seed, name)``; see the module docstring.
    """
    numel = out_features * in_features
    nnz = support_size(out_features, in_features, density)
    generator = torch.Generator(device="cpu").manual_seed(support_generator_seed(seed, name))
    dtype = support_index_dtype(numel)
    permutation = torch.randperm(numel, generator=generator, dtype=dtype)
    return permutation[:nnz].sort().values.to(device)
