"""Sparse Spectral Training (SST, arXiv 2405.15481): train linear layers through their SVD.

Each converted layer is ``W = U·diag(s)·Vᵀ``; every step trains all singular values and ``r`` sampled
singular-vector pairs (enhanced gradients), drawing new pairs every ``update_interval`` steps and
re-SVD-ing after each round. ``convert_to_sst`` → train with ``SSTAdamW`` → ``merge_sst``.

- :mod:`.enhanced_gradient`: the autograd Function (forward without m×n tensors, enhanced backward);
- :mod:`.layer`: :class:`SSTLinear`; :mod:`.parameter_owners`: which layer owns a parameter;
- :mod:`.convert`: :func:`convert_to_sst`, :func:`merge_sst`, :func:`sst_layers`;
- :mod:`.sampling`: the s-weighted draw without replacement;
- :mod:`.adam_update`: AdamW with per-column step counts and re-warmup;
- :mod:`.resample`: re-SVD and redraw of a layer, carrying its moments over;
- :mod:`.partition`: which optimizer parameters form SST layers; gradient checks before a step;
- :mod:`.optimizer`: :class:`SSTAdamW`.
"""

from .convert import convert_to_sst, merge_sst, sst_layers
from .enhanced_gradient import spectral_linear
from .layer import SSTLinear
from .optimizer import SSTAdamW
from .sampling import sample_active_indices, sampling_probabilities

__all__ = [
    "SSTAdamW",
    "SSTLinear",
    "convert_to_sst",
    "merge_sst",
    "sample_active_indices",
    "sampling_probabilities",
    "spectral_linear",
    "sst_layers",
]
