"""The pipeline on a real SLURM cluster through snakemake-executor-plugin-slurm (CI starts one: .ci/slurm-up.sh).

Skipped where no SLURM answers; with GRADMATCH_REQUIRE_SLURM=1 (set by .ci/run) it fails instead.
"""

from __future__ import annotations

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
