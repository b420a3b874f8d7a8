"""The ``rank`` hyperparameter: an int, or a float in (0, 1] meaning a fraction of the smaller side."""
from __future__ import annotations

from numbers import Real

from .validation import InvalidHyperparameter


def check_rank(rank, allow_fraction: bool = True) -> None:
    """``None`` (not projected), an int ≥ 1 or, with ``allow_fraction``, a float in (0, 1]."""
    if rank is None:
        return
    if isinstance(rank, bool):
        raise InvalidHyperparameter("rank", rank,
                                    f"Invalid rank: {rank!r} (expected an int >= 1 or a fraction in (0, 1])")
    if isinstance(rank, int):
        if rank < 1:
            raise InvalidHyperparameter("rank", rank, f"Invalid rank: {rank!r} (expected an int >= 1)")
        return
    if allow_fraction and isinstance(rank, Real) and 0.0 < rank <= 1.0:
        return
    expected = "an int >= 1 or a fraction in (0, 1]" if allow_fraction else "an int >= 1"
    raise InvalidHyperparameter("rank", rank, f"Invalid rank: {rank!r} (expected {expected})")


def resolve_rank(rank: int | float, shape) -> int:
    """The integer rank for a weight of ``shape``, at most its smaller dimension.

    A fraction ``f`` gives ``max(1, ⌊f·min(m, n)⌋)``; an int is clamped to ``min(m, n)``.
    """
    smaller = min(shape)
    if isinstance(rank, int):
        return min(rank, smaller)
    return max(1, int(rank * smaller))


def default_rule_rank(rank: int | float | None, shape, rank_given: bool, vocabulary: bool) -> int | None:
    """The projection rank of a parameter of ``shape`` under the default rule of the optimizers that
    project ``model.parameters()`` (:mod:`lowrank_optim.selection`), or None (plain): 2-D
    parameters only; in a group without its own ``rank`` (``rank_given`` False) not an embedding
    table (``vocabulary``) nor a weight the rank would span."""
    if rank is None or len(shape) != 2:
        return None
    resolved = resolve_rank(rank, shape)
    if not rank_given and (resolved >= min(shape) or vocabulary):
        return None
    return resolved
