"""What a run shows while it works: one progress display (a bar on a terminal, one plain line per finished job
elsewhere), Snakemake's own output kept in the run folder's logs/snakemake.log and shown with -v."""

from __future__ import annotations

import fcntl
import io
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from gradmatch.cli import main
from gradmatch.pipeline.graph import build_jobs
from gradmatch.pipeline.progress import RunProgress
from gradmatch.pipeline.runner import SNAKEMAKE_LOG
from pipeline_helpers import tiny, write_experiment

#: Eleven jobs of a few seconds each: one child, one merge, no multitask model.
MICRO = tiny(name="micro", multitask=False, merges=[{"method": "task_arithmetic", "alphas": [1.0]}],
             parent={"name": "original", "dataset": "digits-original", "train_split": "train[:64]",
                     "test_split": "test[:32]"},
             children=[{"name": "rot90", "dataset": "digits-rot90", "train_split": "train[:64]",
                        "test_split": "test[:32]"}],
             training={"per_device_train_batch_size": 32, "num_train_epochs": 1, "logging_strategy": "no"})
#: What Snakemake prints that the terminal should not see without -v.
SNAKEMAKE_CHATTER = ("Finished jobid", "localrule", "Job stats", "Building DAG", "steps (")


def _snakemake_lines(job, jobid: int = 1) -> tuple[str, str]:
    """A job's start and finish as Snakemake 9 prints them (see the end-to-end tests for the real thing)."""
    return f"localrule {job.rule}:\n", f"Finished jobid: {jobid} (Rule: {job.rule})\n"


def test_plain_lines_one_per_finished_job_when_not_a_terminal():
    jobs = build_jobs(tiny())
    out = io.StringIO()
    progress = RunProgress(jobs, lambda job: Path("RUN/logs") / f"{job.rule}.{job.hash}.log", stream=out)
    assert progress.bar is None  # a StringIO is not a terminal
    for job in jobs[:2]:
        start, finish = _snakemake_lines(job)
        progress.feed(start)
        progress.feed("    output: work/x/job.json\n")  # the rule's details: ignored
        progress.feed(finish)
    progress.feed(f"rule {jobs[2].rule}:\n")  # a cluster executor's submission
    progress.feed(f"Error in rule {jobs[2].rule}:\n")
    progress.feed("Finished jobid: 0 (Rule: all)\n")  # Snakemake's target rule is no job of ours
    progress.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 3, lines
    assert re.fullmatch(rf"\[1/{len(jobs)} 0:0\d\] done prepare data/original-test in 0:0\d", lines[0]), lines[0]
    assert lines[1].startswith(f"[2/{len(jobs)} ") and lines[1].endswith(f"done prepare {jobs[1].name} in 0:00")
    assert lines[2].endswith(f"failed: prepare {jobs[2].name}; log: RUN/logs/{jobs[2].rule}.{jobs[2].hash}.log")


def test_a_bar_on_a_terminal_names_what_runs_and_each_failure():
    jobs = build_jobs(tiny())
    out = io.StringIO()
    progress = RunProgress(jobs, lambda job: f"LOG-{job.hash}", stream=out, interactive=True)
    started = [_snakemake_lines(job, i) for i, job in enumerate(jobs[:3])]
    for start, _ in started:
        progress.feed(start)
    assert progress.status() == f"running {jobs[0].name}, {jobs[1].name} +1"
    progress.feed(started[0][1])
    progress.feed(f"Error in rule {jobs[1].rule}:\n")
    assert progress.status() == f"1 failed; running {jobs[2].name}"
    progress.close()
    text = out.getvalue()
    assert f"jobs 1/{len(jobs)} |" in text and "elapsed" in text and "left" in text
    assert f"failed: prepare {jobs[1].name}; log: LOG-{jobs[1].hash}\n" in text
    last = text.rstrip("\n").split("\r")[-1].rstrip()  # the bar's last state stays on the screen, without what ran
    assert last.startswith(f"jobs 1/{len(jobs)} |") and last.endswith("left, 1 failed"), last


# --------------------------------------------------------------------------- end to end


def _in_a_terminal(argv: list[str], cwd: Path) -> tuple[int, str]:
    """Run ``argv`` with stdout and stderr on a pseudo-terminal of 100×30 (as a user's terminal); its output."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    env.pop("TQDM_DISABLE", None)
    proc = subprocess.Popen(argv, stdin=follower, stdout=follower, stderr=follower, cwd=cwd, env=env)
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 65536)
        except OSError:  # the other end closed
            break
        if not data:
            break
        chunks.append(data)
    os.close(leader)
    return proc.wait(timeout=60), b"".join(chunks).decode(errors="replace").replace("\r\n", "\n")


@pytest.mark.slow
def test_demo_shows_a_progress_bar_not_snakemakes_log(tmp_path):
    """`gradmatch demo` (here on a tiny experiment: the same code path) prints at most 30 lines before its table
    under a pseudo-terminal; Snakemake's log is in the run folder; a rerun with -v shows Snakemake's own output."""
    workdir = tmp_path / "run"
    code = ("import sys\nfrom gradmatch import console\nfrom gradmatch.demo import run_demo\n"
            "from test_pipeline_progress import MICRO\n"
            "with console.configured(console.NORMAL):\n"
            f"    sys.exit(run_demo({str(workdir)!r}, experiment=MICRO, cores=2))\n")
    started = time.time()
    rc, out = _in_a_terminal([sys.executable, "-c", code], tmp_path)
    assert rc == 0, out[-3000:]
    print(f"micro demo: {time.time() - started:.0f} s")
    before_table = out[:out.index("| model |")]
    assert before_table.count("\n") <= 30, before_table
    assert "jobs 11/11 |" in before_table and "running " in before_table, before_table
    assert not [c for c in SNAKEMAKE_CHATTER if c in out], out
    log = (workdir / SNAKEMAKE_LOG).read_text()
    assert "Finished jobid" in log and "Rule: merges_task_arithmetic" in log and "localrule report:" in log

    exp = write_experiment(tmp_path / "micro.yaml", MICRO)
    again = [sys.executable, "-m", "gradmatch", "run", str(exp), "--workdir", str(workdir)]
    quiet = subprocess.run(again, capture_output=True, text=True, cwd=tmp_path)
    assert quiet.returncode == 0 and "(11 already done, 0 to run)" in quiet.stdout, quiet.stderr
    assert not [c for c in ("Building DAG", "Nothing to be done") if c in quiet.stdout + quiet.stderr]
    verbose = subprocess.run(again + ["-v"], capture_output=True, text=True, cwd=tmp_path)
    assert verbose.returncode == 0 and "Building DAG of jobs" in verbose.stderr, verbose.stderr
    assert "Building DAG of jobs" in (workdir / SNAKEMAKE_LOG).read_text()


@pytest.mark.slow
def test_without_a_terminal_each_finished_job_is_one_line_and_a_failure_names_its_log(tmp_path):
    """As under CI, SLURM or nohup: stderr a file. A parent whose weights are corrupt fails its training job."""
    from transformers import ViTConfig

    broken = tmp_path / "broken-vit"
    ViTConfig(image_size=8, patch_size=2, num_channels=1, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
              intermediate_size=32, num_labels=10, architectures=["ViTForImageClassification"]).save_pretrained(broken)
    (broken / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    exp = write_experiment(tmp_path / "bad.yaml", {**MICRO, "model": str(broken), "merges": []})
    workdir = tmp_path / "run"
    with open(tmp_path / "stderr.txt", "w") as err:
        proc = subprocess.run([sys.executable, "-m", "gradmatch", "run", str(exp), "--workdir", str(workdir),
                               "--cores", "2"], stdout=subprocess.PIPE, stderr=err, text=True, cwd=tmp_path)
    assert proc.returncode == 1
    lines = (tmp_path / "stderr.txt").read_text().splitlines()
    done = [line for line in lines if re.match(r"\[\d+/\d+ \d+:\d\d\] done prepare data/", line)]
    assert len(done) == 4, lines  # the four data slices; everything else waits on the parent
    log = next(workdir.glob("logs/models_parent.train-*.log"))
    assert any(line.endswith(f"failed: train models/parent; log: {log}") for line in lines), lines
    assert not [c for c in SNAKEMAKE_CHATTER if c in "\n".join(lines)], lines
    assert f"job models/parent (train) failed; log: {log}" in proc.stdout  # and the log's last lines after the run
