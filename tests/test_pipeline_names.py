"""Names and paths of an experiment as the workflow engine and the jobs see them: names that would be one Snakemake
rule or one folder, or file names too long for the file system, are refused when the experiment is read (a dry run
included, nothing written); every relative path is made absolute against the current directory once, so the checks
before a run, the dry run and the jobs (which run in the run folder) read the same files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from conftest import make_tiny_lm, write_jsonl
from gradmatch.cli import main
from gradmatch.config.experiment import MAX_NAME_LENGTH, NAME_MAX, load_experiment, name_key
from gradmatch.errors import UserError
from gradmatch.pipeline.graph import Job, build_jobs, job_spec
from gradmatch.pipeline.runner import run_jobs
from pipeline_helpers import tiny, write_experiment
from test_security import snapshot


def _refused(tmp_path: Path, capsys, exp: dict, *extra: str, dry_run: bool = True) -> str:
    """`gradmatch run` of ``exp``: exit 2, one line, no run folder (nothing written anywhere in tmp_path)."""
    path = write_experiment(tmp_path / "exp.yaml", exp)
    before = snapshot(tmp_path)
    workdir = tmp_path / "run"
    argv = ["run", str(path), "--workdir", str(workdir), *(["--dry-run"] if dry_run else []), *extra]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gradmatch: error: "), err
    assert snapshot(tmp_path) == before and not workdir.exists()
    return err[0]


def _children(*names: str) -> list[dict]:
    return [{"name": n, "dataset": "digits-rot90", "train_split": "train[:40]", "test_split": "test[:40]"} for n in names]


# --------------------------------------------------------------------------- class 8: names that collide downstream


@pytest.mark.parametrize("names", [("rot-90", "rot_90"), ("rot.90", "rot_90"), ("Rot90", "rot90"), ("a-b.c", "a.b_c")])
@pytest.mark.parametrize("dry_run", [True, False])
def test_task_names_one_rule_apart_are_refused_when_read(tmp_path, capsys, names, dry_run):
    """On main these passed validation; the dry run ended in Snakemake's CreateRuleException and the real run wrote
    the run folder first."""
    line = _refused(tmp_path, capsys, tiny(children=_children(*names)), dry_run=dry_run)
    assert "task names must be unique" in line and repr(names[0]) in line and repr(names[1]) in line, line


def test_merge_names_one_rule_apart_are_refused(tmp_path, capsys):
    merges = [{"method": "task_arithmetic", "name": "ta-1"}, {"method": "task_arithmetic", "name": "ta.1",
                                                             "alphas": [2.0]}]
    line = _refused(tmp_path, capsys, tiny(merges=merges))
    assert "merge names" in line and "'ta-1'" in line and "'ta.1'" in line
    assert load_experiment(tiny(merges=[merges[0], {**merges[1], "name": "ta-2"}]))  # distinct names are fine


@pytest.mark.parametrize("change, words", [
    ({"children": _children("multitask")}, ["task 'multitask'", "data/multitask-train"]),
    ({"attribute_classifier": {"name": "Parent", "dataset": "digits-rot90"}}, ["'Parent'", "'parent'"]),
    ({"attribute_classifier": {"name": "child_rot90", "dataset": "digits-rot90"}}, ["'child_rot90'", "'child-rot90'"]),
])
def test_names_the_pipeline_gives_its_own_models_are_refused(tmp_path, capsys, change, words):
    line = _refused(tmp_path, capsys, tiny(**change))
    assert all(w in line for w in words), line


def test_a_task_named_multitask_is_fine_without_the_multitask_model():
    exp = load_experiment(tiny(children=_children("multitask"), multitask=False))
    assert "data/multitask-train" in {j.name for j in build_jobs(exp)}


def test_the_length_bound_keeps_every_file_name_within_the_file_system_limit():
    """The longest names the schema takes, with the longest seed, make file names (logs, SLURM's log folders, the
    links' temporaries) of at most NAME_MAX bytes; one character more is refused when the experiment is read."""
    long = "t" * MAX_NAME_LENGTH
    exp = tiny(name="e" * MAX_NAME_LENGTH, seeds=[2**32 - 1, 0], children=_children(long, "u" * MAX_NAME_LENGTH),
               merges=[{"method": "gradient_matching", "name": "m" * MAX_NAME_LENGTH},
                       {"method": "regmean", "name": "r" * MAX_NAME_LENGTH}])
    jobs = build_jobs(exp)
    longest = max((name for job in jobs for name in job.file_names()), key=len)
    assert f"child_{long}" in longest and len(longest.encode()) <= NAME_MAX
    for change in ({"name": "e" * (MAX_NAME_LENGTH + 1)}, {"children": _children("t" * (MAX_NAME_LENGTH + 1))},
                   {"merges": [{"method": "average", "name": "m" * (MAX_NAME_LENGTH + 1)}]}):
        with pytest.raises(UserError, match=f"at most {MAX_NAME_LENGTH}"):
            load_experiment(tiny(**change))


def test_a_long_task_name_is_refused_before_the_run_writes(tmp_path, capsys):
    """On main a 230-character task passed the dry run; the real run wrote the plan and its jobs failed on their
    log file (File name too long)."""
    line = _refused(tmp_path, capsys, tiny(children=_children("x" * 230)), dry_run=False)
    assert "children.0.name" in line and "230 characters" in line


def test_a_run_folder_name_too_long_is_refused_by_the_dry_run_too(tmp_path, capsys):
    line = _refused(tmp_path, capsys, tiny(), "--workdir", str(tmp_path / ("w" * 300)))
    assert "run folder" in line and "300 bytes" in line


def test_jobs_built_in_python_are_checked_the_same_way(tmp_path):
    """The job graph's own check (what the experiment's is a friendlier form of): two jobs one rule apart, or a
    name too long for a log file, are one line before anything is written."""
    jobs = build_jobs(tiny(merges=[], multitask=False))
    by_name = {j.name: j for j in jobs}
    twin = Job("evaluate", "eval/parent.len256", {"label": "parent", "tasks": ["original"], "max_length": 256},
               {"model": by_name["models/parent"], "test/original": by_name["data/original-test"]})
    assert name_key(twin.name) == name_key("eval/parent-len256") != name_key("eval/parent")
    clash = Job("evaluate", "eval/parent_len256", {**twin.params, "batch_size": 7}, twin.inputs)
    with pytest.raises(UserError, match="eval/parent.len256 .* eval/parent_len256 .* Snakemake rule"):
        run_jobs(jobs + [twin, clash], tmp_path / "run", dry_run=True)
    long = Job("evaluate", "eval/" + "p" * 240, twin.params, twin.inputs)
    with pytest.raises(UserError, match=f"file systems take at most {NAME_MAX}"):
        run_jobs(jobs + [long], tmp_path / "run", dry_run=True)
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- class 9: relative paths


def test_every_relative_path_is_made_absolute_against_the_current_directory(tmp_path, monkeypatch):
    here = tmp_path / "here"
    write_jsonl(here / "data" / "train.jsonl", [{"text": "a", "label": 0}])
    (here / "local-set").mkdir()
    monkeypatch.chdir(here)
    exp = load_experiment({
        "name": "paths", "model": "./lm",
        "parent": {"name": "p", "dataset": "data/train.jsonl", "finetune": False, "hessian_scale": 10,
                   "extra_train": [{"dataset": "local-set"}, {"dataset": "owner/hub-set"}]},
        "children": [{"name": "c", "dataset": "sst2", "training": {"cache_dir": "cache"}},
                     {"name": "d", "dataset": "../elsewhere/d.csv"}],
        "attribute_classifier": {"model": "classifier", "dataset": "digits-rot90"},
        "training": {"cache_dir": "~/hf-cache"},
        "multitask": {"enabled": False, "training": {"cache_dir": "./mt-cache"}},
        "evaluation": {"generation": {"prompts": "prompts.txt"},
                       "lm_eval": {"tasks": ["sentiment_imdb"], "include_path": "tasks"}},
    })
    assert exp.model == str(here / "lm")
    assert exp.parent.dataset == str(here / "data" / "train.jsonl")
    assert [p.dataset for p in exp.parent.extra_train] == [str(here / "local-set"), "owner/hub-set"]  # a hub id stays
    assert [c.dataset for c in exp.children] == ["sst2", str(here / ".." / "elsewhere" / "d.csv")]  # a preset stays
    assert exp.children[0].training["cache_dir"] == str(here / "cache")
    assert exp.training["cache_dir"] == str(Path("~/hf-cache").expanduser())
    assert exp.multitask.training["cache_dir"] == str(here / "mt-cache")
    assert exp.attribute_classifier.model == "classifier"  # not a path here, so a hub id (as the model code reads it)
    assert exp.attribute_classifier.dataset == "digits-rot90"
    assert exp.evaluation.generation.prompts == str(here / "prompts.txt")
    assert exp.evaluation.lm_eval.include_path == exp.lm_eval_include_path == str(here / "tasks")
    assert load_experiment(exp.model_dump()) == exp  # once absolute, read again anywhere: the same
    monkeypatch.chdir(tmp_path)
    assert load_experiment(exp.model_dump()) == exp


def test_the_dry_run_and_the_jobs_read_the_same_data(tmp_path, monkeypatch):
    """A relative data file: the checks before a run found it from the current directory, while the prepare job,
    which runs in the run folder, looked for it there (on main: the dry run passed and the job failed). Now the
    job's spec names the absolute path and the job, run from the run folder as Snakemake runs it, reads it."""
    from gradmatch.pipeline.jobs import run_job

    here = tmp_path / "here"
    rows = [{"image": [[0.0] * 8] * 8, "label": i % 10} for i in range(12)]
    write_jsonl(here / "mine" / "train.jsonl", rows)
    write_jsonl(here / "mine" / "test.jsonl", rows)
    monkeypatch.chdir(here)
    exp = tiny(children=[{"name": "mine", "dataset": "mine"}], merges=[], multitask=False)
    workdir = here / "run"
    jobs = build_jobs(exp)
    assert run_jobs(jobs, workdir, dry_run=True).returncode == 0
    prepare = next(j for j in jobs if j.name == "data/mine-test")
    spec = job_spec(prepare, workdir)
    assert spec["params"]["parts"][0]["dataset"] == str(here / "mine")
    (workdir / "work").mkdir(parents=True)
    monkeypatch.chdir(workdir)
    out = run_job(spec)
    assert json.loads((out / "job.json").read_text())["kind"] == "prepare"


def test_a_relative_data_root_in_the_environment_is_resolved_when_planned(tmp_path, monkeypatch):
    (tmp_path / "root").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GRADMATCH_DATA_DIR", "root")
    prepare = next(j for j in build_jobs(tiny()) if j.kind == "prepare")
    assert prepare.params["data_dir"] == str(tmp_path / "root")


def test_a_prompts_file_is_checked_before_the_run(tmp_path, capsys, monkeypatch):
    """On main a relative prompts file was not looked for before the run, and the evaluate jobs looked for it in the
    run folder; now it is absolute and a missing one is refused by the dry run, naming where it was looked for."""
    lm = make_tiny_lm(tmp_path / "lm")
    write_jsonl(tmp_path / "reviews" / "train.jsonl", [{"text": "good film", "label": 1}] * 4)
    write_jsonl(tmp_path / "reviews" / "test.jsonl", [{"text": "bad film", "label": 0}] * 4)
    monkeypatch.chdir(tmp_path)
    exp = {"name": "gen", "model": "lm",
           "parent": {"name": "p", "dataset": "reviews", "finetune": False, "hessian_scale": 10},
           "children": [{"name": "c", "dataset": "reviews"}], "multitask": False,
           "evaluation": {"generation": {"prompts": "prompts.txt"}}}
    line = _refused(tmp_path, capsys, exp)
    assert f"evaluation.generation.prompts: prompts file {tmp_path / 'prompts.txt'} does not exist" in line, line
    (tmp_path / "prompts.txt").write_text("The movie\n")
    path = write_experiment(tmp_path / "exp.yaml", exp)
    assert main(["run", str(path), "--workdir", str(tmp_path / "run"), "--dry-run", "-q"]) == 0
    assert str(lm) in yaml.safe_dump(load_experiment(exp).model_dump())
