"""SLTrain (arXiv 2406.02214): linear layers with weight ``W = (α/r)·B·A + S``, S on a fixed random support.

- :mod:`.support`: the seeded, name-derived support of S;
- :mod:`.function`: the autograd Function that saves only the input and the factors;
- :mod:`.layer`: :class:`SLTrainLinear`;
- :mod:`.convert`: :func:`convert_to_sltrain` and :func:`merge_sltrain` for whole models.
"""

from .convert import convert_to_sltrain, merge_sltrain
from .function import SLTrainLinearFunction, compose_weight, sltrain_linear
from .layer import SLTrainLinear
from .support import sample_support, support_size

__all__ = [
    "SLTrainLinear",
    "SLTrainLinearFunction",
    "compose_weight",
    "convert_to_sltrain",
    "merge_sltrain",
    "sample_support",
    "sltrain_linear",
    "support_size",
]
