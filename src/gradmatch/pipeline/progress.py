"""What `gradmatch run` shows while Snakemake works: one progress display (jobs done of the jobs to run, what is
running, elapsed and an estimate; each failure with its log), read from Snakemake's own log, which goes to the run
folder (``logs/snakemake.log``) instead of the terminal.

On a terminal the display is one tqdm bar; elsewhere (CI, SLURM, nohup, a pipe) it is one plain line per finished job.
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from tqdm import tqdm

from gradmatch.pipeline.graph import Job

#: Snakemake 9's lines (its log's format; the version is pinned in pyproject.toml) for a job that starts or is
#: submitted, finishes, and fails. Rule names are the jobs' (graph.check_job_names keeps them unique).
STARTED = re.compile(r"^(?:local)?rule (\w+):\s*$")
FINISHED = re.compile(r"^Finished jobid: \d+ \(Rule: (\w+)\)")
FAILED = re.compile(r"^Error in rule (\w+):")
#: How many running jobs the bar names (the rest are counted).
SHOWN_RUNNING = 2


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 \
        else f"{seconds // 60}:{seconds % 60:02d}"


class RunProgress:
    """Follow Snakemake's log lines (:meth:`feed`) for ``jobs`` (the jobs to run) and show where the run is.

    ``log_of`` gives a job's log file (named in each failure's line). ``interactive`` (default: whether ``stream``
    is a terminal) draws a bar that :meth:`tick` keeps current; otherwise one line per finished job is written.
    """

    def __init__(self, jobs: list[Job], log_of: Callable[[Job], Path], *, stream: TextIO | None = None,
                 interactive: bool | None = None):
        self.stream = stream if stream is not None else sys.stderr
        self.by_rule = {job.rule: job for job in jobs}
        self.log_of = log_of
        self.total = len(jobs)
        self.running: dict[str, float] = {}  # rule → when it started
        self.finished: list[Job] = []
        self.failed: list[Job] = []
        self.started = time.time()
        if interactive is None:
            interactive = bool(getattr(self.stream, "isatty", lambda: False)())
        self.bar = None
        if interactive and self.total:
            try:  # a terminal that reports no size (a bare pseudo-terminal) gets 80 columns, not an empty bar
                sized = os.get_terminal_size(self.stream.fileno()).columns > 0
            except (AttributeError, OSError, ValueError):
                sized = False
            self.bar = tqdm(total=self.total, unit="job", file=self.stream, dynamic_ncols=sized,
                            ncols=None if sized else 80, nrows=None if sized else 24, smoothing=0,
                            mininterval=0.5, leave=True, desc="jobs",
                            bar_format="{desc} {n_fmt}/{total_fmt} |{bar:24}| {elapsed} elapsed, ~{remaining} left"
                                       "{postfix}")

    # ------------------------------------------------------------------ events

    def feed(self, line: str) -> None:
        """One line of Snakemake's output."""
        line = line.rstrip("\r\n")
        for pattern, event in ((STARTED, self._start), (FINISHED, self._finish), (FAILED, self._fail)):
            match = pattern.match(line)
            if match and match.group(1) in self.by_rule:
                event(self.by_rule[match.group(1)])
                return

    def _start(self, job: Job) -> None:
        self.running.setdefault(job.rule, time.time())
        self.tick()

    def _finish(self, job: Job) -> None:
        began = self.running.pop(job.rule, None)
        self.finished.append(job)
        took = f" in {_clock(time.time() - began)}" if began is not None else ""
        if self.bar is not None:
            self.bar.update(1)
            self.tick()
        else:
            self._line(f"done {job.kind} {job.name}{took}")

    def _fail(self, job: Job) -> None:
        self.running.pop(job.rule, None)
        self.failed.append(job)
        message = f"failed: {job.kind} {job.name}; log: {self.log_of(job)}"
        if self.bar is not None:
            self.bar.write(message, file=self.stream)
            self.tick()
        else:
            self._line(message)

    def _line(self, text: str) -> None:
        count = len(self.finished) + len(self.failed)
        self.stream.write(f"[{count}/{self.total} {_clock(time.time() - self.started)}] {text}\n")
        self.stream.flush()

    # ------------------------------------------------------------------ display

    def status(self, *, running: bool = True) -> str:
        """What follows the bar: failures so far, and the jobs running (the first few by name)."""
        parts = [f"{len(self.failed)} failed"] if self.failed else []
        names = [self.by_rule[rule].name for rule in self.running] if running else []
        if names:
            more = f" +{len(names) - SHOWN_RUNNING}" if len(names) > SHOWN_RUNNING else ""
            parts.append("running " + ", ".join(names[:SHOWN_RUNNING]) + more)
        return "; ".join(parts)

    def tick(self) -> None:
        """Bring the bar up to date (elapsed time moves on between Snakemake's lines)."""
        if self.bar is not None:
            self.bar.set_postfix_str(self.status(), refresh=False)
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(self.status(running=False), refresh=False)
            self.bar.close()
            self.bar = None
