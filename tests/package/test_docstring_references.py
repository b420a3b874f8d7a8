"""Every fully qualified cross-reference in the library's docstrings and the docs pages
(``:func:`lowrank_optim.x.y```, ``:class:`~lowrank_optim.X```, …) names something that exists:
the docs site shows these roles as text, so a renamed function would otherwise leave a dangling
name behind without failing the strict build."""
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ROLE = re.compile(r":(?:func|class|mod|meth|attr|data|exc):`~?(lowrank_optim(?:\.\w+)*)`")


def _references() -> list[tuple[str, str]]:
    files = [*(ROOT / "lowrank_optim").rglob("*.py"), *(ROOT / "kernels").glob("*.py"), *(ROOT / "docs").rglob("*.md")]
    found = {(match.group(1), str(path.relative_to(ROOT))) for path in files
             for match in ROLE.finditer(path.read_text())}
    return sorted(found)


def _resolves(dotted: str) -> bool:
    """Import the longest importable module prefix, then follow attributes."""
    parts = dotted.split(".")
    for split in range(len(parts), 0, -1):
        try:
            target = importlib.import_module(".".join(parts[:split]))
        except ModuleNotFoundError:
            continue
        for attribute in parts[split:]:
            if not hasattr(target, attribute):
                return False
            target = getattr(target, attribute)
        return True
    return False


REFERENCES = _references()


def test_there_are_references_to_check():
    assert len(REFERENCES) > 40


@pytest.mark.parametrize("dotted, where", REFERENCES, ids=[f"{d} in {w}" for d, w in REFERENCES])
def test_a_qualified_reference_resolves(dotted, where):
    if dotted.endswith("_triton"):
        pytest.importorskip("triton")
    assert _resolves(dotted), f"{where}: {dotted} does not exist"
