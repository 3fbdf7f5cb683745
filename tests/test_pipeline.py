"""The pipeline: experiment schema, job graph and hashes, and a tiny experiment run end to end with Snakemake."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from gradmatch.cli import main
from gradmatch.config.experiment import load_experiment
from gradmatch.errors import UserError
from gradmatch.pipeline.graph import build_jobs
from pipeline_helpers import TINY, TINY_JOB_COUNT, finished_jobs, report_rows, tiny, write_experiment

# --------------------------------------------------------------------------- schema


def test_schema_defaults_and_resources():
    exp = load_experiment(tiny(resources={"default": {"threads": 3}, "train": {"gpus": 1}}))
    one = {"processes": 1, "shard": False}  # one plain process (test_pipeline_fisher_processes.py: several)
    assert exp.resources.for_kind("train").model_dump() == {"threads": 3, "mem_mb": 8000, "runtime": 240, "gpus": 1,
                                                            **one}
    assert exp.resources.for_kind("report").model_dump() == {"threads": 3, "mem_mb": 2000, "runtime": 10, "gpus": 0,
                                                             **one}
    plain = load_experiment(tiny(resources={}))
    assert plain.resources.for_kind("fisher").model_dump() == {"threads": 2, "mem_mb": 8000, "runtime": 120, "gpus": 0,
                                                               **one}
    assert exp.multitask.enabled is True
    assert [t.name for t in exp.tasks] == ["original", "rot90", "inverted"]


@pytest.mark.parametrize("change, words", [
    ({"merges": [{"method": "nope"}]}, "unknown merge method"),
    ({"children": []}, "children"),
    ({"training": {"output_dir": "x"}}, "set by the pipeline"),
    ({"children": [{"name": "original", "dataset": "digits-rot90"}]}, "unique"),
    ({"merges": [{"method": "ties", "alphas": [1, 1]}]}, "repeat"),
    ({"colour": "blue"}, "unknown key"),
])
def test_schema_rejects_bad_experiments(change, words):
    with pytest.raises(UserError, match=words):
        load_experiment(tiny(**change))


@pytest.mark.parametrize("change, where", [
    ({"seeds": [-1]}, "seeds.0"), ({"seeds": [0, 2**64]}, "seeds.1"), ({"seed": -3}, "seed"),
    ({"seed": 2**32}, "seed"), ({"training": {"seed": -1}}, "training: seed"),
])
def test_seeds_numpy_cannot_take_are_refused_when_the_experiment_is_read(tmp_path, capsys, change, where):
    bad = write_experiment(tmp_path / "bad.yaml", tiny(**change))
    workdir = tmp_path / "run"
    assert main(["run", str(bad), "--workdir", str(workdir), "--dry-run"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gradmatch: error: "), lines
    assert f"{where}: must be an integer from 0 to 2**32 - 1 (4294967295)" in lines[0], lines[0]
    assert not workdir.exists()
    assert load_experiment(tiny(seeds=[0, 2**32 - 1])).run_seeds == [0, 2**32 - 1]


def test_cli_bad_experiment_one_line_exit_2_nothing_written(tmp_path, capsys):
    bad = write_experiment(tmp_path / "bad.yaml", tiny(merges=[{"method": "gradient_matching", "alphas": "x"}]))
    workdir = tmp_path / "run"
    assert main(["run", str(bad), "--workdir", str(workdir)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gradmatch: error:") and "merges.0.alphas" in err and "\n" not in err
    assert not workdir.exists()
    assert main(["run", str(tmp_path / "missing.yaml")]) == 2
    assert main(["run", str(bad), "--cores", "0"]) == 2
    assert main(["run", str(write_experiment(tmp_path / "ok.yaml")), "--workdir", str(workdir),
                 "--data-dir", str(tmp_path / "nowhere")]) == 2
    assert main(["run", str(tmp_path / "ok.yaml"), "--executor", "nosuchplugin"]) == 2
    assert not workdir.exists()


# --------------------------------------------------------------------------- graph and hashes


def test_graph_shape_and_order():
    jobs = build_jobs(TINY)
    assert len(jobs) == TINY_JOB_COUNT
    position = {j.hash: i for i, j in enumerate(jobs)}
    for job in jobs:  # every job after its inputs
        assert all(position[dep.hash] < position[job.hash] for dep in job.inputs.values())
    by_name = {j.name: j for j in jobs}
    assert by_name["fisher/parent"].inputs["data"] is by_name["data/original-train"]  # parent's own data
    assert by_name["models/child-rot90"].inputs["init"] is by_name["models/parent"]
    gm, ta = by_name["merges/gradient_matching"], by_name["merges/task_arithmetic"]
    assert "parent_fisher" in gm.inputs and "child_fisher/rot90" in gm.inputs
    assert not any("fisher" in role for role in ta.inputs)  # task arithmetic does not wait for Fishers
    rm = by_name["merges/regmean"]
    assert rm.inputs["child_gram/rot90"] is by_name["gram/child-rot90"] and "parent_fisher" not in rm.inputs
    assert jobs[-1].kind == "report" and len(jobs[-1].inputs) == 4 + 3  # 4 models + 3 merge methods


def test_hash_covers_what_determines_a_job_and_nothing_else():
    base = {j.name: j.hash for j in build_jobs(TINY)}
    assert base == {j.name: j.hash for j in build_jobs(TINY)}  # stable
    assert len(set(base.values())) == len(base)
    # a child's learning rate changes that child and everything downstream of it, nothing else
    changed = tiny()
    changed["children"][0]["training"] = {"learning_rate": 5e-4}
    new = {j.name: j.hash for j in build_jobs(changed)}
    differ = {name for name in base if base[name] != new[name]}
    assert differ == {"models/child-rot90", "fisher/child-rot90", "gram/child-rot90", "eval/child-rot90",
                      "merges/gradient_matching", "merges/task_arithmetic", "merges/regmean", "report"}
    # resources and names do not enter the hash
    res = {j.name: j.hash for j in build_jobs(tiny(resources={"default": {"threads": 2, "mem_mb": 9999}}))}
    assert res == base


def test_a_prior_merge_needs_no_parent_fisher():
    """base_hessian: prior: the merge job gets no parent Fisher, and no Fisher of the parent is computed when no
    merge takes H_0 from it (a pretrained body may have no likelihood to compute one with)."""
    from gradmatch.pipeline.jobs import merge_config

    prior_only = tiny(merges=[{"method": "gradient_matching", "name": "gm-prior", "base_hessian": "prior",
                               "alphas": [1.0]}, {"method": "task_arithmetic"}])
    jobs = {j.name: j for j in build_jobs(prior_only)}
    assert "fisher/parent" not in jobs and "fisher/child-rot90" in jobs
    merge = jobs["merges/gm-prior"]
    assert "parent_fisher" not in merge.inputs and merge.params["base_hessian"] == "prior"
    inputs = {"parent": "P", "child/rot90": "C1", "child/inverted": "C2", "child_fisher/rot90": "F1",
              "child_fisher/inverted": "F2"}
    params = {**merge.params, "hessian_scales": {"rot90": 160, "inverted": 120}}
    config = merge_config(params, inputs, 1.0)
    assert config["base_hessian"] == "prior" and "base_hessian_scale" not in config
    both = {j.name for j in build_jobs(tiny(merges=prior_only["merges"] + [{"method": "gradient_matching"}]))}
    assert "fisher/parent" in both


def test_dry_run_lists_jobs_and_runs_nothing(tmp_path, capsys):
    exp = write_experiment(tmp_path / "tiny.yaml")
    workdir = tmp_path / "run"
    assert main(["run", str(exp), "--workdir", str(workdir), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"{TINY_JOB_COUNT} jobs in {workdir.resolve()} (0 already done, {TINY_JOB_COUNT} to run)" in out
    for name in ("models/parent", "fisher/child-inverted", "merges/gradient_matching", "eval/multitask", "report"):
        assert name in out
    assert not (workdir / "work").exists() and not (workdir / "report").exists()


def test_dry_run_counts_jobs_by_kind_with_an_estimate(tmp_path, capsys):
    """The table's counts add up to the jobs to run (Snakemake's own table, which counts its target rule too,
    is not shown), and the estimate follows the documented rates: one train job of the tiny run by hand."""
    from gradmatch.pipeline.preflight import JOB_SECONDS, RATES, _job_seconds

    exp = write_experiment(tmp_path / "tiny.yaml")
    assert main(["run", str(exp), "--workdir", str(tmp_path / "run"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "Job stats" not in out and "total" in out
    table = {line.split()[0]: int(line.split()[1]) for line in out.splitlines()
             if line.startswith("  ") and len(line.split()) > 2 and line.split()[1].isdigit()}
    assert table.pop("total") == TINY_JOB_COUNT == sum(table.values())
    kinds = [j.kind for j in build_jobs(TINY)]
    assert table == {k: kinds.count(k) for k in set(kinds)}
    job = next(j for j in build_jobs(TINY) if j.name == "models/child-inverted")
    settings = job.params["training"]
    rows = job.inputs["train"].params["parts"][0]["size"]  # 120 images of 8×8 pixels: 16 patches + 1 token
    from gradmatch.models import load_model

    params = sum(p.numel() for p in load_model("vit-digits")[0].parameters())
    expected = JOB_SECONDS + rows * settings["num_train_epochs"] * (17 / 128) * (params / 22.7e6) / RATES["train"]
    assert _job_seconds(job, {}, {}) == pytest.approx(expected)


def test_dry_run_checks_the_data_root(tmp_path, sentiment_root, capsys):
    """A data root holding one of the sets the experiment names is refused before anything runs."""
    import shutil

    root = tmp_path / "data"
    shutil.copytree(sentiment_root / "sst2", root / "sst2")
    exp = {"name": "s", "model": "minilm", "parent": {"name": "sst2", "dataset": "sst2", "train_size": 8},
           "children": [{"name": "rt", "dataset": "rotten_tomatoes", "train_size": 8}],
           "merges": [{"method": "task_arithmetic"}]}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(exp))
    rc = main(["run", str(tmp_path / "s.yaml"), "--workdir", str(tmp_path / "run"), "--data-dir", str(root), "--dry-run"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert "rotten_tomatoes" in err and "has no folder rotten_tomatoes/" in err
    exp["children"][0]["dataset"] = "sst2"
    exp["children"][0]["test_split"] = "validation"  # sst2 has train and test files only
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(exp))
    rc = main(["run", str(tmp_path / "s.yaml"), "--workdir", str(tmp_path / "run2"), "--data-dir", str(root), "--dry-run"])
    err = capsys.readouterr().err
    assert rc == 2 and "no split 'validation'" in err


# --------------------------------------------------------------------------- end to end


def _run(exp_path: Path, workdir: Path, *extra: str, **kw) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "gradmatch", "run", str(exp_path), "--workdir", str(workdir), "--cores", "2", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """The tiny experiment run once, uninterrupted."""
    root = tmp_path_factory.mktemp("pipeline")
    exp = write_experiment(root / "tiny.yaml")
    started = time.time()
    proc = _run(exp, root / "run")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    print(f"tiny pipeline: {time.time() - started:.0f} s")
    return root / "run", exp


@pytest.mark.slow
def test_end_to_end_report_links_and_rerun_skips_everything(finished_run):
    workdir, exp = finished_run
    rows = report_rows(workdir)
    labels = [r["label"] for r in rows]
    assert labels == ["parent", "child-rot90", "child-inverted", "gradient_matching α=0.5", "gradient_matching α=1",
                      "task_arithmetic α=0.5", "task_arithmetic α=1", "regmean α=1", "multitask"]
    for row in rows:
        assert set(row["values"]) == {"original", "rot90", "inverted"}
        assert all(0.0 <= v <= 1.0 for v in row["values"].values())
        assert row["average"] == pytest.approx(sum(row["values"].values()) / 3)
    by = {r["label"]: r for r in rows}
    assert by["parent"]["values"]["original"] > 0.3  # learned something (chance is 0.1)
    assert by["child-rot90"]["values"]["rot90"] > by["parent"]["values"]["rot90"]  # fine-tuning helps its task
    # readable names point into work/<hash>
    assert (workdir / "models" / "parent" / "config.json").is_file()
    assert (workdir / "models" / "child-rot90").resolve().parent.parent == (workdir / "work").resolve()
    assert (workdir / "fisher" / "parent" / "hessian" / "fisher.json").is_file()
    meta = json.loads((workdir / "models" / "child-inverted" / "training_metadata.json").read_text())
    assert meta["num_train_examples"] == 120  # train_size: a seeded subset
    for name in ("report.md", "report.json", "alpha_average.png", "alpha_per_task.png", "best_per_task.png"):
        assert (workdir / "report" / name).stat().st_size > 0
    table = (workdir / "report" / "report.md").read_text()
    assert "| model | original | rot90 | inverted | average |" in table
    # the merge configs rebuild a merge
    assert (workdir / "merges" / "gradient_matching" / "configs" / "alpha-1.yaml").is_file()
    # a rerun finds every job done and changes nothing
    before = finished_jobs(workdir)
    proc = _run(exp, workdir)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"({TINY_JOB_COUNT} already done, 0 to run)" in proc.stdout
    assert finished_jobs(workdir) == before


@pytest.mark.slow
def test_report_command_rebuilds_the_same_table(finished_run, tmp_path, capsys):
    workdir, _ = finished_run
    out = tmp_path / "rep"
    assert main(["report", str(workdir), "--out", str(out)]) == 0
    assert json.loads((out / "report.json").read_text()) == json.loads((workdir / "report" / "report.json").read_text())
    assert "| parent |" in capsys.readouterr().out
    assert main(["report", str(tmp_path)]) == 2  # not a run folder


@pytest.mark.slow
def test_report_of_a_copied_run_folder_reads_the_copy(finished_run, tmp_path):
    """The job specs name the original folder's paths; the report of a copy must read the copy's results."""
    import shutil

    workdir, _ = finished_run
    copy = tmp_path / "copy"
    shutil.copytree(workdir, copy, symlinks=True, ignore=shutil.ignore_patterns(".snakemake"))
    metrics = copy / "eval" / "parent" / "metrics.json"
    changed = json.loads(metrics.read_text())
    changed["tasks"]["original"]["accuracy"] = 0.123
    metrics.write_text(json.dumps(changed))
    out, results = __import__("gradmatch.pipeline.report", fromlist=["report_run"]).report_run(copy)
    assert out == copy / "report"
    assert {r["label"]: r for r in results["rows"]}["parent"]["values"]["original"] == 0.123
    assert report_rows(workdir)[0]["values"]["original"] != 0.123  # the original run is untouched


@pytest.mark.slow
def test_killed_run_resumes_without_redoing_finished_jobs(finished_run, tmp_path):
    reference, exp = finished_run
    workdir = tmp_path / "run"
    cmd = [sys.executable, "-m", "gradmatch", "run", str(exp), "--workdir", str(workdir), "--cores", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not list((workdir / "work").glob("train-*/job.json")):
            assert proc.poll() is None, "the run ended before it could be killed"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole run: gradmatch, Snakemake and its running jobs
        proc.wait()
    first = finished_jobs(workdir)
    assert any(j["kind"] == "train" for j in first.values()) and len(first) < TINY_JOB_COUNT
    resumed = _run(exp, workdir)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"({len(first)} already done" in resumed.stdout
    after = finished_jobs(workdir)
    assert len(after) == TINY_JOB_COUNT
    assert all(after[h] == first[h] for h in first)  # finished jobs were not redone (same record, same seconds)
    assert not list((workdir / "work").glob(".gradmatch-*"))  # half-written folders of the killed jobs cleaned
    # same hashes and the same report as the uninterrupted run (deterministic given the seed)
    assert set(after) == set(finished_jobs(reference))
    assert report_rows(workdir) == report_rows(reference)


@pytest.mark.slow
def test_failing_job_shows_its_log(tmp_path):
    """A model folder whose config reads but whose weights are corrupt: the plan is built, the training job fails."""
    from transformers import ViTConfig

    broken = tmp_path / "broken-vit"
    ViTConfig(image_size=8, patch_size=2, num_channels=1, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
              intermediate_size=32, num_labels=10, architectures=["ViTForImageClassification"]).save_pretrained(broken)
    (broken / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    exp = write_experiment(tmp_path / "bad.yaml", tiny(model=str(broken), merges=[], multitask=False))
    proc = _run(exp, tmp_path / "run")
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "job models/parent (train) failed; log:" in out
    assert "broken-vit" in out  # the log's last lines name the problem


@pytest.mark.slow
def test_a_missing_model_fails_before_any_job(tmp_path):
    exp = write_experiment(tmp_path / "bad.yaml", tiny(model=str(tmp_path / "no-such-model"), merges=[],
                                                        multitask=False))
    proc = _run(exp, tmp_path / "run")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"gradmatch: error: model {tmp_path / 'no-such-model'} does not exist"]
    assert not (tmp_path / "run" / "work").exists()


def test_jobs_declare_their_inputs():
    from gradmatch.pipeline.jobs import JOB_FUNCTIONS, JOB_IO, check_inputs

    assert set(JOB_IO) == set(JOB_FUNCTIONS)
    for job in build_jobs(TINY):  # every job the graph builds matches its kind's declaration (roles only)
        declared = [d.rstrip("?") for d in JOB_IO[job.kind][0]]
        for role in job.inputs:
            assert any(role.startswith(d[:-1]) if d.endswith("*") else role == d for d in declared), (job, role)
    with pytest.raises(UserError, match="missing input 'model'"):
        check_inputs("fisher", {"data": "/x"})
    with pytest.raises(UserError, match="unknown input 'extra'"):
        check_inputs("prepare", {"extra": "/x"})


def test_graph_can_be_extended_from_python(tmp_path):
    from gradmatch.pipeline.graph import Job
    from gradmatch.pipeline.runner import run_jobs

    jobs = build_jobs(TINY)
    by_name = {j.name: j for j in jobs}
    extra = Job("evaluate", "eval/parent-long", {"label": "parent", "tasks": ["original"], "batch_size": 8,
                                                 "max_length": 256},
                {"model": by_name["models/parent"], "test/original": by_name["data/original-test"]})
    lines = []
    result = run_jobs(jobs + [extra], tmp_path / "run", dry_run=True, echo=lines.append)
    assert result.returncode == 0
    assert f"{TINY_JOB_COUNT + 1} jobs in {(tmp_path / 'run').resolve()}" in lines[0] and "eval/parent-long" in lines[1]
    assert not (tmp_path / "run").exists()  # a new run's dry run leaves no folder
    (tmp_path / "run").mkdir()  # an existing run folder: the dry run refreshes its plan
    assert run_jobs(jobs + [extra], tmp_path / "run", dry_run=True, echo=lines.append).returncode == 0
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert plan["jobs"][-1]["name"] in ("eval/parent-long", "report")
    assert {j["name"] for j in plan["jobs"]} >= {"eval/parent-long", "models/parent"}


@pytest.mark.slow
def test_mismatch_of_every_merge_of_a_run(finished_run, tmp_path):
    """gradmatch mismatch --run: every method at every α, rebuilt from the kept configs, beside its test error."""
    import math

    workdir, _ = finished_run
    out = tmp_path / "mismatch"
    assert main(["mismatch", "--run", str(workdir), "--max-examples", "16", "--out", str(out)]) == 0
    rows = json.loads((out / "mismatch.json").read_text())["merges"]
    assert [(r["method"], r["alpha"]) for r in rows] == [("gradient_matching", 0.5), ("gradient_matching", 1.0),
                                                         ("task_arithmetic", 0.5), ("task_arithmetic", 1.0),
                                                         ("regmean", 1.0)]
    accuracy = {r["label"]: r["values"] for r in report_rows(workdir)}
    record = json.loads((out / "mismatch.json").read_text())
    assert set(record["rank_correlation_with_error"]) == {"plain_mismatch", "scaled_mismatch", "residual",
                                                           "preconditioned"}
    for r in rows:
        assert math.isfinite(r["total_mismatch"]) and r["total_mismatch"] > 0
        assert math.isfinite(r["residual"]) and r["scales"]["base_hessian_scale"] == 320  # the run's N_0: 240 + 2 × 40
        if r["method"] == "task_arithmetic":  # θ̄ = θ̄_TA: no prior term, whatever α
            assert r["prior_term"] <= 1e-6 * r["residual"]
        assert set(r["mismatch"]) == {"rot90", "inverted"} and r["examples_per_task"] == 16
        for task, error in r["test_error"].items():
            assert error == pytest.approx(1 - accuracy[f"{r['method']} α={r['alpha']:g}"][task], abs=1e-9)
    assert (out / "mismatch_vs_error.png").read_bytes()[:4] == b"\x89PNG"
    assert not list(workdir.glob("gradmatch-mismatch-*"))  # rebuilt merges are cleaned up


def test_job_server_stops_when_its_run_is_killed():
    """A `gradmatch run` killed with SIGKILL cannot stop its warm job server: the server notices and exits."""
    code = ("import time\nfrom gradmatch.pipeline import jobserver\n"
            "proc = jobserver.running({}).__enter__()\nprint(proc.pid, flush=True)\ntime.sleep(120)\n")
    run = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    server = int(run.stdout.readline())
    run.kill()
    run.wait()
    deadline = time.time() + 60

    def alive() -> bool:
        try:
            return Path(f"/proc/{server}/stat").read_text().split()[2] != "Z"
        except FileNotFoundError:
            return False

    while alive() and time.time() < deadline:
        time.sleep(0.2)
    if alive():
        os.kill(server, signal.SIGKILL)
        pytest.fail("the job server outlived the run that started it")
