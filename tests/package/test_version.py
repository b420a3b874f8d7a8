"""``lowrank_optim.__version__`` is the installed distribution's version, with a fallback when the
package is imported from a source tree that was never installed; the version in ``setup.cfg`` has a
section in ``CHANGELOG.md``."""

from __future__ import annotations

import configparser
import importlib.metadata
import subprocess
import sys
from pathlib import Path

import lowrank_optim

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_version_is_the_metadata_version():
    assert lowrank_optim.__version__ == importlib.metadata.version("lowrank-optim")


def test_version_without_metadata_falls_back():
    code = (
        "import importlib.metadata as m\n"
        "def missing(name): raise m.PackageNotFoundError(name)\n"
        "m.version = missing\n"
        "import lowrank_optim; print(lowrank_optim.__version__)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "0+unknown"


def test_changelog_has_the_setup_cfg_version():
    config = configparser.ConfigParser()
    config.read(REPO_ROOT / "setup.cfg")
    version = config["metadata"]["version"]
    headings = [line for line in (REPO_ROOT / "CHANGELOG.md").read_text().splitlines() if line.startswith("## ")]
    assert headings[0] == f"## {version}", f"CHANGELOG.md's newest section is {headings[0]!r}, setup.cfg says {version}"
