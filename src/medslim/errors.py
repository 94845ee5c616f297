"""User-facing errors: the CLI prints ``str(error)`` on one line and exits with code 2."""
from __future__ import annotations

import difflib
from typing import Callable, NoReturn, Sequence


class MedslimError(Exception):
    """A problem with the user's input (paths, options, model files), not a bug in medslim."""


def did_you_mean(name: str, choices: Sequence[str]) -> str:
    """``"; did you mean 'x'?"`` for the closest choice, or ``""`` (for error messages)."""
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f"; did you mean '{close[0]}'?" if close else ""


def first_line(e: BaseException, limit: int = 200) -> str:
    """The first non-blank line of ``str(e)`` (at most ``limit`` characters), else the
    exception's type name: for one-line messages that quote a library's error."""
    return next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)[:limit]


def run_script(main: Callable[[], int]) -> NoReturn:
    """A script's ``if __name__ == "__main__"``: exit with ``main()``'s code, or with code 2 and
    one stderr line for a ``MedslimError`` (as the CLI does)."""
    import sys

    try:
        sys.exit(main())
    except MedslimError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
