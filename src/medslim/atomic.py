"""Outputs that appear complete or not at all: write into a temporary sibling, then rename.

Every command that writes a folder or a file goes through these, so a failure (bad input
found late, Ctrl-C, SIGTERM, a crash) never leaves a half-written output behind. A run killed
outright (SIGKILL, power loss) cannot clean up: its hidden ``.OUT.tmp-<host>-<pid>-…`` sibling
is never taken for ``OUT``, and the next write of ``OUT`` removes it once that process is gone.
A write the file system refuses (disk full, quota, file size limit) is a ``MedslimError``.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import socket
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
    remove_stale_temporaries(out)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(out), dir=out.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it owner-only; outputs get the usual mode
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_refused(e, out) or e


@contextlib.contextmanager
def atomic_file(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``out`` (same suffixes); on success it replaces ``out``."""
    out = Path(out).expanduser().resolve()
    check_output_file(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    fd, name = tempfile.mkstemp(prefix=_temp_prefix(out), suffix="".join(out.suffixes), dir=out.parent)
    os.close(fd)
    tmp = Path(name)
    os.chmod(tmp, 0o666 & ~_umask())
    try:
        yield tmp
        os.replace(tmp, out)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        raise write_refused(e, out) or e


_REFUSED = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
            errno.EFBIG: "a file exceeds the file size limit"}
# torch.save reports a failed write of its zip archive as a RuntimeError without an errno
_TORCH_WRITE_FAILED = ("PytorchStreamWriter failed", "unexpected pos", "file write failed")


def write_refused(e: BaseException, out: Path) -> MedslimError | None:
    """A ``MedslimError`` naming ``out`` if ``e`` is the file system refusing a write (full
    disk, quota, file size limit; also as torch.save reports it), else ``None``."""
    if isinstance(e, OSError) and e.errno in _REFUSED:
        reason = _REFUSED[e.errno]
    elif isinstance(e, RuntimeError) and "inline_container" in str(e) and any(m in str(e) for m in _TORCH_WRITE_FAILED):
        reason = "the file system refused a write (a full disk or a file size limit)"
    else:
        return None
    return MedslimError(f"cannot write {out}: {reason}; nothing was written — free some space or choose "
                        f"another output folder")


def _host_prefix(out: Path) -> str:
    return f".{out.name}.tmp-{socket.gethostname()}-"


def _temp_prefix(out: Path) -> str:
    """``.OUT.tmp-<host>-<pid>-``: hidden, and names the process that may still be writing it."""
    return f"{_host_prefix(out)}{os.getpid()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temporaries(out: Path) -> list[Path]:
    """Remove the temporary siblings of ``out`` left by killed runs on this host (their process
    no longer exists); returns what was removed. Temporaries of live processes, of other hosts,
    and anything not named by :func:`_temp_prefix` are left alone."""
    prefix, removed = _host_prefix(out), []
    for p in out.parent.iterdir():
        pid = p.name[len(prefix):].split("-", 1)[0] if p.name.startswith(prefix) else ""
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
