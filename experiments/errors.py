"""The one exception type for user mistakes: a bad flag, config file or checkpoint.

A :class:`UsageError` names where the mistake is (``--batch_size``, a file path) and says what is
wrong and what is expected. ``python -m experiments.pretrain`` catches it in ``main()`` and prints
one line, ``error: <source>: <message>``, on stderr, with exit status 2 (argparse's own status);
every other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterable
from pathlib import Path

# Characters of another library's error message kept in a UsageError (torch's can run to pages).
EXCERPT_LENGTH = 200


class UsageError(ValueError):
    """A mistake of the user in ``source`` (a flag such as ``--lr``, or a file path).

    The message is kept on one line (internal whitespace, newlines included, collapses to single
    spaces), so that ``str(error)`` is the one line that ``main()`` prints after ``error:``.
    """

    def __init__(self, source: str, message: str) -> None:
        self.source = str(source)
        self.message = " ".join(str(message).split())
        super().__init__(f"{self.source}: {self.message}")


def expected_one_of(value, choices: Iterable[str]) -> str:
    """``"expected one of a, b, c, got 'x'"``, with a close match suggested when there is one."""
    choices = [str(choice) for choice in choices]
    message = f"expected one of {', '.join(choices)}, got {value!r}"
    close = difflib.get_close_matches(str(value), choices, n=1)
    return f"{message} (did you mean {close[0]!r}?)" if close else message


def excerpt(error: BaseException) -> str:
    """``"<type>: <message>"`` of ``error`` on one line, cut to :data:`EXCERPT_LENGTH` characters."""
    text = " ".join(f"{type(error).__name__}: {error}".split()).rstrip(":")
    return text if len(text) <= EXCERPT_LENGTH else text[: EXCERPT_LENGTH - 3] + "..."


def read_json_object(path: str | Path, *, expected: str, keys: str, missing: str | None = None) -> dict:
    """The JSON object in ``path``, or a :class:`UsageError` naming the file: unreadable, not JSON
    (``expected`` says what it should have been), not an object (of ``keys``); a file that is not
    there says ``missing`` when given (else it is unreadable)."""
    try:
        values = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        if missing is None:
            raise UsageError(str(path), f"cannot be read: {error}") from None
        raise UsageError(str(path), f"no such file: {missing}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(str(path), f"cannot be read: {error}") from None
    except json.JSONDecodeError as error:
        raise UsageError(str(path), f"is not valid JSON ({error}); expected {expected}") from None
    if not isinstance(values, dict):
        raise UsageError(str(path), f"expected a JSON object of {keys}, got {type(values).__name__}")
    return values
