r"""``SSTLinear``: a linear layer stored as its singular value decomposition ``W = U·diag(s)·Vᵀ``.

For an ``out×in`` (m×n) weight and ``k = min(m, n)``:

* ``U`` (m×k) and ``V`` (n×k) are buffers holding all k singular vectors: frozen, no gradient.
* ``s`` (k,) is a parameter: every singular value trains at every step.
* ``U_active`` (m×r) and ``V_active`` (n×r) are parameters holding the ``r`` trainable pairs, those of
  the int64 buffer ``active_indices`` (r,). While a pair is active its entries in ``U``/``V`` are stale
  and do not contribute; :meth:`SSTLinear.set_active_indices_` writes them back and loads a new set *in
  place*, so an optimizer's references to the parameter objects stay valid.

Only ``s``, ``U_active``, ``V_active`` (and ``bias``) ever get gradients or optimizer state:
``k + (m + n)·r`` values per layer instead of ``m·n``. The forward pass and the enhanced gradients are
in :mod:`lowrank_optim.sst.enhanced_gradient`; the schedule (sampling, re-SVD) in
:class:`~lowrank_optim.sst.optimizer.SSTAdamW`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..validation import InvalidHyperparameter
from .enhanced_gradient import spectral_linear
from .parameter_owners import SST_ROLES, record_owner


class SSTLinear(nn.Module):
    """``y = x·(U·diag(s)·Vᵀ)ᵀ + bias``, with ``r`` of the ``k`` singular-vector pairs trainable.

    A fresh layer is initialised like ``nn.Linear`` and then factorised, so it computes the function
    of an ``nn.Linear`` with the same default initialisation. :meth:`from_linear` factorises an
    existing layer (zero distortion). The initial active pairs are the ``r`` largest singular values.
    """

    def __init__(
        self, in_features: int, out_features: int, rank: int, bias: bool = True, device=None, dtype=None
    ) -> None:
        super().__init__()
        spectral_size = min(in_features, out_features)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= spectral_size:
            raise InvalidHyperparameter(
                "rank", rank,
                f"Invalid rank: {rank!r} (expected an integer with 1 <= rank <= "
                f"min(in_features, out_features) = {spectral_size})"
            )
        factory = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.register_buffer("U", torch.empty(out_features, spectral_size, **factory))
        self.register_buffer("V", torch.empty(in_features, spectral_size, **factory))
        self.register_buffer("active_indices", torch.arange(rank, device=device))
        self.s = nn.Parameter(torch.empty(spectral_size, **factory))
        self.U_active = nn.Parameter(torch.empty(out_features, rank, **factory))
        self.V_active = nn.Parameter(torch.empty(in_features, rank, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int) -> SSTLinear:
        """The SST factorisation of ``linear``: same outputs up to the SVD's rounding."""
        weight = linear.weight
        layer = cls(
            linear.in_features,
            linear.out_features,
            rank,
            bias=linear.bias is not None,
            device="meta",
            dtype=weight.dtype,
        )
        layer.to_empty(device=weight.device)
        with torch.no_grad():
            layer.load_dense_weight_(weight)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    @property
    def spectral_size(self) -> int:
        """``k = min(in_features, out_features)``, the number of singular values."""
        return self.s.shape[0]

    def reset_parameters(self) -> None:
        """``nn.Linear``'s default initialisation, then factorised."""
        weight = torch.empty(self.out_features, self.in_features, device=self.s.device, dtype=self.s.dtype)
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
        self.load_dense_weight_(weight)
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features) if self.in_features > 0 else 0.0
            nn.init.uniform_(self.bias, -bound, bound)

    @torch.no_grad()
    def load_dense_weight_(self, weight: torch.Tensor) -> None:
        """Set ``U, s, V ← svd(weight)`` (computed in at least fp32); active pairs: the top ``r``."""
        expected = (self.out_features, self.in_features)
        if tuple(weight.shape) != expected:
            raise ValueError(f"Invalid weight shape: {tuple(weight.shape)} (expected {expected})")
        self._set_factors(*_svd(weight))
        self.active_indices.copy_(torch.arange(self.rank, device=self.active_indices.device))
        self._load_active()

    @torch.no_grad()
    def set_active_indices_(self, indices: torch.Tensor) -> None:
        """Write the active pairs back into ``U``/``V``, then make ``indices`` (r distinct) the active set.

        The new pairs are copied into the existing ``U_active``/``V_active`` objects; column ``j`` of
        them is pair ``indices[j]``.
        """
        indices = indices.to(device=self.active_indices.device, dtype=torch.int64)
        if indices.shape != self.active_indices.shape:
            raise ValueError(
                f"Invalid indices shape: {tuple(indices.shape)} (expected ({self.rank},), one index per active pair)"
            )
        if indices.numel() and (indices.min() < 0 or indices.max() >= self.spectral_size):
            raise ValueError(f"Invalid indices: {indices.tolist()} (expected values in [0, {self.spectral_size}))")
        if indices.unique().numel() != indices.numel():
            raise ValueError(f"Invalid indices: {indices.tolist()} (expected distinct values)")
        self._write_back_active()
        self.active_indices.copy_(indices)
        self._load_active()

    @torch.no_grad()
    def resvd_(self) -> None:
        """Restore orthogonality: ``U, s, V ← svd(U·diag(s)·Vᵀ)``; ``s`` comes out sorted and ≥ 0.

        The layer's function is unchanged (up to rounding). The active index set is kept, but the pairs
        at those indices are now new singular vectors.
        """
        self._set_factors(*_svd(self._product_in_work_dtype()))
        self._load_active()

    @torch.no_grad()
    def renormalize_active_(self) -> None:
        """Scale every active column of ``U_active`` and ``V_active`` to unit Euclidean norm."""
        for vectors in (self.U_active, self.V_active):
            norms = torch.linalg.vector_norm(vectors, dim=0)
            vectors.div_(norms.clamp_min(torch.finfo(vectors.dtype).tiny))

    @torch.no_grad()
    def current_factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Copies of ``(U, s, V)`` with the active columns taken from ``U_active``/``V_active``."""
        U = self.U.index_copy(1, self.active_indices, self.U_active)
        V = self.V.index_copy(1, self.active_indices, self.V_active)
        return U, self.s.clone(), V

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """The dense ``out×in`` weight ``U·diag(s)·Vᵀ`` the layer currently computes (detached; the
        product is formed in fp32 or wider, then cast to the layer's dtype)."""
        return self._product_in_work_dtype().to(self.s.dtype)

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """A new ``nn.Linear`` computing what the layer computes: weight :meth:`merged_weight`, a copy of
        the bias; same dtype and device. The layer itself is unchanged."""
        weight = self.merged_weight()
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta",
                           dtype=weight.dtype)
        linear.weight = nn.Parameter(weight)
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.detach().clone())
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tensors = (self.U, self.V, self.s, self.active_indices, self.U_active, self.V_active)
        device_type = x.device.type
        if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
            # NOTE: like F.linear under autocast, compute in the autocast dtype; autocast itself is
            # switched off inside so that forward and backward see one dtype throughout.
            dtype = torch.get_autocast_dtype(device_type)
            with torch.autocast(device_type, enabled=False):
                cast = [t.to(dtype) if t.is_floating_point() else t for t in (x, *tensors)]
                y = spectral_linear(*cast)
                return y if self.bias is None else y + self.bias.to(dtype)
        y = spectral_linear(x, *tensors)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"bias={self.bias is not None}"
        )

    # Keeping the parameter-owner records in step with the parameter objects.
    def register_parameter(self, name: str, param: nn.Parameter | None) -> None:
        super().register_parameter(name, param)
        if name in SST_ROLES and param is not None:
            record_owner(param, self, name)

    def _apply(self, fn, recurse=True):
        result = super()._apply(fn, recurse)
        self._record_owners()
        return result

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        self._record_owners()

    def _record_owners(self) -> None:
        for role in SST_ROLES:
            record_owner(getattr(self, role), self, role)

    def _product_in_work_dtype(self) -> torch.Tensor:
        U, s, V = (t.to(_work_dtype(t.dtype)) for t in self.current_factors())
        return (U * s) @ V.mT

    def _set_factors(self, U: torch.Tensor, s: torch.Tensor, V: torch.Tensor) -> None:
        self.U.copy_(U)
        self.s.copy_(s)
        self.V.copy_(V)

    def _write_back_active(self) -> None:
        self.U.index_copy_(1, self.active_indices, self.U_active)
        self.V.index_copy_(1, self.active_indices, self.V_active)

    def _load_active(self) -> None:
        self.U_active.copy_(self.U.index_select(1, self.active_indices))
        self.V_active.copy_(self.V.index_select(1, self.active_indices))


def _svd(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(U, s, V)`` of ``weight = U·diag(s)·Vᵀ`` (thin SVD, in fp32 or wider; CUDA has no bf16 SVD)."""
    U, s, Vh = torch.linalg.svd(weight.to(_work_dtype(weight.dtype)), full_matrices=False)
    return U, s, Vh.mT


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half-precision layers, else the layer's own dtype (fp32 or fp64)."""
    return torch.promote_types(dtype, torch.float32)
