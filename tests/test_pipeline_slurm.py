"""The pipeline on a real SLURM cluster through snakemake-executor-plugin-slurm (CI starts one: .ci/slurm-up.sh).

Skipped where no SLURM answers; with GRADMATCH_REQUIRE_SLURM=1 (set by .ci/run) it fails instead.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline_helpers import report_rows, tiny, write_experiment

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def _slurm_problem() -> str | None:
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return "SLURM is not installed here (`sinfo`/`sbatch` not found); CI starts one with .ci/slurm-up.sh"
    try:
        states = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "`sinfo` did not answer in 20 s"
    if states.returncode != 0:
        return f"`sinfo` failed: {states.stderr.strip()[:200]}"
    if not {"idle", "mix", "alloc"} & set(states.stdout.split()):
        return f"no SLURM node is up (sinfo states: {states.stdout.split()})"
    return None


@pytest.fixture(scope="module")
def slurm():
    problem = _slurm_problem()
    if problem:
        if os.environ.get("GRADMATCH_REQUIRE_SLURM") == "1":
            pytest.fail(f"GRADMATCH_REQUIRE_SLURM=1 but {problem}")
        pytest.skip(problem)


def test_tiny_experiment_runs_on_slurm(slurm, tmp_path):
    one_child = tiny(children=tiny()["children"][:1], merges=[{"method": "gradient_matching", "alphas": [1.0]}],
                     multitask=False, resources={"default": {"threads": 1, "mem_mb": 1000, "runtime": 15},
                                                 "train": {"runtime": 20}})
    exp = write_experiment(tmp_path / "slurm.yaml", one_child)
    workdir = tmp_path / "run"
    cmd = [sys.executable, "-m", "gradmatch", "run", str(exp), "--workdir", str(workdir), "--executor", "slurm",
           "--jobs", "4", "--snakemake-args", "--seconds-between-status-checks 2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    shown = proc.stdout + proc.stderr
    assert proc.returncode == 0, shown[-4000:]
    assert shown.count("] done ") == 12, shown[-4000:]  # one plain line per finished job (stderr is not a terminal)
    # every job went through sbatch, with the resources the experiment asked for (Snakemake's own log, kept in the run)
    out = (workdir / "logs" / "snakemake.log").read_text()
    assert out.count("has been submitted with SLURM jobid") == 12, out[-4000:]
    # the sbatch request of the parent's training job, as the controller recorded it
    jobid = re.search(r"SLURM jobid (\d+) \(log: [^)]*rule_models_parent", out)
    assert jobid, out[-4000:]
    record = subprocess.run(["scontrol", "show", "job", jobid.group(1)], capture_output=True, text=True).stdout
    if record:  # the controller forgets finished jobs after MinJobAge (300 s by default)
        assert "TimeLimit=00:20:00" in record and "mem=1000M" in record and "NumCPUs=1" in record, record
    rows = report_rows(workdir)
    assert [r["label"] for r in rows] == ["parent", "child-rot90", "gradient_matching α=1"]
    assert all(set(r["values"]) == {"original", "rot90"} for r in rows)
    assert (workdir / "report" / "alpha_average.png").is_file()
    assert Path(workdir / "models" / "parent" / "config.json").is_file()


# --------------------------------------------------------------------------- Fisher jobs of several processes


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> dict:
    """A tiny Llama, nine reviews, and their Fisher from one process without torchrun (the reference)."""
    from conftest import make_tiny_lm, write_jsonl
    from test_pipeline_fisher_processes import TEXTS

    root = tmp_path_factory.mktemp("slurm-fisher")
    world = {"root": root, "lm": make_tiny_lm(root / "llama", family="llama", tie=True),
             "data": write_jsonl(root / "reviews.jsonl", [{"text": t, "label": i % 2} for i, t in enumerate(TEXTS)])}
    one = subprocess.run([sys.executable, "-m", "gradmatch", "fisher", "--model", str(world["lm"]), "--data",
                          str(world["data"]), "--split", "train", "--batch-size", "3", "--max-length", "32",
                          "--out", str(root / "one"), "--quiet"], capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    world["one"] = root / "one"
    return world


def _sbatch_record(jobid: str) -> str:
    """The controller's record of a job (empty once it has forgotten it: MinJobAge, 300 s by default)."""
    return subprocess.run(["scontrol", "show", "job", jobid], capture_output=True, text=True).stdout


def test_the_documented_multinode_script_runs_on_one_node(slurm, tiny_llama, tmp_path):
    """examples/fisher-multinode.sbatch, as docs/fisher.md shows it, submitted for one node without GPUs and 2
    processes: one task of 2 CPUs whose torchrun meets itself at the c10d rendezvous and writes the one-process
    Fisher. (Two nodes need a cluster of two: docs/fisher.md says what was run by hand.)"""
    from test_pipeline_fisher_processes import _hessian, _worst_relative

    root = Path(__file__).resolve().parents[1]
    script = root / "examples" / "fisher-multinode.sbatch"
    doc = (root / "docs" / "fisher.md").read_text()
    section = doc[doc.index("## Multi-node: SLURM and torchrun"):]
    shown = section[section.index("```bash\n") + len("```bash\n"):section.index("```\n", section.index("```bash\n") + 8)]
    assert shown == script.read_text()  # the docs show the script that runs here
    out = tmp_path / "fisher"
    env = dict(os.environ, GPUS_PER_NODE="2", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")  # torchrun on PATH
    proc = subprocess.run(["sbatch", "--parsable", "--wait", "--nodes", "1", "--gpus-per-node", "0", "--cpus-per-task",
                           "2", "--mem", "3000", "--time", "10", "--output", str(tmp_path / "slurm-%j.log"),
                           str(script), str(tiny_llama["lm"]), str(tiny_llama["data"]), "train", str(out),
                           "--batch-size", "3", "--max-length", "32"], capture_output=True, text=True, env=env,
                          timeout=900)
    logs = "".join(p.read_text() for p in tmp_path.glob("slurm-*.log"))
    assert proc.returncode == 0, proc.stdout + proc.stderr + logs[-4000:]
    record = _sbatch_record(proc.stdout.strip().split(";")[0])
    if record:
        assert "NumNodes=1 " in record and "NumTasks=1 " in record and "CPUs/Task=2 " in record, record
    assert _worst_relative(_hessian(tiny_llama["one"]), _hessian(out)) <= 1e-5
    written = json.loads((out / "hessian" / "fisher.json").read_text())
    assert (written["num_processes"], written["sharded"]) == (2, True)


def test_a_fisher_job_of_two_sharded_processes_on_slurm(slurm, tiny_llama, tmp_path):
    """The pipeline's Fisher job with resources.fisher processes 2 and shard, submitted by the executor plugin: one
    task of threads × processes CPUs, torchrun inside it, the one-process Fisher."""
    from test_pipeline_fisher_processes import (
        _by_name,
        _hessian,
        _lm_experiment,
        _worst_relative,
    )

    from gradmatch.pipeline.runner import run_jobs

    job = _by_name(_lm_experiment(tiny_llama, {"fisher": {"processes": 2, "shard": True}}))["fisher/parent"]
    workdir = tmp_path / "run"
    result = run_jobs([job], workdir, executor="slurm", jobs_limit=4, output="quiet", echo=lambda *_: None,
                      extra_args=["--seconds-between-status-checks", "2"])
    log = (workdir / "logs" / "snakemake.log").read_text()
    assert result.returncode == 0, log[-4000:]
    assert log.count("has been submitted with SLURM jobid") == 3, log[-4000:]  # prepare, pretrained, fisher
    jobid = re.search(r"SLURM jobid (\d+) \(log: [^)]*rule_fisher_parent", log)
    assert jobid, log[-4000:]
    record = _sbatch_record(jobid.group(1))
    if record:
        assert "NumTasks=1 " in record and "CPUs/Task=2 " in record and "mem=1500M" in record, record
    fisher = workdir / "fisher" / "parent"
    assert _worst_relative(_hessian(tiny_llama["one"]), _hessian(fisher)) <= 1e-5
    written = json.loads((fisher / "hessian" / "fisher.json").read_text())
    assert (written["num_processes"], written["sharded"]) == (2, True)
    job_log = next((workdir / "logs").glob("fisher_parent.*.log")).read_text()
    assert "--nproc_per_node 2 -m gradmatch fisher" in job_log and " --shard" in job_log
