"""Crash safety: SIGKILL at seeded random moments of `gradmatch merge` (20 trials) and of `gradmatch run` on a
tiny experiment (5 trials). After every kill the destination holds nothing or the complete result (the old one,
when replacing), and a rerun gives output byte-identical to an uninterrupted run's."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from gradmatch.cli import main

from pipeline_helpers import finished_jobs, tiny, write_experiment
from test_merge import _write_model
from test_security import _env

#: The number of kill trials (the counts in docs/reliability.md).
MERGE_TRIALS = 20
RUN_TRIALS = 5


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _family(root: Path, T: int = 3, n: int = 24) -> dict:
    """A parent, T children and Hessians with n tensors of 128×64 (enough work for the kills to land mid-write)."""
    g = torch.Generator().manual_seed(7)
    config = {"model_type": "toy", "architectures": ["ToyForSequenceClassification"]}
    names = [f"layer{i}.weight" for i in range(n)]
    parent = {k: torch.randn(128, 64, generator=g) for k in names}
    fam = {"parent": _write_model(root / "parent", parent, config, 1000), "children": [], "hessians": []}
    fam["parent_hessian"] = _write_model(root / "h-parent", {k: torch.rand(128, 64, generator=g) for k in names}, config)
    for t in range(T):
        child = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in parent.items()}
        fam["children"].append(_write_model(root / f"child{t}", child, config, 100 * (t + 1), extra=False))
        fam["hessians"].append(_write_model(root / f"h{t}", {k: torch.rand(128, 64, generator=g) for k in names},
                                            config, extra=False))
    return fam


def _config(fam, method="gradient_matching") -> dict:
    config = {"method": method, "base": str(fam["parent"]),
              "models": [{"model": str(c), "weight": 0.8} for c in fam["children"]]}
    if method == "gradient_matching":
        config["base_hessian"] = str(fam["parent_hessian"])
        for entry, h in zip(config["models"], fam["hessians"]):
            entry["hessian"] = str(h)
        config["parameters"] = {"delta_0": 1e-8}
    return config


def _wait_for(predicate, proc, timeout: float) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.005)
    return False


@pytest.mark.slow
def test_sigkill_at_random_moments_of_merge(tmp_path):
    fam = _family(tmp_path / "fam")
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(yaml.safe_dump(_config(fam)))
    flags = ["--quiet", "--block-rows", "4", "--max-shard-size", "100KB"]
    # the uninterrupted result, and an older different result that --overwrite trials must keep or replace whole
    assert main(["merge", str(cfg), str(tmp_path / "reference"), *flags]) == 0
    reference = folder_bytes(tmp_path / "reference")
    assert len([n for n in reference if n.endswith(".safetensors")]) > 5  # several shards: kills land between them
    old_cfg = tmp_path / "old.yaml"
    old_cfg.write_text(yaml.safe_dump(_config(fam, "task_arithmetic")))
    assert main(["merge", str(old_cfg), str(tmp_path / "old"), "--quiet"]) == 0
    old = folder_bytes(tmp_path / "old")
    # how long a whole process takes, and how long it writes (from its temporary folder's appearance)
    started = time.time()
    timed = subprocess.Popen([sys.executable, "-m", "gradmatch", "merge", str(cfg), str(tmp_path / "timed"), *flags],
                             env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert _wait_for(lambda: list(tmp_path.glob(".gradmatch-tmp-timed-*")), timed, 120)
    writing_started = time.time()
    assert _wait_for(lambda: (tmp_path / "timed").exists(), timed, 120) or (tmp_path / "timed").exists()
    writing = time.time() - writing_started
    assert timed.wait(120) == 0
    whole = time.time() - started

    rng = random.Random(20241126)
    outcomes = {"nothing": 0, "complete": 0, "old kept": 0}
    for trial in range(MERGE_TRIALS):
        out = tmp_path / f"out{trial}"
        replace = trial % 4 == 3  # every fourth trial replaces an older result with --overwrite
        if replace:
            out.mkdir()
            for name, data in old.items():
                (out / name).write_bytes(data)
        proc = subprocess.Popen([sys.executable, "-m", "gradmatch", "merge", str(cfg), str(out), *flags,
                                 *(["--overwrite"] if replace else [])], env=_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if trial % 2 == 0:  # any moment of the process: imports, planning, writing, renaming
            time.sleep(rng.uniform(0.0, whole))
        else:  # a moment of the writing itself: after the temporary folder appears
            tmp_glob = lambda: list(tmp_path.glob(f".gradmatch-tmp-{out.name}-*"))  # noqa: E731
            _wait_for(tmp_glob, proc, 120)
            time.sleep(rng.uniform(0.0, 1.2 * writing))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        if not out.exists():
            outcomes["nothing"] += 1
        elif folder_bytes(out) == reference:
            outcomes["complete"] += 1
        else:
            assert replace and folder_bytes(out) == old, f"trial {trial}: partial output {sorted(os.listdir(out))}"
            outcomes["old kept"] += 1
        # leftovers are only hidden temporary folders beside the destination
        stray = [p.name for p in tmp_path.iterdir() if p.name.startswith(".") and not p.name.startswith(".gradmatch-")]
        assert not stray
        # a rerun gives the clean run's bytes
        assert main(["merge", str(cfg), str(out), *flags, "--overwrite"]) == 0
        assert folder_bytes(out) == reference, f"trial {trial}: the rerun differs"
    print(f"merge kill trials: {outcomes} (process {whole:.2f} s, writing {writing:.2f} s)")
    assert sum(outcomes.values()) == MERGE_TRIALS
    assert outcomes["nothing"] + outcomes["old kept"] >= MERGE_TRIALS // 4  # most kills landed before the end


# --------------------------------------------------------------------------- gradmatch run


#: A smaller experiment than the pipeline tests' TINY: one child, one α per method, no multitask (13 jobs).
MICRO = tiny(
    name="micro",
    parent={"name": "original", "dataset": "digits-original", "train_split": "train[:160]", "test_split": "test[:60]",
            "extra_train": [{"dataset": "digits-rot90", "split": "train[:40]"}],
            "training": {"num_train_epochs": 6, "learning_rate": 3.0e-3}},
    children=[{"name": "rot90", "dataset": "digits-rot90", "train_split": "train[40:160]", "test_split": "test[:60]"}],
    training={"per_device_train_batch_size": 32, "learning_rate": 1.0e-3, "num_train_epochs": 2, "logging_strategy": "no"},
    fisher={"estimator": "sampled", "max_examples": 32, "batch_size": 16},
    merges=[{"method": "gradient_matching", "alphas": [1.0], "parameters": {"delta_0": 1.0e-12}},
            {"method": "task_arithmetic", "alphas": [1.0]}],
    multitask=False,
)
MICRO_JOBS = 13


def _run_cmd(exp: Path, workdir: Path) -> list[str]:
    return [sys.executable, "-m", "gradmatch", "run", str(exp), "--workdir", str(workdir), "--cores", "2"]


def _report(workdir: Path) -> tuple[dict, str]:
    report = json.loads((workdir / "report" / "report.json").read_text())
    return report, (workdir / "report" / "report.md").read_text()


@pytest.mark.slow
def test_sigkill_at_random_moments_of_run(tmp_path):
    exp = write_experiment(tmp_path / "micro.yaml", MICRO)
    started = time.time()
    clean = subprocess.run(_run_cmd(exp, tmp_path / "reference"), capture_output=True, text=True, env=_env(), timeout=600)
    whole = time.time() - started
    assert clean.returncode == 0, clean.stdout[-3000:] + clean.stderr[-3000:]
    assert len(finished_jobs(tmp_path / "reference")) == MICRO_JOBS
    reference = _report(tmp_path / "reference")

    rng = random.Random(7)
    workdir = tmp_path / "run"
    killed_with = []
    # the first kill lands early (start-up, data preparation); the others once a seeded random number of jobs is
    # done, plus a random delay, so they hit training, Fisher, merge and evaluation jobs while they run
    targets = sorted(rng.sample(range(2, MICRO_JOBS - 1), RUN_TRIALS - 1))
    for trial in range(RUN_TRIALS):
        # each trial kills a resumed run; the next trial resumes from what it left
        proc = subprocess.Popen(_run_cmd(exp, workdir), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        if trial == 0:
            time.sleep(rng.uniform(0.05, 0.2) * whole)
        else:
            count = lambda: len(list((workdir / "work").glob("*/job.json")))  # noqa: E731
            assert _wait_for(lambda: count() >= targets[trial - 1], proc, 600), "the run ended before the kill"
            time.sleep(rng.uniform(0.0, 2.0))
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # gradmatch, Snakemake, the job server and its running jobs
        except ProcessLookupError:  # pragma: no cover - the run had already ended
            pass
        proc.wait()
        done = finished_jobs(workdir)
        killed_with.append(len(done))
        for job_hash, record in done.items():  # every finished folder is complete: its record names what it is
            assert record["hash"] == job_hash
        for folder in (workdir / "work").iterdir() if (workdir / "work").exists() else []:
            # a job folder is complete (job.json), a hidden temporary one, or the empty folder Snakemake makes
            # for a directory() output before the job starts: never partial content under the final name
            assert (folder.name.startswith(".gradmatch-") or (folder / "job.json").is_file()
                    or not any(folder.iterdir())), sorted(os.listdir(folder))
        report = workdir / "report"
        assert not report.exists() or _report(workdir) == reference
    resumed = subprocess.run(_run_cmd(exp, workdir), capture_output=True, text=True, env=_env(), timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    print(f"run kill trials: finished jobs after each kill {killed_with}")
    assert killed_with == sorted(killed_with) and killed_with[0] < MICRO_JOBS  # finished work is kept
    assert len(finished_jobs(workdir)) == MICRO_JOBS
    assert not list((workdir / "work").glob(".gradmatch-*"))  # the killed jobs' temporary folders are cleaned
    assert set(finished_jobs(workdir)) == set(finished_jobs(tmp_path / "reference"))
    assert _report(workdir) == reference  # the same table, byte for byte in report.md
