"""Hand an experiment's jobs to Snakemake (local executor, or SLURM / any executor plugin) and resume.

The run folder holds ``plan.json`` (what the Snakefile reads), ``jobs/<hash>.json`` (one spec per
job), ``work/<hash>/`` (finished jobs), ``logs/`` and readable links (``models/child-sst2``,
``merges/gradient_matching``, ``report``) to finished jobs' folders. Snakemake's own output goes to
``logs/snakemake.log``; the terminal gets one progress display (:mod:`gradmatch.pipeline.progress`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from gradmatch.config.experiment import load_experiment
from gradmatch.errors import UserError
from gradmatch.pipeline import jobserver, preflight
from gradmatch.fsutil import write_text
from gradmatch.config.experiment import NAME_MAX
from gradmatch.pipeline.graph import ALIAS_SUBDIR, Job, build_jobs, check_job_names, job_spec, plan_dict, toposort

SNAKEFILE = Path(__file__).with_name("Snakefile.smk")
#: Lines of a failed job's log shown on the terminal.
LOG_TAIL_LINES = 20
#: Where a run's Snakemake output goes (each real run replaces it; .snakemake/log/ keeps Snakemake's own per run).
SNAKEMAKE_LOG = Path("logs") / "snakemake.log"
#: What a run shows while it works: ``progress`` (one display: a bar on a terminal, else a line per finished job),
#: ``log`` (Snakemake's own output, as it comes: -v) or ``quiet`` (nothing until the end: -q).
OUTPUTS = ("progress", "log", "quiet")
#: Seconds Snakemake gets to stop its jobs after Ctrl-C (it receives the same SIGINT) before it is killed.
INTERRUPT_GRACE = 5.0


@dataclass
class SlurmOptions:
    """How jobs are submitted with ``--executor slurm`` (see docs/pipeline.md)."""

    partition: str | None = None   # default: the cluster's default partition
    account: str | None = None     # default: none (--slurm-no-account)
    status_command: str = "squeue"  # sacct needs an accounting database; squeue always answers
    init_seconds: int = 1           # first status check after this many seconds
    extra: list[str] = field(default_factory=list)


@dataclass
class RunResult:
    """What a run did: its folder, the jobs, which were already done, which failed."""

    workdir: Path
    jobs: list[Job]
    already_done: list[Job]
    failed: list[Job]
    returncode: int

    @property
    def report_dir(self) -> Path:
        return self.workdir / "report"


def job_done(job: Job, workdir: Path) -> bool:
    return (job.folder(workdir) / "job.json").is_file()


@contextlib.contextmanager
def _run_lock(workdir: Path):
    """Only one gradmatch run per folder; the lock dies with the process (a killed run frees it)."""
    lock_path = workdir / ".gradmatch-run.lock"
    fh = open(lock_path, "w")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        raise UserError(f"another gradmatch run is using {workdir} (lock {lock_path})") from None
    try:
        yield
    finally:
        fcntl.flock(fh, fcntl.LOCK_UN)
        fh.close()


def write_plan(jobs: list[Job], workdir: Path) -> Path:
    """Write every job's spec and the plan the Snakefile reads; returns the plan's path."""
    (workdir / "jobs").mkdir(parents=True, exist_ok=True)
    for job in jobs:
        spec_path = workdir / "jobs" / f"{job.hash}.json"
        text = json.dumps(job_spec(job, workdir), indent=2) + "\n"
        if not spec_path.exists() or spec_path.read_text() != text:
            write_text(spec_path, text)
    return write_text(workdir / "plan.json", json.dumps(plan_dict(jobs, workdir, sys.executable), indent=2) + "\n")


def snakemake_command(plan_path: Path, workdir: Path, *, cores: int | None, executor: str, dry_run: bool,
                      jobs_limit: int | None, slurm: SlurmOptions | None, extra_args: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(SNAKEFILE), "--directory", str(workdir),
           "--config", f"plan={plan_path}", "--ignore-incomplete", "--keep-going", "--rerun-triggers", "input",
           # its output goes to logs/snakemake.log, read by the progress display: it names each job as it starts
           "--nocolor", "--quiet", "host", "reason"]
    if dry_run:
        cmd += ["--dry-run"]
    if executor == "local":
        cmd += ["--cores", str(cores or os.cpu_count() or 1)]
    else:
        cmd += ["--executor", executor, "--jobs", str(jobs_limit or 8), "--latency-wait", "30"]
        if cores:
            cmd += ["--local-cores", str(cores)]
    if executor == "slurm":
        slurm = slurm or SlurmOptions()
        cmd += ["--slurm-status-command", slurm.status_command,
                "--slurm-init-seconds-before-status-checks", str(slurm.init_seconds)]
        defaults = []
        if slurm.partition:
            defaults.append(f"slurm_partition={slurm.partition}")
        if slurm.account:
            defaults.append(f"slurm_account={slurm.account}")
        else:
            cmd += ["--slurm-no-account"]
        if defaults:
            cmd += ["--default-resources", *defaults]
        cmd += list(slurm.extra)
    return cmd + list(extra_args)


def _unlock_snakemake(workdir: Path, plan_path: Path) -> None:
    """A killed Snakemake leaves its lock behind; we hold our own lock, so no other run uses it."""
    locks = workdir / ".snakemake" / "locks"
    if locks.is_dir() and any(locks.iterdir()):
        subprocess.run([sys.executable, "-m", "snakemake", "--snakefile", str(SNAKEFILE), "--directory",
                        str(workdir), "--config", f"plan={plan_path}", "--unlock", "--quiet", "all"],
                       check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _remove_stale_temporaries(workdir: Path) -> None:
    """Half-written job folders of a killed local run (we hold the run lock: nothing writes them now)."""
    from gradmatch.fsutil import _OLD_PREFIX, _TMP_PREFIX

    work = workdir / "work"
    if work.is_dir():
        for path in work.iterdir():
            if path.name.startswith((_TMP_PREFIX, _OLD_PREFIX)):
                shutil.rmtree(path, ignore_errors=True)


def refresh_links(jobs: list[Job], workdir: Path) -> None:
    """Readable names for finished jobs: ``models/parent → ../work/<hash>/model`` and so on."""
    from gradmatch.pipeline.jobs import link_alias

    for job in jobs:
        if job_done(job, workdir):
            link_alias(workdir, job.name, job.folder(workdir) / ALIAS_SUBDIR[job.kind])


def _tail(path: Path, n: int = LOG_TAIL_LINES) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join("    " + line for line in lines[-n:])


def describe_jobs(jobs: list[Job], workdir: Path) -> str:
    """One line per job: status, kind, readable name, hash folder."""
    lines = []
    for job in jobs:
        state = "done " if job_done(job, workdir) else "to do"
        lines.append(f"  [{state}] {job.kind:<8} {job.name:<34} work/{job.hash}")
    return "\n".join(lines)


def check_workdir(workdir: Path) -> None:
    """A run folder whose path the file system cannot hold is refused before anything is written (a dry run would
    not notice: it plans in a scratch folder)."""
    long = next((part for part in workdir.parts if len(part.encode()) > NAME_MAX), None)
    if long is not None:
        raise UserError(f"run folder {str(workdir)[:60]}…: the name {long[:20]}… has {len(long.encode())} bytes, and "
                        f"file systems take at most {NAME_MAX} per name")
    if workdir.exists() and not workdir.is_dir():
        raise UserError(f"run folder {workdir} exists and is not a folder")


def run_jobs(jobs: list[Job], workdir: str | os.PathLike, *, cores: int | None = None, executor: str = "local",
             dry_run: bool = False, jobs_limit: int | None = None, slurm: SlurmOptions | None = None,
             extra_args: list[str] | None = None, echo=print, job_server: bool | None = None,
             output: str = "progress") -> RunResult:
    """Run (or with ``dry_run`` list) ``jobs`` in ``workdir`` with Snakemake; finished jobs are skipped.

    Every data set and model the jobs still to run read is checked first, and so are the jobs' names (one Snakemake
    rule and one folder each, file names the file system takes), before anything is written; a dry run of a run
    folder that does not exist yet leaves none behind (Snakemake plans in a scratch folder). ``output`` says what
    the run shows while it works (:data:`OUTPUTS`); Snakemake's own output is kept in ``workdir/logs/snakemake.log``.

    With the local executor, jobs start from a warm job server (:mod:`gradmatch.pipeline.jobserver`)
    unless ``job_server=False`` or ``GRADMATCH_JOB_SERVER=off``.
    """
    if job_server is None:
        job_server = os.environ.get(jobserver.ENV, "").lower() not in ("off", "0", "no")
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {', '.join(OUTPUTS)}, not {output!r}")
    workdir = Path(workdir).resolve()
    jobs = toposort(jobs)
    check_workdir(workdir)
    check_job_names(jobs)
    # every data set and model the jobs to run read, before anything is written
    notes = preflight.check_inputs(jobs, lambda job: job_done(job, workdir))
    run = dict(cores=cores, executor=executor, dry_run=dry_run, jobs_limit=jobs_limit, slurm=slurm,
               extra_args=extra_args, job_server=job_server, notes=notes, output=output)
    if dry_run and not workdir.exists():  # a new run's dry run leaves no run folder: Snakemake plans in a scratch one
        with tempfile.TemporaryDirectory(prefix="gradmatch-dry-run-") as scratch:
            scratch = Path(scratch).resolve()
            result = _run_in(jobs, scratch, echo=lambda text: echo(text.replace(str(scratch), str(workdir))), **run)
        return RunResult(workdir, result.jobs, result.already_done, result.failed, result.returncode)
    return _run_in(jobs, workdir, echo=echo, **run)


def _run_in(jobs: list[Job], workdir: Path, *, cores: int | None, executor: str, dry_run: bool,
            jobs_limit: int | None, slurm: SlurmOptions | None, extra_args: list[str] | None, echo,
            job_server: bool, notes: list[str], output: str) -> RunResult:
    """:func:`run_jobs` in ``workdir`` (made if missing) once the inputs are checked (``notes``: their remarks)."""
    workdir.mkdir(parents=True, exist_ok=True)
    with _run_lock(workdir):
        plan_path = write_plan(jobs, workdir)
        done = [j for j in jobs if job_done(j, workdir)]
        finished = set(done)
        echo(f"{len(jobs)} jobs in {workdir} ({len(done)} already done, {len(jobs) - len(done)} to run)"
             + (":" if dry_run else ""))
        if dry_run:
            echo(describe_jobs(jobs, workdir))
            echo("checked: every local data set and model the jobs to run read" + "".join(f"\nnote: {n}" for n in notes))
            echo("jobs to run:\n" + preflight.estimate(jobs, finished.__contains__))
        cmd = snakemake_command(plan_path, workdir, cores=cores, executor=executor, dry_run=dry_run,
                                jobs_limit=jobs_limit, slurm=slurm, extra_args=list(extra_args or []))
        if not dry_run:
            _unlock_snakemake(workdir, plan_path)
            if executor == "local":
                _remove_stale_temporaries(workdir)
        # Jobs run side by side on shared cores: OpenMP threads that spin while waiting slow torch 15-45x there.
        env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ, "PYTHONUNBUFFERED": "1"}
        started = time.time()
        warm = executor == "local" and not dry_run and job_server and sum(not job_done(j, workdir) for j in jobs) > 1
        with (jobserver.running(env) if warm else contextlib.nullcontext()):
            if dry_run:
                # A dry run shows gradmatch's table; Snakemake's own (printed twice, counting its target rule as a
                # job) only when it finds a problem in the job graph.
                proc = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True)
                if proc.returncode:
                    echo((proc.stdout or "") + (proc.stderr or ""))
                returncode = proc.returncode
            else:
                to_run = [j for j in jobs if j not in finished]
                returncode = _follow(cmd, env, workdir, to_run, output)
        if not dry_run:
            refresh_links(jobs, workdir)
        failed = [j for j in jobs if not job_done(j, workdir) and _log_of(j, workdir).exists()
                  and _log_of(j, workdir).stat().st_mtime >= started - 1]
        if returncode != 0 or failed:
            for job in failed:
                echo(f"\njob {job.name} ({job.kind}) failed; log: {_log_of(job, workdir)}\n{_tail(_log_of(job, workdir))}")
            if not failed:
                log = workdir / SNAKEMAKE_LOG
                echo(f"\nSnakemake failed (exit {returncode}); its log: {log}\n{_tail(log)}" if log.is_file()
                     else f"\nSnakemake failed (exit {returncode}); see {workdir / '.snakemake' / 'log'}")
        return RunResult(workdir, jobs, done, failed, returncode or (1 if failed else 0))


def _follow(cmd: list[str], env: dict[str, str], workdir: Path, to_run: list[Job], output: str) -> int:
    """Run Snakemake with its output into ``workdir/logs/snakemake.log`` (and, with ``output="log"``, onto stderr as
    it comes), showing the progress of ``to_run`` meanwhile; returns its exit status."""
    from gradmatch.pipeline.progress import RunProgress

    log_path = workdir / SNAKEMAKE_LOG
    log_path.parent.mkdir(parents=True, exist_ok=True)
    progress = RunProgress(to_run, lambda job: _log_of(job, workdir)) if output == "progress" else None
    lines: queue.Queue[str | None] = queue.Queue()
    with open(log_path, "w", encoding="utf-8", buffering=1) as log:
        proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, errors="replace", bufsize=1)

        def read() -> None:
            for line in proc.stdout:
                lines.put(line)
            lines.put(None)

        threading.Thread(target=read, daemon=True).start()
        try:
            while True:
                try:
                    line = lines.get(timeout=1.0)
                except queue.Empty:  # a long job: only the clock moves
                    if progress is not None:
                        progress.tick()
                    continue
                if line is None:
                    break
                log.write(line)
                if output == "log":
                    sys.stderr.write(line)
                    sys.stderr.flush()
                elif progress is not None:
                    progress.feed(line)
            return proc.wait()
        except KeyboardInterrupt:  # Snakemake got the same SIGINT: it stops its jobs, then it is made to stop
            try:
                proc.wait(timeout=INTERRUPT_GRACE)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            raise
        finally:
            if progress is not None:
                progress.close()


def _log_of(job: Job, workdir: Path) -> Path:
    return workdir / "logs" / f"{job.rule}.{job.hash}.log"


def default_workdir(experiment) -> Path:
    return Path("runs") / experiment.name


def run_experiment(experiment, *, workdir: str | os.PathLike | None = None, data_dir: str | os.PathLike | None = None,
                   **kwargs) -> RunResult:
    """Build the jobs of an experiment (file, dict or ExperimentConfig) and run them (see :func:`run_jobs`)."""
    exp = load_experiment(experiment)
    data_dir = data_dir or os.environ.get("GRADMATCH_DATA_DIR") or None
    if data_dir is not None and not Path(data_dir).is_dir():
        raise UserError(f"data root {data_dir} is not a folder")
    workdir = Path(workdir) if workdir else default_workdir(exp)
    jobs = build_jobs(exp, data_dir=data_dir)
    result = run_jobs(jobs, workdir, **kwargs)
    if not kwargs.get("dry_run"):
        write_text(result.workdir / "experiment.json", json.dumps(exp.model_dump(mode="json"), indent=2) + "\n")
    return result


def check_executor(executor: str) -> None:
    """Fail early with one line when the executor plugin is not installed."""
    if executor == "local":
        return
    import importlib.util

    module = f"snakemake_executor_plugin_{executor.replace('-', '_')}"
    if importlib.util.find_spec(module) is None:
        raise UserError(f"unknown executor {executor!r}: install snakemake-executor-plugin-{executor}")
    if executor == "slurm" and shutil.which("sbatch") is None:
        raise UserError("--executor slurm needs SLURM's sbatch on PATH (no SLURM client found)")
