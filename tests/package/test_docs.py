"""What a test can check of the documentation without building it (CI builds it with
``mkdocs build --strict``, .ci/lib.sh): every page of ``docs/`` is in the navigation, and the
README, which is read on GitHub and PyPI rather than in the site, links only files that exist in
the repository and stays a landing page."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCS = REPO_ROOT / "docs"
README = REPO_ROOT / "README.md"
README_MAX_LINES = 300  # a landing page (about 250 lines); the details belong in docs/

# [text](target) outside code; images too. Targets with a scheme or an anchor only are not files.
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")


def nav_pages(nav) -> list[str]:
    """The page paths of an mkdocs ``nav`` (nested lists of ``{title: page or list}``)."""
    pages = []
    for entry in nav:
        values = entry.values() if isinstance(entry, dict) else [entry]
        for value in values:
            pages.extend(nav_pages(value) if isinstance(value, list) else [value])
    return pages


def local_links(markdown: str) -> list[str]:
    text = INLINE_CODE.sub("", FENCE.sub("", markdown))
    targets = [target.split("#", 1)[0] for target in LINK.findall(text)]
    return [t for t in targets if t and not re.match(r"^[a-z][a-z0-9+.-]*:", t)]


def test_every_docs_page_is_in_the_nav():
    config = yaml.safe_load((REPO_ROOT / "mkdocs.yml").read_text())
    in_nav = nav_pages(config["nav"])
    on_disk = sorted(str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md"))
    assert sorted(set(in_nav)) == on_disk
    assert len(in_nav) == len(set(in_nav)), "a page listed twice"


def test_readme_links_only_files_in_the_repository():
    links = local_links(README.read_text())
    assert links, "the README links into docs/"
    for target in links:
        path = (REPO_ROOT / target).resolve()
        assert path.is_relative_to(REPO_ROOT), f"README links outside the repository: {target}"
        assert path.exists(), f"README links a missing file: {target}"


def test_local_links_parser():
    text = "[a](docs/x.md#y) [b](https://e.org) ![c](img.png) `[d](code.md)` [e](#anchor)\n```\n[f](g.md)\n```"
    assert local_links(text) == ["docs/x.md", "img.png"]


def test_readme_is_a_landing_page():
    lines = README.read_text().count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move details into docs/"
