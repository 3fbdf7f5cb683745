"""Atomic outputs (fsutil): concurrent writers, SIGTERM/SIGHUP/SIGKILL, the operating system saying no (full disk,
read-only, long names, links, the current folder), and outputs that would destroy inputs."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from gradmatch import fsutil
from gradmatch.cli import main
from gradmatch.errors import UserError
from gradmatch.fsutil import atomic_dir, atomic_file, check_not_input, check_output_dir, write_text

REPO = Path(__file__).resolve().parents[1]


def hidden(folder: Path) -> list[str]:
    """gradmatch's hidden entries in ``folder`` (temporaries, old results moved aside, lock files)."""
    return sorted(p.name for p in Path(folder).iterdir() if p.name.startswith(".gradmatch-"))


def listing(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with a file's bytes (None for folders, the target for links)."""
    out: dict[str, bytes | str | None] = {}
    for p in sorted(root.rglob("*")):
        key = str(p.relative_to(root))
        out[key] = os.readlink(p) if p.is_symlink() else (p.read_bytes() if p.is_file() else None)
    return out


def enter(writer) -> None:
    """Open and close an atomic_dir or atomic_file without writing anything (for the checks made on entry)."""
    with writer:
        pass


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1")


# A writer in another process: opens atomic_dir or atomic_file on OUT, writes, says it is ready and waits for GO.
WRITER = r"""
import os, sys, time
from pathlib import Path
from gradmatch.fsutil import atomic_dir, atomic_file
kind, out, sync, overwrite = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4] == "1"
def wait():
    (sync / "ready").write_text(str(os.getpid()))
    deadline = time.time() + 60
    while not (sync / "go").exists():
        if time.time() > deadline:
            sys.exit(3)
        time.sleep(0.01)
if kind == "dir":
    with atomic_dir(out, overwrite) as tmp:
        (tmp / "data.txt").write_text("new " + out.name)
        wait()
else:
    with atomic_file(out) as fh:
        fh.write("new " + out.name)
        wait()
"""


def _default_signals() -> None:
    for signum in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(signum, signal.SIG_DFL)


class Writer:
    """A WRITER subprocess, started and waited for until it is inside its write."""

    def __init__(self, kind: str, out: Path, sync: Path, overwrite: bool = False, code: str = WRITER):
        sync.mkdir(parents=True, exist_ok=True)
        for name in ("ready", "go"):
            (sync / name).unlink(missing_ok=True)
        self.sync = sync
        # the default disposition of the signals under test, whatever this process inherited (a CI runner started
        # with nohup or in the background ignores SIGHUP and SIGINT, and ignored signals pass to children)
        self.proc = subprocess.Popen([sys.executable, "-c", code, kind, str(out), str(sync), "1" if overwrite else "0"],
                                     env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     preexec_fn=_default_signals)
        deadline = time.time() + 60
        while not (sync / "ready").exists():
            assert self.proc.poll() is None and time.time() < deadline, self.proc.communicate()
            time.sleep(0.01)

    def finish(self) -> int:
        (self.sync / "go").write_text("")
        return self.proc.wait(60)

    def signal(self, signum: int) -> int:
        self.proc.send_signal(signum)
        return self.proc.wait(60)


# --------------------------------------------------------------------------- ordinary writes


def test_a_write_appears_whole_with_ordinary_modes_and_leaves_nothing(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    (tmp_path / "plain-dir").mkdir()
    with atomic_dir(tmp_path / "out") as tmp:
        assert not (tmp_path / "out").exists()
        (tmp / "a.txt").write_text("a")
    assert listing(tmp_path / "out") == {"a.txt": b"a"}
    write_text(tmp_path / "f.json", "{}\n")
    assert (tmp_path / "f.json").read_text() == "{}\n"
    # the umask decides the modes, as for the file and folder made above without gradmatch
    assert (tmp_path / "f.json").stat().st_mode == plain.stat().st_mode
    assert (tmp_path / "out").stat().st_mode == (tmp_path / "plain-dir").stat().st_mode
    assert hidden(tmp_path) == []


def test_an_error_removes_the_temporary_and_keeps_the_old_result(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(ValueError), atomic_dir(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
        raise ValueError("boom")
    with pytest.raises(KeyboardInterrupt), atomic_file(tmp_path / "f.txt") as fh:
        fh.write("partial")
        raise KeyboardInterrupt
    assert listing(tmp_path) == {"out": None, "out/old.txt": b"old"}


def test_overwrite_without_renameat2_moves_the_old_result_aside_and_removes_it(tmp_path, monkeypatch):
    monkeypatch.setattr(fsutil, "_renameat2", lambda *a: False)  # as on macOS or a file system without it
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with atomic_dir(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert listing(tmp_path) == {"out": None, "out/new.txt": b"new"}


def test_overwrite_of_a_link_replaces_the_link_not_the_folder_it_points_to(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "keep.txt").write_text("keep")
    (tmp_path / "out").symlink_to("real")
    with atomic_dir(tmp_path / "out", overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert listing(tmp_path) == {"out": None, "out/new.txt": b"new", "real": None, "real/keep.txt": b"keep"}


# --------------------------------------------------------------------------- concurrent writers


#: A name whose end reads as a process id that cannot exist (above Linux's largest pid_max, 2**22).
NO_SUCH_PID = "m-4194305"


@pytest.mark.parametrize("kind", ["dir", "file"])
@pytest.mark.parametrize("name", ["m-11", NO_SUCH_PID])
def test_a_live_writer_of_a_longer_name_survives_and_a_second_writer_of_its_output_is_refused(tmp_path, kind, name):
    """The old recovery took `out/m-11`'s temporary for a dead writer of `out/m` with pid 11 and deleted it."""
    out = tmp_path / "out"
    out.mkdir()
    other = Writer(kind, out / name, tmp_path / "sync")
    theirs = hidden(out)
    assert theirs  # its temporary (and lock file) beside the output
    if kind == "dir":
        with atomic_dir(out / "m") as tmp:
            (tmp / "data.txt").write_text("mine")
        assert (out / "m" / "data.txt").read_text() == "mine"
    else:
        write_text(out / "m", "mine")
        assert (out / "m").read_text() == "mine"
    assert hidden(out) == theirs  # nothing of the live writer was touched
    for attempt in (lambda: enter(atomic_dir(out / name, overwrite=True)),
                    lambda: enter(atomic_file(out / name)),
                    lambda: check_output_dir(out / name, overwrite=True)):
        with pytest.raises(UserError, match=rf"another gradmatch process \(pid {other.proc.pid} on .*\) is writing "
                                            rf"{re.escape(str(out / name))}"):
            attempt()
    assert hidden(out) == theirs
    assert other.finish() == 0
    new = (out / name / "data.txt") if kind == "dir" else (out / name)
    assert new.read_text() == f"new {name}"
    assert hidden(out) == []


def test_a_second_writer_gets_one_line_at_the_cli(tmp_path, capsys):
    from test_merge import build_family, gm_config

    fam = build_family(tmp_path / "fam", T=2)
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(gm_config(fam)))
    other = Writer("dir", tmp_path / "m", tmp_path / "sync")
    rc = main(["merge", str(tmp_path / "merge.yaml"), str(tmp_path / "m"), "--quiet", "--overwrite"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "another gradmatch process" in err and str(tmp_path / "m") in err
    assert other.finish() == 0
    assert (tmp_path / "m" / "data.txt").read_text() == "new m"


# A merge that, its folder written, waits for GO (or a signal) before the rename: a merge caught while writing.
SLOW_MERGE = r"""
import contextlib, os, sys, time
from pathlib import Path
import gradmatch.fsutil as fsutil
sync = Path(sys.argv[3])
atomic_dir = fsutil.atomic_dir
@contextlib.contextmanager
def slow_atomic_dir(out, overwrite=False):
    with atomic_dir(out, overwrite) as tmp:
        yield tmp
        (sync / "ready").write_text(str(os.getpid()))
        while not (sync / "go").exists():
            time.sleep(0.01)
fsutil.atomic_dir = slow_atomic_dir  # before gradmatch.merge imports it
from gradmatch.cli import main
sys.exit(main(["merge", sys.argv[1], sys.argv[2], "--quiet", "--max-shard-size", "2KB"]))
"""


def test_a_merge_writing_m_11_survives_a_merge_to_m_and_sigterm_leaves_nothing(tmp_path, capsys):
    from test_merge import build_family, gm_config

    fam = build_family(tmp_path / "fam", T=2)
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(yaml.safe_dump(gm_config(fam)))
    out = tmp_path / "out"
    out.mkdir()
    # Writer's argv layout: kind, out, sync (the merge script reads argv[1..3] as config, out, sync)
    other = Writer(str(cfg), out / NO_SUCH_PID, tmp_path / "sync", code=SLOW_MERGE)
    assert main(["merge", str(cfg), str(out / "m"), "--quiet", "--max-shard-size", "2KB"]) == 0
    assert other.finish() == 0, other.proc.communicate()
    assert sorted(p.name for p in out.iterdir()) == ["m", NO_SUCH_PID]
    theirs, mine = listing(out / NO_SUCH_PID), listing(out / "m")  # the same merge, complete
    assert sorted(theirs) == sorted(mine) and len([n for n in mine if n.endswith(".safetensors")]) > 1
    assert all(theirs[n] == mine[n] for n in mine if n.endswith(".safetensors"))
    # now SIGTERM a merge while it writes: status 143, no output, nothing hidden left
    victim = Writer(str(cfg), out / "t", tmp_path / "sync", code=SLOW_MERGE)
    assert hidden(out)  # caught while writing
    assert victim.signal(signal.SIGTERM) == 143
    assert sorted(p.name for p in out.iterdir()) == ["m", NO_SUCH_PID]


# --------------------------------------------------------------------------- signals and kills


@pytest.mark.parametrize("kind", ["dir", "file"])
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_a_signal_while_writing_leaves_the_old_result_and_nothing_else(tmp_path, kind, signum):
    out = tmp_path / "out" / "m"
    out.parent.mkdir()
    if kind == "dir":
        out.mkdir()
        (out / "data.txt").write_text("old")
    else:
        out.write_text("old")
    before = listing(out.parent)
    writer = Writer(kind, out, tmp_path / "sync", overwrite=True)
    assert hidden(out.parent)  # caught while writing
    rc = writer.signal(signum)
    # the status a shell reports for a process the signal ended (Ctrl-C: Python ends itself by SIGINT)
    assert rc == (-signum if signum == signal.SIGINT else 128 + signum), writer.proc.communicate()
    assert listing(out.parent) == before


def test_the_handler_is_installed_only_while_writing_and_never_over_the_applications(tmp_path):
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    with atomic_dir(tmp_path / "a"):
        assert signal.getsignal(signal.SIGTERM) is fsutil._on_signal
        with atomic_file(tmp_path / "b"):
            assert signal.getsignal(signal.SIGTERM) is fsutil._on_signal
        assert signal.getsignal(signal.SIGTERM) is fsutil._on_signal
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL

    def mine(signum, frame):
        pass

    previous = signal.signal(signal.SIGTERM, mine)
    try:
        with atomic_dir(tmp_path / "c"):
            assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.mark.parametrize("kind", ["dir", "file"])
def test_after_sigkill_the_next_write_of_that_output_clears_its_leftovers_only(tmp_path, kind):
    out = tmp_path / "out"
    out.mkdir()
    live = Writer(kind, out / NO_SUCH_PID, tmp_path / "sync-live")
    theirs = hidden(out)
    killed = Writer(kind, out / "m", tmp_path / "sync")
    assert killed.signal(signal.SIGKILL) == -signal.SIGKILL
    assert len(hidden(out)) > len(theirs) and not (out / "m").exists()  # the killed writer's leftovers
    if kind == "dir":
        with atomic_dir(out / "m") as tmp:
            (tmp / "data.txt").write_text("rerun")
    else:
        write_text(out / "m", "rerun")
    assert hidden(out) == theirs
    assert live.finish() == 0
    assert hidden(out) == []


def test_a_kill_between_the_two_renames_is_undone_by_the_next_write(tmp_path):
    """Without renameat2 the old result is moved aside first: a kill right then leaves no output at all."""
    code = WRITER.replace("from gradmatch.fsutil import atomic_dir, atomic_file", """
import gradmatch.fsutil as fsutil
from gradmatch.fsutil import atomic_dir, atomic_file
fsutil._renameat2 = lambda *a: False
rename = os.rename
def rename_then_die(src, dst):
    rename(src, dst)
    if Path(dst).name.startswith(".gradmatch-old-"):
        os._exit(9)
os.rename = rename_then_die""").replace("        wait()\n", "        (sync / 'ready').write_text('')\n", 1)
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    proc = subprocess.run([sys.executable, "-c", code, "dir", str(out), str(tmp_path), "1"], env=_env(),
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 9, proc.stderr
    assert not out.exists() and [n[:15] for n in hidden(tmp_path)] == [".gradmatch-lock", ".gradmatch-old-",
                                                                       ".gradmatch-tmp-"]
    with pytest.raises(UserError, match="already exists"):  # the check put the old result back first
        check_output_dir(out)
    assert listing(out) == {"old.txt": b"old"} and hidden(tmp_path) == []


def test_a_forged_lock_record_cannot_make_gradmatch_delete_anything_else(tmp_path):
    (tmp_path / "victim").mkdir()
    (tmp_path / "victim" / "precious.txt").write_text("keep")
    out = tmp_path / "out"
    out.mkdir()
    lock = out / fsutil._lock_name("m")
    (out / ".gradmatch-tmp-m-11-0123abcd").mkdir()  # looks like another output's temporary
    for tmp in ("../victim", "victim", ".gradmatch-tmp-/../../victim", str(tmp_path / "victim"),
                ".gradmatch-tmp-m-11-0123abcd"):
        lock.write_text(json.dumps({"target": "m", "tmp": tmp, "old": tmp}))
        with atomic_dir(out / "m", overwrite=True):
            pass
    lock.write_text(json.dumps({"target": "../victim", "tmp": ".gradmatch-tmp-x", "old": ".gradmatch-old-x"}))
    check_output_dir(out / "m", overwrite=True)
    assert (tmp_path / "victim" / "precious.txt").read_text() == "keep"
    assert hidden(out) == [".gradmatch-tmp-m-11-0123abcd"]


# --------------------------------------------------------------------------- the operating system says no


def _mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                          check=False)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs (root only; skipped where mounting is not permitted)."""
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "256k")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def _fill(disk: Path, leave: int) -> None:
    st = os.statvfs(disk)
    (disk / "filler").write_bytes(b"\0" * (st.f_bavail * st.f_frsize - leave))


@pytest.mark.parametrize("how", ["write", "safetensors", "torch.save", "file"])
def test_a_full_disk_is_one_line_and_the_old_result_is_kept(small_disk, how):
    out = small_disk / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    _fill(small_disk, 16 * 1024)
    before = listing(small_disk)
    with pytest.raises(UserError) as info:
        if how == "file":
            write_text(out / "old.txt", "x" * 100_000)
        else:
            with atomic_dir(out, overwrite=True) as tmp:
                import torch

                big = {"w": torch.zeros(50_000)}
                if how == "write":
                    (tmp / "w.bin").write_bytes(b"\1" * 200_000)
                elif how == "safetensors":
                    from safetensors.torch import save_file

                    save_file(big, tmp / "w.safetensors")
                else:
                    torch.save(big, tmp / "w.bin")
    shown = out / "old.txt" if how == "file" else out
    assert str(info.value) == f"cannot write {shown}: no space left on device; {shown} is unchanged"
    assert listing(small_disk) == before


def test_a_merge_onto_a_full_disk_exits_2_with_one_line_and_keeps_the_old_result(small_disk, tmp_path, capsys):
    from test_merge import build_family, gm_config

    fam = build_family(tmp_path / "fam", T=2)
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(gm_config(fam)))
    out = small_disk / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    _fill(small_disk, 8 * 1024)
    before = listing(small_disk)
    rc = main(["merge", str(tmp_path / "merge.yaml"), str(out), "--quiet", "--overwrite"])
    err = capsys.readouterr().err
    assert rc == 2 and err == f"gradmatch: error: cannot write {out}: no space left on device; {out} is unchanged\n"
    assert listing(small_disk) == before


def test_a_read_only_file_system_is_one_line_before_any_work(tmp_path):
    disk = tmp_path / "ro"
    _mount_tmpfs(disk, "64k")
    try:
        (disk / "out").mkdir()
        (disk / "out" / "old.txt").write_text("old")
        remount = subprocess.run(["mount", "-o", "remount,ro", str(disk)], capture_output=True, check=False)
        if remount.returncode:
            pytest.skip(f"cannot remount read-only: {remount.stderr.decode().strip()}")
        for attempt, shown in ((lambda: check_output_dir(disk / "new"), disk / "new"),
                               (lambda: enter(atomic_dir(disk / "out", overwrite=True)), disk / "out"),
                               (lambda: enter(atomic_dir(disk / "a" / "b")), disk / "a" / "b")):
            with pytest.raises(UserError, match=f"^cannot write {re.escape(str(shown))}: {re.escape(str(disk))} is "
                                                f"on a read-only file system$"):
                attempt()
        with pytest.raises(UserError) as info:
            write_text(disk / "f.json", "{}")
        assert str(info.value) == f"cannot write {disk / 'f.json'}: read-only file system; nothing was written"
        assert listing(disk) == {"out": None, "out/old.txt": b"old"}
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


@pytest.mark.parametrize("code", [errno.EROFS, errno.ENOSPC, errno.EDQUOT])
def test_a_refusal_of_the_os_while_writing_is_one_line(tmp_path, code):
    out = tmp_path / "out"
    with pytest.raises(UserError, match=f"^cannot write {out}: {os.strerror(code).lower()}; nothing was written$"):
        with atomic_dir(out) as tmp:
            (tmp / "part").write_text("x")
            raise OSError(code, os.strerror(code))
    assert listing(tmp_path) == {}


def test_permission_denied_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    mkdir = os.mkdir

    def refuse_temporaries(path, *args, **kwargs):
        if Path(path).name.startswith(".gradmatch-tmp-"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", refuse_temporaries)
    with pytest.raises(UserError, match=f"^cannot write {tmp_path / 'out'}: permission denied; nothing was written$"):
        with atomic_dir(tmp_path / "out"):
            pass
    monkeypatch.setattr(os, "access", lambda *a, **k: False)  # what a user without write permission sees
    with pytest.raises(UserError, match=f"^cannot write {tmp_path / 'out'}: permission denied in {tmp_path}$"):
        check_output_dir(tmp_path / "out")
    assert listing(tmp_path) == {}


@pytest.mark.parametrize("name", ["a" * 255, "é" * 127 + "x"])
def test_an_output_name_of_255_bytes_works(tmp_path, name):
    assert len(os.fsencode(name)) == 255
    with atomic_dir(tmp_path / name) as tmp:
        (tmp / "data.txt").write_text("ok")
    write_text(tmp_path / "f" / name, "ok")
    assert listing(tmp_path) == {name: None, f"{name}/data.txt": b"ok", "f": None, f"f/{name}": b"ok"}


def test_an_output_name_over_the_limit_is_one_line(tmp_path):
    out = tmp_path / ("a" * 256)
    with pytest.raises(UserError, match="its name is 256 bytes long, the file system allows at most 255"):
        enter(atomic_dir(out))
    with pytest.raises(UserError, match="its name is 256 bytes long, the file system allows at most 255"):
        write_text(tmp_path / "new" / ("b" * 256), "x")
    assert listing(tmp_path) == {}


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_broken_link_as_the_output_is_refused(tmp_path, overwrite):
    (tmp_path / "out").symlink_to(tmp_path / "gone")
    link = f"output {tmp_path / 'out'} is a broken symbolic link (to {tmp_path / 'gone'})"
    with pytest.raises(UserError, match=re.escape(link)):
        enter(atomic_dir(tmp_path / "out", overwrite))
    assert listing(tmp_path) == {"out": str(tmp_path / "gone")}


@pytest.mark.parametrize("out", [".", "..", "{work}", "{work}/sub/..", "{tmp}"])
def test_the_folder_you_stand_in_or_one_above_is_never_replaced(tmp_path, monkeypatch, out):
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    (work / "sub" / "keep.txt").write_text("keep")
    monkeypatch.chdir(work / "sub")
    before = listing(tmp_path)
    for overwrite in (False, True):
        with pytest.raises(UserError, match="is the folder you are working in, or contains it"):
            with atomic_dir(out.format(work=work, tmp=tmp_path), overwrite=overwrite):
                pass
    assert listing(tmp_path) == before


def test_a_path_ending_in_dot_dot_elsewhere_is_refused(tmp_path, monkeypatch):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    with pytest.raises(UserError, match=r"does not name a folder of its own \(it ends in \.\.\)"):
        enter(atomic_dir(tmp_path / "a" / "b" / "..", overwrite=True))
    assert listing(tmp_path) == {"a": None, "a/b": None, "here": None}


# --------------------------------------------------------------------------- outputs that would destroy inputs


@pytest.fixture
def inputs(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "data.jsonl").write_text("{}\n")
    (tmp_path / "link").symlink_to("model")
    return {"the model": tmp_path / "model", "the data": tmp_path / "data.jsonl", "the hub model": "bert-base-uncased"}


@pytest.mark.parametrize("out, words", [
    ("model", "is the model {model}: writing it would replace the model"),
    ("link", "is the model {model}: writing it would replace the model"),
    ("model/hessian", "lies inside the model {model}: writing it would change the model"),
    ("link/hessian/deeper", "lies inside the model {model}: writing it would change the model"),
    (".", "contains the model {model}: replacing it would delete the model"),
    ("data.jsonl", "is the data {data}: writing it would replace the data"),
    ("data.jsonl/metrics.json", "lies inside the data {data}: writing it would change the data"),
])
def test_an_output_that_is_contains_or_lies_inside_an_input_is_refused(tmp_path, inputs, out, words):
    expected = f"--out {tmp_path / out} " + words.format(model=inputs["the model"], data=inputs["the data"])
    with pytest.raises(UserError) as info:
        check_not_input(tmp_path / out, inputs, "--out")
    assert str(info.value) == expected + " (choose an output outside the inputs)"


def test_outputs_beside_the_inputs_are_allowed(tmp_path, inputs):
    for out in ("model-2", "mode", "data.jsonl.out", "bert-base-uncased", "new/model"):
        check_not_input(tmp_path / out, inputs)
    check_not_input(tmp_path / "x", [tmp_path / "model", None, ""])
    with pytest.raises(UserError, match=f"output {tmp_path / 'model'} is the input {tmp_path / 'link'}"):
        check_not_input(tmp_path / "model", [None, tmp_path / "link"])


def test_atomic_files_move_a_set_into_place_together_and_the_first_last(tmp_path, monkeypatch):
    """fsutil.atomic_files (evaluate's metrics, predictions and generations): nothing appears when any file of the set
    fails, before or while it is written; on success the first path is moved last (the one that says 'complete')."""
    from gradmatch.fsutil import atomic_files

    a, b = tmp_path / "metrics.json", tmp_path / "sub" / "predictions.json"
    with pytest.raises(RuntimeError):
        with atomic_files([a, b]) as (fa, fb):
            fa.write("m")
            fb.write("p")
            raise RuntimeError("the second file's text could not be made")
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == []
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UserError):
        with atomic_files([a, tmp_path / "afile" / "p.json"]) as files:
            files[0].write("m")
    assert not a.exists() and sorted(p.name for p in tmp_path.iterdir() if p.name != "sub") == ["afile"]

    moved = []
    real_replace = os.replace
    monkeypatch.setattr(fsutil.os, "replace", lambda src, dst: (moved.append(Path(dst).name), real_replace(src, dst)))
    with atomic_files([a, b], encoding="utf-8") as (fa, fb):
        fa.write("m")
        fb.write("p")
    assert moved == ["predictions.json", "metrics.json"]
    assert a.read_text() == "m" and b.read_text() == "p"
