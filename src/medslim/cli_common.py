"""What every ``medslim`` command shares: the two consoles and the one error handler.

Every failure of every command ends as ONE line on stderr (``error: …``), never a traceback:

* user errors exit with code 2: ``MedslimError`` (bad paths, option values, model files),
  Click usage errors (a non-numeric value, a missing option, an unknown option or command,
  with Click's "did you mean"), and operating-system errors naming a file;
* anything else is a bug (exit code 1): the line names the exception and points to
  ``medslim --debug COMMAND …`` (or ``MEDSLIM_DEBUG=1``), which prints the traceback too.

The handler lives in :class:`MedslimGroup`, the Click group of the ``medslim`` app, so it
covers the console script (``main()``) and ``CliRunner().invoke(app, …)`` alike. Messages are
written as plain text: no Rich markup is interpreted, a ``[`` in a path appears verbatim.
"""
from __future__ import annotations

import os
import sys
import traceback
from typing import Any

import typer
from rich.console import Console
from typer.core import TyperGroup

from medslim.errors import MedslimError

try:  # typer ≥ 0.20 ships its own copy of Click
    from typer._click import exceptions as _click_exc
except ImportError:  # pragma: no cover - older typer uses the click package
    import click.exceptions as _click_exc  # type: ignore[no-redef]

# no Rich markup: the commands print paths and names, in which '[' … ']' must stay verbatim
console = Console(stderr=True, markup=False)
out_console = Console(markup=False)

DEBUG_ENV = "MEDSLIM_DEBUG"
EXIT_USER, EXIT_INTERNAL, EXIT_INTERRUPTED = 2, 1, 130
_MAX_INTERNAL = 300  # characters of an internal error's message on its one line


class _State:
    debug = False


def debug_from_env() -> bool:
    """``MEDSLIM_DEBUG`` set to anything but empty/0/false/no/off."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def global_options(
    debug: bool = typer.Option(False, "--debug", help=f"on an error, also print the traceback (or set {DEBUG_ENV}=1)"),
) -> None:
    # no docstring: the app's help text stays the one given to typer.Typer(help=...)
    if debug:
        _State.debug = True


def one_line(text: str) -> str:
    """``text`` with its line breaks (and the blanks around them) replaced by single spaces."""
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def _color(stream: Any) -> bool:
    if os.environ.get("NO_COLOR"):
        return False
    try:
        return bool(stream.isatty())
    except Exception:
        return False


def print_error(message: str) -> None:
    """Write ``error: <message>`` as one plain line on stderr. Never raises."""
    stream = sys.stderr
    text = one_line(message) or "unknown error"
    prefix = "\x1b[1;31merror:\x1b[0m " if _color(stream) else "error: "
    try:
        try:
            stream.write(prefix + text + "\n")
        except UnicodeEncodeError:  # e.g. LANG=C and a '≥' in the message
            enc = getattr(stream, "encoding", None) or "ascii"
            stream.write((prefix + text + "\n").encode(enc, "backslashreplace").decode(enc, "replace"))
        stream.flush()
    except Exception:  # a closed or broken stderr: nothing left to tell
        pass


def _print_traceback(e: BaseException) -> None:
    try:
        traceback.print_exception(type(e), e, e.__traceback__, file=sys.stderr)
        sys.stderr.flush()
    except Exception:
        pass


def _usage_message(e: Any) -> str:
    """One line for a Click usage error, with "did you mean" and where the help is."""
    if isinstance(e, _click_exc.NoSuchOption) and e.possibilities:
        message = f"{e.message}; did you mean {' or '.join(sorted(e.possibilities))}?"
    else:
        message = e.format_message()
    ctx = getattr(e, "ctx", None)
    try:
        if ctx is not None and ctx.command.get_help_option(ctx) is not None:
            message = f"{message.rstrip().rstrip('.')} (see '{ctx.command_path} {ctx.help_option_names[0]}')"
    except Exception:
        pass
    return message


def _internal_message(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    detail = lines[0] if lines else ""
    if len(detail) > _MAX_INTERNAL:
        detail = detail[:_MAX_INTERNAL] + "…"
    what = f"{type(e).__name__}: {detail}" if detail else type(e).__name__
    return (f"internal error ({what}); this is a bug in medslim, not in your input: rerun as "
            f"'medslim --debug COMMAND ...' (or with {DEBUG_ENV}=1) for the traceback and report it")


def handle_exception(e: BaseException, debug: bool = False) -> int:
    """Print ``e`` as one line on stderr (with the traceback first if ``debug``); return the exit code."""
    if isinstance(e, SystemExit):  # pragma: no cover - passed through by the caller
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    if isinstance(e, (typer.Exit, getattr(_click_exc, "Exit", typer.Exit))):
        return int(getattr(e, "exit_code", 0) or 0)
    if isinstance(e, _click_exc.NoArgsIsHelpError):
        # with Rich, typer has printed the help already while building the error
        msg = e.format_message()
        if msg.strip():
            try:
                sys.stderr.write(msg + "\n")
            except Exception:
                pass
        return e.exit_code
    if debug and not isinstance(e, (KeyboardInterrupt, Interrupted, _click_exc.UsageError)):
        _print_traceback(e)
    if isinstance(e, MedslimError):
        print_error(str(e) or type(e).__name__)
        return EXIT_USER
    if isinstance(e, _click_exc.UsageError):
        print_error(_usage_message(e))
        return EXIT_USER
    if isinstance(e, _click_exc.FileError):
        print_error(e.format_message())
        return EXIT_USER
    if isinstance(e, _click_exc.ClickException):
        print_error(e.format_message())
        return e.exit_code or EXIT_INTERNAL
    if isinstance(e, (typer.Abort, getattr(_click_exc, "Abort", typer.Abort))):
        print_error("aborted")
        return EXIT_INTERNAL
    if isinstance(e, (KeyboardInterrupt, Interrupted)):
        print_error("interrupted")
        return EXIT_INTERRUPTED
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        # the machine or the file system refused (permissions, a full disk, a missing path): not a bug
        where = f"'{e.filename}'" + (f" → '{e.filename2}'" if e.filename2 is not None else "")
        print_error(f"{e.strerror}: {where}; check the path, its permissions and the free space")
        return EXIT_USER
    print_error(_internal_message(e))
    return EXIT_INTERNAL


class Interrupted(Exception):
    """Ctrl-C (or SIGTERM, see ``medslim.cli.main``) during a command. Typer would turn the
    ``KeyboardInterrupt`` into a silent exit 130; this reaches :func:`handle_exception`."""


class MedslimGroup(TyperGroup):
    """The ``medslim`` group: Click runs non-standalone and every exception goes through
    :func:`handle_exception` (one stderr line, exit code 2 for user errors, 1 for bugs).

    ``CliRunner().invoke(app, ...)`` and the console script both call :meth:`main`.
    """

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:  # a caller that handles errors itself
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        _State.debug = debug_from_env()
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except SystemExit:
            raise
        except BaseException as e:  # noqa: BLE001 - the one place every failure ends up
            try:
                code = handle_exception(e, debug=_State.debug or debug_from_env())
            except Exception:  # never a traceback from the handler itself
                print_error(_internal_message(e))
                code = EXIT_INTERNAL
            sys.exit(code)
        # non-standalone Click returns the code of a typer.Exit (--help: 0); commands return None
        sys.exit(rv if isinstance(rv, int) and not isinstance(rv, bool) else 0)

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as e:
            raise Interrupted() from e
