"""Running the training script's ``main`` as a user would, for the tests of its refusals."""
from __future__ import annotations

import pytest

from experiments.pretrain import main


def refusal(argv: list[str], capsys) -> str:
    """Run ``main(argv)``, which must exit with status 2; return its only line of stderr."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    return lines[0]
