"""Outputs that appear complete or not at all: write into a temporary sibling, then rename.

Every command that writes a folder or a file goes through these, so a failure (bad input
found late, Ctrl-C, a crash) never leaves a half-written output behind.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from medslim.errors import MedslimError


def check_output_parent(out: Path) -> None:
    """Fail early if a parent of ``out`` exists but is not a folder (``out`` cannot be created)."""
    for parent in Path(out).expanduser().absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise MedslimError(f"output {out} cannot be created: {parent} is a file, not a folder")
            return


def check_output_folder(out: Path, overwrite: bool, hint: str = "pass --overwrite to replace it") -> None:
    """Fail early (before any work) if ``out`` cannot be a folder, or exists, is not empty and
    ``overwrite`` is off (``hint``: what the user can do then)."""
    out = Path(out)
    check_output_parent(out)
    if out.exists() and not out.is_dir():
        raise MedslimError(f"output {out} exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise MedslimError(f"output folder {out} exists and is not empty; {hint}")


def check_output_file(out: Path, overwrite: bool) -> None:
    """Fail early if ``out`` cannot be a file, is a folder, or exists and ``overwrite`` is off."""
    out = Path(out)
    check_output_parent(out)
    if out.is_dir():
        raise MedslimError(f"output {out} is a folder; expected a file name")
    if out.exists() and not overwrite:
        raise MedslimError(f"output file {out} exists; pass --overwrite to replace it")


@contextlib.contextmanager
def atomic_folder(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder next to ``out``; on success it replaces ``out``."""
    out = Path(out).expanduser().resolve()
    check_output_folder(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it owner-only; outputs get the usual mode
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``out`` (same suffixes); on success it replaces ``out``."""
    out = Path(out).expanduser().resolve()
    check_output_file(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.tmp-", suffix="".join(out.suffixes), dir=out.parent)
    os.close(fd)
    tmp = Path(name)
    os.chmod(tmp, 0o666 & ~_umask())
    try:
        yield tmp
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
