"""``SLTrainLinear``: a linear layer whose weight is sparse plus low rank (arXiv 2406.02214)."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..validation import check_positive_int, check_positive_real
from .function import compose_weight, sltrain_linear
from .support import check_density, check_support_key, sample_support, support_index_dtype, support_size


def check_sltrain_hyperparameters(rank, density, alpha) -> None:
    """``rank`` an integer >= 1, ``0 < density <= 1``, ``alpha > 0``; ValueError naming the culprit."""
    check_positive_int("rank", rank)
    check_density(density)
    check_positive_real("alpha", alpha)


class SLTrainLinear(nn.Module):
    """``y = x·Wᵀ + b`` with ``W = (α/r)·B·A + S``, the weight never stored densely.

    Parameters (m = out_features, n = in_features, r = rank, nnz = ⌊δ·m·n⌋):

    - ``B`` (m, r), initialised to zero, so the low-rank part starts at 0;
    - ``A`` (r, n), Kaiming-uniform (``a = √5``, as ``nn.Linear``: U(±1/√n));
    - ``sparse_values`` (nnz,), U(±1/√n): the entries of S at its support;
    - ``bias`` (m,), U(±1/√n) as ``nn.Linear``, when ``bias=True``;

    and the buffer ``sparse_support`` (nnz,) of sorted flat indices ``i·n + j``, fixed for the whole
    run and derived from ``(seed, name)`` by :func:`~lowrank_optim.sltrain.support.sample_support`
    (give distinct layers distinct names). Parameter count: ``r·(m + n) + ⌊δ·m·n⌋ (+ m)``.

    Forward and backward go through :class:`~lowrank_optim.sltrain.function.SLTrainLinearFunction`,
    which saves the input and the factors only and rebuilds W in backward.

    On the ``meta`` device the support is not sampled; after ``to_empty(device=...)`` call
    :meth:`reset_parameters`, which samples it (deterministically) with the other initialisations.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        *,
        density: float = 0.03,
        alpha: float = 32.0,
        bias: bool = True,
        seed: int = 0,
        name: str = "",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_positive_int("in_features", in_features)
        check_positive_int("out_features", out_features)
        check_sltrain_hyperparameters(rank, density, alpha)
        check_support_key(seed, name)
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.density = density
        self.alpha = alpha
        self.support_seed = seed
        self.support_name = name

        factory = {"device": device, "dtype": dtype}
        nnz = support_size(out_features, in_features, density)
        self.B = nn.Parameter(torch.empty(out_features, rank, **factory))
        self.A = nn.Parameter(torch.empty(rank, in_features, **factory))
        self.sparse_values = nn.Parameter(torch.empty(nnz, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory))
        else:
            self.register_parameter("bias", None)
        index_dtype = support_index_dtype(out_features * in_features)
        self.register_buffer("sparse_support", torch.empty(nnz, dtype=index_dtype, device=device))
        self.reset_parameters()

    @property
    def scale(self) -> float:
        """The low-rank scaling ``α / r``."""
        return self.alpha / self.rank

    def reset_parameters(self) -> None:
        """Fresh SLTrain init: B = 0; A, S values and bias U(±1/√n); the support from (seed, name)."""
        bound = 1.0 / math.sqrt(self.in_features)
        nn.init.zeros_(self.B)
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        nn.init.uniform_(self.sparse_values, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)
        if self.sparse_support.device.type != "meta":
            support = sample_support(
                self.out_features,
                self.in_features,
                self.density,
                seed=self.support_seed,
                name=self.support_name,
            )
            with torch.no_grad():
                self.sparse_support.copy_(support)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return sltrain_linear(
            input, self.B, self.A, self.sparse_values, self.sparse_support, self.bias, self.scale
        )

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """The dense weight ``(α/r)·B·A + S`` (m, n), detached: for export and inspection only."""
        return compose_weight(self.B, self.A, self.sparse_values, self.sparse_support, self.scale)

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """A new ``nn.Linear`` computing what the layer computes: weight :meth:`merged_weight`, a copy of
        the bias; same dtype and device. The layer itself is unchanged."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = nn.Parameter(self.merged_weight())
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.detach().clone())
        return linear

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"density={self.density}, alpha={self.alpha}, nnz={self.sparse_values.numel()}, "
            f"bias={self.bias is not None}, seed={self.support_seed}, name={self.support_name!r}"
        )
