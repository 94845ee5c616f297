"""User-facing errors: the CLI prints ``str(error)`` on one line and exits with code 2."""
from __future__ import annotations

import difflib
from typing import Sequence


class MedslimError(Exception):
    """A problem with the user's input (paths, options, model files), not a bug in medslim."""


def did_you_mean(name: str, choices: Sequence[str]) -> str:
    """``"; did you mean 'x'?"`` for the closest choice, or ``""`` (for error messages)."""
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f"; did you mean '{close[0]}'?" if close else ""
