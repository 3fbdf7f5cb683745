"""Atomic outputs: a result appears complete under its final name or not at all, and a write clears only
what a dead writer of that same output left behind. Also: refusing an output that would destroy an input."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

from gradmatch.errors import UserError

# Beside an output OUT, a writer keeps (all hidden, all gone after it ends, whatever way it ends but SIGKILL):
#   .gradmatch-lock-<label>-<hash>  the writer's lock (flock, held for its whole life) and its record: the exact
#                                   name OUT and the exact names of the two entries below (JSON)
#   .gradmatch-tmp-<label>-<rand>   the new folder (atomic_dir) or file (atomic_file) being written
#   .gradmatch-old-<label>-<rand>   the old OUT while it is moved aside (--overwrite where renameat2 cannot swap)
# <label> is OUT's name cut to _LABEL_BYTES (for people reading a listing; it decides nothing), <hash> comes from
# the whole name, so every writer of OUT, and only those, use the same lock file. A free lock proves its writer
# dead (the kernel drops an flock when its process dies, whatever its pid becomes later); the next writer of OUT
# then removes exactly what the record names, putting an old OUT back if OUT is missing.
_TMP_PREFIX = ".gradmatch-tmp-"
_OLD_PREFIX = ".gradmatch-old-"
_LOCK_PREFIX = ".gradmatch-lock-"
#: Bytes of the output's name kept in hidden names: with the prefixes and the random part they stay far below the
#: 255 bytes a name may have, so an output name of 255 bytes works.
_LABEL_BYTES = 100
#: A failed write that leaves less free space than this is reported as a full disk (see _no_room): a disk that
#: refused a write has (almost) no free block left.
_FULL_BYTES = 64 << 10
#: flock errors that mean "this file system has no locks" (some FUSE and old NFS mounts): write without one.
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}
#: Signals that unwind a write (SIGTERM: what SLURM and Snakemake send to stop a job; SIGHUP: a closed terminal).
_UNWIND = (signal.SIGTERM, signal.SIGHUP)


def check_output_dir(out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Fail early (before any work) when ``out`` may not be written or replaced; returns it as a Path.

    A dead writer's leftovers beside ``out`` are cleared first (an old result it had moved aside is put back);
    a live writer of ``out`` (another process) is refused: "another gradmatch process is writing OUT".
    """
    out = Path(out)
    ancestor = _check_target(out)
    parent = out.absolute().parent
    if os.path.lexists(parent / _lock_name(out.name)):  # a writer of out is alive, or died: find out which
        with _Writer(parent / out.name, out):
            pass
    if out.exists() and not overwrite:
        raise UserError(f"output {out} already exists (pass --overwrite to replace it)")
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out} exists and is not a folder")
    _check_writable(out, ancestor)
    return out


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a new hidden folder beside ``out``; when the block ends without an error, it becomes ``out`` in one
    rename. ``out`` keeps what it held until then, and after any failure.

    With ``overwrite`` the new folder and the old ``out`` swap in one step (Linux ``renameat2(RENAME_EXCHANGE)``);
    where that is not available the old ``out`` is moved aside first and a kill between the two renames is undone
    by the next write. An exception, Ctrl-C, SIGTERM or SIGHUP removes the hidden folder (the two signals then end
    the process with status 128 + the signal's number, see :class:`Terminated`); after SIGKILL the next write of
    ``out`` removes it. A full disk or a read-only file system is a :class:`UserError` naming ``out``.
    """
    out = check_output_dir(out, overwrite)
    target = out.absolute().parent / out.name
    kept = os.path.lexists(target)
    with _os_errors(out, kept):
        target.parent.mkdir(parents=True, exist_ok=True)
    with _unwinding_signals(), _Writer(target, out) as writer:
        with _os_errors(out, kept):
            tmp = writer.make_temporary(folder=True)
        try:
            yield tmp
        except Exception as exc:
            _raise_if_no_room(exc, out, target.parent, kept)
            raise
        with _signals_deferred(), _os_errors(out, kept):
            _commit_dir(tmp, target, writer.old, out, overwrite)


def _commit_dir(tmp: Path, target: Path, old: Path, out: Path, overwrite: bool) -> None:
    if not os.path.lexists(target):
        try:
            if not _renameat2(tmp, target, _RENAME_NOREPLACE):
                os.rename(tmp, target)
            return
        except FileExistsError:  # out appeared since the check: treat it as existing
            pass
    if not overwrite:
        raise UserError(f"output {out} appeared while working (pass --overwrite to replace it)")
    if not _renameat2(tmp, target, _RENAME_EXCHANGE):  # (done: tmp holds the old out, and the writer removes it)
        os.rename(target, old)  # the writer's record names old: a kill before the next line is undone
        os.rename(tmp, target)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w", **kwargs) -> Iterator:
    """Open a new hidden file beside ``path``; when the block ends without an error it replaces ``path`` in one
    rename. Leftovers, signals and full disks as in :func:`atomic_dir`."""
    path = Path(path)
    _check_name_length(path)
    target = path.absolute()
    kept = os.path.lexists(target)
    with _os_errors(path, kept):
        target.parent.mkdir(parents=True, exist_ok=True)
    with _unwinding_signals(), _Writer(target, path) as writer:
        with _os_errors(path, kept):
            fd = writer.make_temporary(folder=False)
        try:
            fh = open(fd, mode, **kwargs)
        except BaseException:
            os.close(fd)
            raise
        try:
            with fh:
                yield fh
                fh.flush()
                os.fsync(fh.fileno())
        except Exception as exc:
            _raise_if_no_room(exc, path, target.parent, kept)
            raise
        with _signals_deferred(), _os_errors(path, kept):
            os.replace(writer.tmp, target)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    path = Path(path)
    with atomic_file(path, encoding="utf-8") as fh:
        fh.write(text)
    return path


def check_not_input(out: str | os.PathLike, inputs: Mapping[str, str | os.PathLike | None] | Iterable,
                    what: str = "output") -> None:
    """Refuse an output that is, contains or lies inside one of ``inputs``: a mapping from a description ("the
    model") to a path, or plain paths. Paths are compared resolved (links followed); inputs that are None or do
    not exist (a hub name) are skipped. One line names both: "output X lies inside the model Y: ..."."""
    items = inputs.items() if isinstance(inputs, Mapping) else (("the input", p) for p in inputs)
    real_out = canonical(out)
    for description, path in items:  # both spelled as the system opens them: `~` expanded, links followed, `..` taken
        if path is None or str(path) == "" or not os.path.lexists(os.path.expanduser(os.fspath(path))):
            continue
        real_in = canonical(path)
        if real_out == real_in or (real_out.exists() and os.path.samefile(real_out, real_in)):
            harm = f"is {description} {path}: writing it would replace {description}"
        elif real_in in real_out.parents:
            harm = f"lies inside {description} {path}: writing it would change {description}"
        elif real_out in real_in.parents:
            harm = f"contains {description} {path}: replacing it would delete {description}"
        else:
            continue
        raise UserError(f"{what} {out} {harm} (choose an output outside the inputs)")


def canonical(path: str | os.PathLike) -> Path:
    """The one spelling of a path that two aliases of it share: absolute, links followed, ``..`` and ``.`` taken
    (as the system would open it: ``a/../b`` with ``a`` a link goes up from the link's target)."""
    return Path(os.path.realpath(os.path.expanduser(os.fspath(path))))


def check_distinct_outputs(outputs: Mapping[str, str | os.PathLike | None], what: str = "outputs") -> None:
    """Refuse two outputs that are one file under different spellings (``a/../b``, a linked folder, ``./x``):
    one line naming both."""
    seen: dict[Path, tuple[str, str | os.PathLike]] = {}
    for description, path in outputs.items():
        if path is None:
            continue
        key = canonical(path)
        if key in seen:
            other, first = seen[key]
            raise UserError(f"two {what} are the same file: {other} {first} and {description} {path}")
        seen[key] = (description, path)


class Terminated(SystemExit):
    """SIGTERM or SIGHUP arrived while an output was being written (main thread only; Python runs handlers there).

    Raised there so that the hidden temporaries are removed on the way out. It is a SystemExit (``except
    Exception`` does not stop it) whose code is 128 + the signal's number, the status a shell reports for a
    process the signal ended: 143 for SIGTERM.
    """

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signum = signum

    def __str__(self) -> str:
        return f"terminated by {signal.Signals(self.signum).name}"


# --------------------------------------------------------------------------- the writer of one output


class _Writer:
    """One writer of ``target``: holds its lock file for its whole life, clears a dead writer's leftovers on
    entry, and on exit removes its own temporaries (putting an old ``target`` back if ``target`` is missing)."""

    def __init__(self, target: Path, shown: Path):
        self.target, self.shown, self.parent = target, shown, target.parent
        self.lock = self.parent / _lock_name(target.name)
        self.fd: int | None = None
        self.pid = os.getpid()
        self.record: dict = {}
        self.exclusive = False

    @property
    def tmp(self) -> Path:
        return self.parent / self.record["tmp"]

    @property
    def old(self) -> Path:
        return self.parent / self.record["old"]

    def __enter__(self) -> _Writer:
        try:
            with _os_errors(self.shown, os.path.lexists(self.target)):
                self.exclusive = self._lock()
                if self.exclusive:
                    _undo(self.parent, self.lock.name, _read_record(self.fd))
        except BaseException:
            self._close()
            raise
        return self

    def __exit__(self, *exc_info) -> bool:
        if self.fd is None or os.getpid() != self.pid:  # a forked child inherits the block: its parent cleans up
            return False
        with _signals_deferred():
            try:
                _undo(self.parent, self.lock.name, self.record)
                _fsync_dir(self.parent)
                if self.exclusive or self.record:  # without locks, a record not ours may belong to a live writer
                    os.unlink(self.lock)
            except OSError:  # the lock file and its record stay: the next writer of the output retries
                pass
            finally:
                self._close()
        return False

    def _lock(self) -> bool:
        """Open and flock the lock file; True when the lock is ours alone (False: the file system has no locks)."""
        while True:
            fd = os.open(self.lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                record = _read_record(fd)
                os.close(fd)
                who = f" (pid {record['pid']} on {record['host']})" if {"pid", "host"} <= set(record) else ""
                raise UserError(f"another gradmatch process{who} is writing {self.shown}: wait for it to end, "
                                f"or choose another output") from None
            except OSError as exc:
                if exc.errno not in _NO_LOCKS:
                    os.close(fd)
                    raise
                self.fd = fd
                return False
            # The last owner unlinks the file while holding the lock: if we locked such an unlinked file,
            # try again with the one now at the path (the usual lock-file dance).
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.lock, follow_symlinks=False))
            except FileNotFoundError:
                same = False
            if same:
                self.fd = fd
                return True
            os.close(fd)

    def make_temporary(self, folder: bool) -> int | Path:
        """Record, then create the hidden temporary: a folder (returns its path) or a file (returns its fd)."""
        label = _label(self.target.name)
        for _ in range(100):
            rand = secrets.token_hex(4)
            names = {"tmp": f"{_TMP_PREFIX}{label}-{rand}", "old": f"{_OLD_PREFIX}{label}-{rand}" if folder else None}
            if any(n and os.path.lexists(self.parent / n) for n in names.values()):
                continue
            self.record = {"target": self.target.name, **names, "pid": os.getpid(), "host": socket.gethostname(),
                           "started": round(time.time(), 3)}
            # written before the temporary exists, so that a kill at any later moment leaves nothing unrecorded
            data = json.dumps(self.record).encode()
            os.ftruncate(self.fd, 0)
            if os.pwrite(self.fd, data, 0) != len(data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.lock))
            try:
                if folder:
                    os.mkdir(self.tmp)  # the umask decides the mode, as for any folder the user makes
                    return self.tmp
                return os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
            except FileExistsError:
                continue
        raise FileExistsError(errno.EEXIST, "no free temporary name", str(self.parent))

    def _close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _undo(parent: Path, lock_name: str, record: dict) -> None:
    """Remove what ``record`` names beside its target; put a moved-aside old target back if the target is missing.

    Only names a writer of this lock can have made are touched (a record is data on disk: never trust it with
    a path). Raises OSError when something could not be removed."""
    target = record.get("target")
    if not isinstance(target, str) or _lock_name(target) != lock_name or not _plain_name(target):
        return
    old, tmp = record.get("old"), record.get("tmp")
    if _temporary_of(old, _OLD_PREFIX, target) and os.path.lexists(parent / old):
        if not os.path.lexists(parent / target):
            os.rename(parent / old, parent / target)
        else:
            _remove(parent / old)
    if _temporary_of(tmp, _TMP_PREFIX, target) and os.path.lexists(parent / tmp):
        _remove(parent / tmp)


def _plain_name(name) -> bool:
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\0" not in name


def _temporary_of(name, prefix: str, target: str) -> bool:
    """Whether ``name`` is one that make_temporary gives a writer of ``target`` (no other output's writer can)."""
    return isinstance(name, str) and re.fullmatch(re.escape(prefix + _label(target)) + "-[0-9a-f]{8}", name) is not None


def _read_record(fd: int) -> dict:
    try:
        record = json.loads(os.pread(fd, 1 << 16, 0) or b"{}")
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _label(name: str) -> str:
    while len(os.fsencode(name)) > _LABEL_BYTES:
        name = name[:-1]
    return name


def _lock_name(name: str) -> str:
    return f"{_LOCK_PREFIX}{_label(name)}-{hashlib.sha256(os.fsencode(name)).hexdigest()[:12]}"


def _remove(path: Path) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


# --------------------------------------------------------------------------- checks and errors


def _check_target(out: Path) -> Path:
    """Refuse an output path that cannot be written as asked (checks only, nothing is written); returns the
    nearest existing folder above ``out``."""
    with contextlib.suppress(OSError):
        here = Path.cwd().resolve()
        if os.path.lexists(out) and (out.resolve() == here or out.resolve() in here.parents):
            raise UserError(f"output {out} is the folder you are working in, or contains it: gradmatch will not "
                            f"replace it (choose a new folder)")
    if out.name in ("", ".", ".."):
        raise UserError(f"output {out} does not name a folder of its own (it ends in {out.name or '/'}); "
                        f"give the folder's own path")
    if os.path.islink(out) and not os.path.exists(out):
        raise UserError(f"output {out} is a broken symbolic link (to {os.readlink(out)}): remove it or choose "
                        f"another output")
    parent = out.absolute().parent
    if parent.exists() and not parent.is_dir():
        raise UserError(f"cannot create {out}: {parent} is not a folder")
    return _check_name_length(out)


def _check_name_length(out: Path) -> Path:
    """Refuse a name longer than the file system allows; returns the nearest existing folder above ``out``."""
    ancestor = out.absolute().parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    try:
        name_max = os.pathconf(ancestor, "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    if len(os.fsencode(out.name)) > name_max:
        raise UserError(f"output {out}: its name is {len(os.fsencode(out.name))} bytes long, the file system "
                        f"allows at most {name_max} (choose a shorter name)")
    return ancestor


def _check_writable(out: Path, ancestor: Path) -> None:
    if not ancestor.is_dir():
        raise UserError(f"cannot create {out}: {ancestor} is not a folder")
    with contextlib.suppress(OSError):
        if os.statvfs(ancestor).f_flag & os.ST_RDONLY:
            raise UserError(f"cannot write {out}: {ancestor} is on a read-only file system")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UserError(f"cannot write {out}: permission denied in {ancestor}")


@contextlib.contextmanager
def _os_errors(out: Path, kept: bool) -> Iterator[None]:
    """An OSError of gradmatch's own steps (folders, lock, renames) becomes one line naming ``out``."""
    try:
        yield
    except OSError as exc:
        name = str(exc.filename or "")  # shown unless it is out itself or one of the hidden names
        where = f" ({name})" if name and ".gradmatch-" not in name and Path(name) not in (out, out.absolute()) else ""
        raise UserError(f"cannot write {out}: {_reason(exc)}{where}{_kept(out, kept)}") from exc


def _raise_if_no_room(exc: Exception, out: Path, folder: Path, kept: bool) -> None:
    """Report a write that failed because the disk is full, over quota or read-only as one line naming ``out``
    (also in place of a UserError raised for such an OSError, which may name a hidden temporary file)."""
    if isinstance(exc, UserError):
        cause = exc.__cause__
        reason = _reason(cause) if isinstance(cause, OSError) and cause.errno in _NO_ROOM else None
    else:
        reason = _no_room(exc, folder)
    if reason:
        raise UserError(f"cannot write {out}: {reason}{_kept(out, kept)}") from exc


_NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def _no_room(exc: BaseException, folder: Path) -> str | None:
    if isinstance(exc, OSError) and exc.errno in _NO_ROOM:
        return _reason(exc)
    text = str(exc)
    for code in _NO_ROOM:  # safetensors (Rust) wraps the OS error in its own exception, "... (os error 28)"
        if os.strerror(code) in text:
            return os.strerror(code).lower()
    # torch.save reports a full disk as "[enforce fail at inline_container.cc] unexpected pos 576 vs 534":
    # ask the file system itself (before the temporary is removed and frees the space)
    try:
        st = os.statvfs(folder)
    except OSError:
        return None
    free = (st.f_bfree if os.geteuid() == 0 else st.f_bavail) * st.f_frsize
    return os.strerror(errno.ENOSPC).lower() if free < _FULL_BYTES else None


def _reason(exc: OSError) -> str:
    text = exc.strerror or str(exc)
    return text[:1].lower() + text[1:]


def _kept(out: Path, kept: bool) -> str:
    return f"; {out} is unchanged" if kept else "; nothing was written"


# --------------------------------------------------------------------------- signals


class _SignalState:
    installed_by: int | None = None  # the pid that installed the unwinding handlers (None: not installed)
    deferred = 0  # depth of _signals_deferred blocks in the main thread
    pending: int | None = None  # a signal that arrived in such a block
    terminating = False  # a signal is unwinding the stack: later ones must not cut its clean-up short


_signals = _SignalState()


def _on_signal(signum: int, frame) -> None:
    if _signals.installed_by not in (None, os.getpid()):  # a forked child inherited the handler: act as without it
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    if _signals.deferred or _signals.terminating:
        _signals.pending = _signals.pending or signum
        return
    _raise_for(signum)


def _raise_for(signum: int) -> None:
    if _signals.installed_by == os.getpid():
        _signals.terminating = True
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise Terminated(signum)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def _unwinding_signals() -> Iterator[None]:
    """While writing, SIGTERM and SIGHUP raise :class:`Terminated` (where the application left them at their
    default action), so the temporaries are removed as for Ctrl-C; the handlers are restored afterwards."""
    if not _main_thread() or _signals.installed_by == os.getpid():  # not ours to set, or set by an outer write
        yield
        return
    previous = {}
    _signals.installed_by, _signals.terminating, _signals.pending = os.getpid(), False, None
    try:
        for signum in _UNWIND:
            if signal.getsignal(signum) == signal.SIG_DFL:
                previous[signum] = signal.signal(signum, _on_signal)
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _signals.installed_by, _signals.terminating, _signals.pending = None, False, None


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Ctrl-C, SIGTERM and SIGHUP that arrive in here take effect at its end: a commit or a clean-up is never cut
    in half. (Blocking them with sigmask would not do: another thread may take the signal for Python.)"""
    if not _main_thread():
        yield
        return
    swap_int = signal.getsignal(signal.SIGINT) is signal.default_int_handler
    _signals.deferred += 1
    try:
        if swap_int:
            signal.signal(signal.SIGINT, _on_signal)
        yield
    finally:
        if swap_int:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        _signals.deferred -= 1
        if not _signals.deferred and _signals.pending is not None:
            signum, _signals.pending = _signals.pending, None
            if not _signals.terminating:  # (else it only repeats the signal being handled)
                _raise_for(signum)


# --------------------------------------------------------------------------- system calls

_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_renameat2_fn = None


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """Linux renameat2: True when done, False where the system or file system lacks it; OSError otherwise."""
    global _renameat2_fn
    if _renameat2_fn is None:
        try:
            _renameat2_fn = ctypes.CDLL(None, use_errno=True).renameat2
            _renameat2_fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        except (OSError, AttributeError):
            _renameat2_fn = False
    if not _renameat2_fn:
        return False
    at_fdcwd = -100
    if _renameat2_fn(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(src), None, str(dst))


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_files(paths: Iterable[str | os.PathLike], mode: str = "w", **kwargs) -> Iterator[list]:
    """The outputs of one command as a set: a new hidden file beside each of ``paths`` (as :func:`atomic_file`),
    yielded as open files in that order. Only when the block and every file's writing succeeded do they replace
    their paths, one rename each, the *first* path last — name the file that says the set is complete (metrics)
    first. An error before the renames (in the block, opening or writing any file) removes every temporary, so no file
    of the set appears; only a failed rename or a kill between the renames (a few microseconds) can leave later files
    moved, and then the first path is not written."""
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(atomic_file(path, mode, **kwargs)) for path in paths]
