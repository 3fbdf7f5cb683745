"""A warm start for local jobs: one process imports torch and transformers once, then forks a child per job.

Importing transformers costs seconds per process, and a run has dozens of short jobs. For the local
executor, :func:`start` launches this server; Snakemake still schedules every job, and each job's
command (``python -m gradmatch.pipeline.jobrun SPEC``) hands its spec, thread count and stdout/stderr
(as file descriptors) to the server, which forks a child that runs the job and reports its exit status.
A job that cannot reach the server runs in its own process as usual; on clusters no server is used.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time

#: Environment variable naming the server's socket (set by the runner for Snakemake's local jobs).
ENV = "GRADMATCH_JOB_SERVER"

#: What the server imports before it forks (what every job would import on its own).
PRELOAD = (
    "torch", "datasets", "transformers", "gradmatch.data", "gradmatch.models", "gradmatch.train",
    "gradmatch.evaluate", "gradmatch.fisher", "gradmatch.merge", "transformers.models.vit.modeling_vit",
    "transformers.models.bert.modeling_bert", "transformers.trainer",
)


# --------------------------------------------------------------------------- client (the job's command)


def submit(spec: str, threads: int) -> int | None:
    """Run the job in a child of the server; its exit status, or None when no server answers."""
    path = os.environ.get(ENV)
    if not path or not os.path.exists(path):
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
        request = json.dumps({"spec": os.path.abspath(spec), "threads": threads, "cwd": os.getcwd()}).encode()
        socket.send_fds(sock, [request + b"\n"], [1, 2])
    except OSError:
        sock.close()
        return None
    with sock:
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = sock.recv(64)
            if not chunk:  # the server died before the job ended
                print("gradmatch: error: the job server stopped while running this job", file=sys.stderr)
                return 1
            reply += chunk
    return int(reply.decode().strip())


# --------------------------------------------------------------------------- server


def _die_with_parent() -> None:
    """Linux: the child gets SIGKILL when the server dies (a killed run leaves no orphan jobs)."""
    server = os.getppid()
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != server:
        os._exit(1)


def _run_child(request: dict, fds: list[int]) -> None:
    """In the forked child: take over the job's stdout/stderr and run it; never returns."""
    code = 1
    try:
        _die_with_parent()
        os.setpgid(0, 0)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.dup2(fds[0], 1)
        os.dup2(fds[1], 2)
        for fd in fds:
            os.close(fd)
        os.chdir(request.get("cwd", "."))
        from gradmatch.pipeline.jobs import execute

        code = execute(request["spec"], int(request["threads"]))
    except SystemExit as exc:  # e.g. fsutil.Terminated after SIGTERM: its status (143) is the job's
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001 - the child must always exit, with the error in its log
        import traceback

        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def serve(path: str) -> None:
    """Bind ``path``, import the heavy modules, then fork one child per request (single-threaded).

    The server stops when the `gradmatch run` that started it goes away, even if that run was killed.
    """
    owner = os.getppid()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(64)  # jobs that connect while the imports run wait in the backlog
    import importlib

    for name in PRELOAD:
        with contextlib.suppress(Exception):
            importlib.import_module(name)
    children: dict[int, socket.socket] = {}  # pid -> the client's connection

    def stop(*_):
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGTERM)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while True:
        if os.getppid() != owner:  # that run was killed without stopping us: stop too, never linger
            stop()
        readable, _, _ = select.select([server, *children.values()], [], [], 0.2)
        for sock in readable:
            if sock is server:
                conn, _ = server.accept()
                try:
                    msg, fds, _, _ = socket.recv_fds(conn, 65536, 2)
                    request = json.loads(msg.decode())
                except (OSError, ValueError):
                    conn.close()
                    continue
                pid = os.fork()
                if pid == 0:
                    for other in (server, conn, *children.values()):
                        other.close()
                    _run_child(request, list(fds))
                for fd in fds:
                    os.close(fd)
                children[pid] = conn
            else:  # a client went away (Snakemake cancelled the job): stop its child
                if not sock.recv(1, socket.MSG_PEEK):
                    for pid, conn in children.items():
                        if conn is sock:
                            with contextlib.suppress(ProcessLookupError):
                                os.killpg(pid, signal.SIGTERM)
        for pid, conn in list(children.items()):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                with contextlib.suppress(OSError):
                    conn.sendall(f"{os.waitstatus_to_exitcode(status) if status else 0}\n".encode())
                conn.close()
                del children[pid]


@contextlib.contextmanager
def running(env: dict[str, str]):
    """Start a server for the duration of a local run; sets ``env[ENV]`` to its socket."""
    folder = tempfile.mkdtemp(prefix="gradmatch-js-")
    path = os.path.join(folder, "sock")
    proc = subprocess.Popen([sys.executable, "-m", "gradmatch.pipeline.jobserver", path], stdin=subprocess.DEVNULL,
                            env=dict(env))
    deadline = time.time() + 10
    while not os.path.exists(path) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    if os.path.exists(path):
        env[ENV] = path
    try:
        yield proc
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        if proc.poll() is None:
            proc.kill()
        with contextlib.suppress(OSError):
            os.unlink(path)
        with contextlib.suppress(OSError):
            os.rmdir(folder)


if __name__ == "__main__":
    serve(sys.argv[1])
