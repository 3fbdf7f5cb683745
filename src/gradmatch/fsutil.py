"""Atomic output folders: a result appears complete under its final name, or not at all."""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from gradmatch.errors import UserError

_TMP_PREFIX = ".gradmatch-tmp-"
_OLD_PREFIX = ".gradmatch-old-"


def check_output_dir(out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Fail early (before any work) when ``out`` exists and may not be replaced.

    Leftovers of a process that was killed while writing ``out`` are cleared first (see :func:`atomic_dir`).
    """
    out = Path(out)
    _recover(out)
    if out.exists() and not overwrite:
        raise UserError(f"output {out} already exists (pass --overwrite to replace it)")
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out} exists and is not a folder")
    parent = out.absolute().parent
    if parent.exists() and not parent.is_dir():
        raise UserError(f"cannot create {out}: {parent} is not a folder")
    return out


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; on success rename it to ``out`` in one step.

    On an exception the temporary folder is removed; after a kill it stays hidden beside ``out``
    (``.gradmatch-tmp-<name>-<pid>-*``) until the next write of ``out`` clears it. ``out`` keeps
    whatever it held before. With ``overwrite`` the new folder and the existing ``out`` are swapped in
    one step (Linux ``renameat2(RENAME_EXCHANGE)``); where that is not available the old folder is
    first moved aside (``.gradmatch-old-*``), and a kill between the two renames is undone by the next
    write of ``out``.
    """
    out = check_output_dir(out, overwrite)
    parent = out.absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{out.name}-{os.getpid()}-", dir=parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it owner-only
        if out.exists():
            if not overwrite:
                raise UserError(f"output {out} appeared while working (pass --overwrite to replace it)")
            if not _exchange(tmp, out):
                old = Path(tempfile.mkdtemp(prefix=f"{_OLD_PREFIX}{out.name}-{os.getpid()}-", dir=parent))
                os.rename(out, old / out.name)
                os.rename(tmp, out)
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
        _fsync_dir(parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # on success: gone, or (after an exchange) the old result


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 with RENAME_EXCHANGE); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _recover(out: Path) -> None:
    """Clear what a killed writer of ``out`` left beside it: its temporary folder, and an old result it
    had moved aside (put back when ``out`` is missing). Folders of live processes are left alone."""
    parent = out.absolute().parent
    if not parent.is_dir():
        return
    for prefix in (_OLD_PREFIX, _TMP_PREFIX):
        start = f"{prefix}{out.name}-"
        for leftover in parent.glob(glob_escape(start) + "*"):
            pid = leftover.name[len(start):].split("-", 1)[0]
            if not pid.isdigit() or _pid_alive(int(pid)):
                continue
            moved_aside = leftover / out.name
            if prefix == _OLD_PREFIX and moved_aside.is_dir() and not os.path.lexists(out):
                os.rename(moved_aside, out)
            shutil.rmtree(leftover, ignore_errors=True)


def glob_escape(text: str) -> str:
    """``text`` with glob's special characters quoted."""
    import glob

    return glob.escape(text)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w", **kwargs) -> Iterator:
    """Open a temporary file beside ``path`` and rename it over ``path`` once written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX + path.name + "-", dir=path.parent)
    os.close(fd)
    try:
        with open(tmp, mode, **kwargs) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it owner-only; give it a normal file's mode
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    path = Path(path)
    with atomic_file(path, encoding="utf-8") as fh:
        fh.write(text)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
