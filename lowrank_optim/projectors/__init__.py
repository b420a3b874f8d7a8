"""Subspace projectors by name. A new projector: one file with a :class:`Projector` subclass, plus
one line here."""
from .base import SUBSPACE_PREFIX, Projector, Subspace, stored_subspace
from .dct import DCTProjector
from .random import GaussianProjector
from .randomized_svd import RandomizedSVDProjector
from .svd import SVDProjector

PROJECTORS: dict[str, type[Projector]] = {
    DCTProjector.name: DCTProjector,
    SVDProjector.name: SVDProjector,
    RandomizedSVDProjector.name: RandomizedSVDProjector,
    GaussianProjector.name: GaussianProjector,
}


def projectors_of(family: str) -> tuple[str, ...]:
    """The names of the registered projectors of ``family`` (``"svd"``, ``"dct"`` or ``"random"``)."""
    return tuple(name for name, projector in PROJECTORS.items() if projector.family == family)


__all__ = ["PROJECTORS", "SUBSPACE_PREFIX", "Projector", "Subspace", "stored_subspace", "projectors_of",
           "DCTProjector", "GaussianProjector", "SVDProjector",
           "RandomizedSVDProjector"]
