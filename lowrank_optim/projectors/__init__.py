"""Subspace projectors by name. A new projector: one file with a :class:`Projector` subclass, plus
one line here."""
from .base import Projector, Subspace, resolve_side
from .dct import DCTProjector
from .svd import SVDProjector

PROJECTORS: dict[str, type[Projector]] = {
    DCTProjector.name: DCTProjector,
    SVDProjector.name: SVDProjector,
}

__all__ = ["PROJECTORS", "Projector", "Subspace", "resolve_side", "DCTProjector", "SVDProjector"]
