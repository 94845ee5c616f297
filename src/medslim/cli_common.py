"""What every ``medslim`` command shares: the two consoles and the user-error wrapper.

User errors (``MedslimError``) print one line on stderr and exit with code 2.
"""
from __future__ import annotations

import functools
from typing import Callable

import typer
from rich.console import Console

from medslim.errors import MedslimError

console = Console(stderr=True)
out_console = Console()


def user_errors(fn: Callable) -> Callable:
    """Turn ``MedslimError`` into one stderr line and exit code 2 (no traceback)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MedslimError as e:
            console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(2)
    return wrapper
