"""Where a run's Hessians come from (`hessian: fisher | adam | ivon`, `fisher.data: split | generated`): the plan,
the hashes, the refusals, merge.json's estimators and the report's line about them."""

from __future__ import annotations

import inspect
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import make_tiny_lm
from gradmatch.cli import main
from gradmatch.config.experiment import load_experiment
from gradmatch.errors import UserError
from gradmatch.pipeline.graph import build_jobs
from pipeline_helpers import TINY, TINY_JOB_COUNT, report_rows, tiny, write_experiment


def _by_name(exp) -> dict:
    return {j.name: j for j in build_jobs(exp)}


def _kinds(exp) -> set[str]:
    return {j.kind for j in build_jobs(exp)}


def _dry_run_table(tmp_path: Path, exp: dict, capsys) -> dict[str, int]:
    path = write_experiment(tmp_path / "exp.yaml", exp)
    assert main(["run", str(path), "--workdir", str(tmp_path / "run"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    return {line.split()[0]: int(line.split()[1]) for line in out.splitlines()
            if line.startswith("  ") and len(line.split()) > 2 and line.split()[1].isdigit()}


def _pretrained_parent(**changes) -> dict:
    """TINY with its parent taken as it is (vit-digits' random weights stand in for a pretrained model)."""
    parent = {**TINY["parent"], "finetune": False, "hessian_scale": 320}
    parent.pop("training")
    return tiny(parent=parent, **changes)


# --------------------------------------------------------------------------- the plan


def test_fisher_is_the_default_and_keeps_every_hash():
    """hessian: fisher (the default) plans exactly what the pipeline planned before the key existed: the same
    jobs with the same hashes, so earlier run folders are reused; a Fisher job's parameters gain no key."""
    default = _by_name(TINY)
    explicit = _by_name(tiny(hessian="fisher", fisher={**TINY["fisher"], "data": "split"}))
    assert {n: j.hash for n, j in default.items()} == {n: j.hash for n, j in explicit.items()}
    assert {j.kind for j in default.values()} == {"prepare", "train", "fisher", "gram", "evaluate", "merge", "report"}
    assert sorted(n for n, j in default.items() if j.kind == "fisher") == [
        "fisher/child-inverted", "fisher/child-rot90", "fisher/parent"]
    assert set(default["fisher/parent"].params) == {"estimator", "max_examples", "batch_size", "max_length", "seed"}
    assert all("save_hessian" not in j.params["training"] for j in default.values() if j.kind == "train")


@pytest.mark.parametrize("source, optimizer", [("adam", None), ("ivon", "IVON")])
def test_adam_and_ivon_plan_no_fisher_job_for_a_trained_model(source, optimizer):
    jobs = _by_name(tiny(hessian=source))
    assert {j.kind for j in jobs.values()} == {"prepare", "train", "gram", "evaluate", "merge", "report"}
    assert len(jobs) == TINY_JOB_COUNT - 3  # the three Fisher jobs are gone
    trained = [j for j in jobs.values() if j.kind == "train"]
    assert sorted(j.name for j in trained) == ["models/child-inverted", "models/child-rot90", "models/multitask",
                                               "models/parent"]
    for job in trained:
        assert job.params["training"]["save_hessian"] == source
        assert job.params["training"].get("optimizer_name") == optimizer
    gm = jobs["merges/gradient_matching"]
    assert gm.inputs["parent_hessian"] is jobs["models/parent"]
    assert gm.inputs["child_hessian/rot90"] is jobs["models/child-rot90"] is gm.inputs["child/rot90"]
    assert not any("fisher" in role for role in gm.inputs)
    ta = jobs["merges/task_arithmetic"]
    assert not any("hessian" in role or "fisher" in role for role in ta.inputs)


@pytest.mark.parametrize("source", ["fisher", "adam", "ivon"])
def test_a_dry_run_shows_the_jobs_of_each_source(tmp_path, capsys, source):
    table = _dry_run_table(tmp_path, tiny(hessian=source), capsys)
    expected = {"prepare": 7, "train": 4, "gram": 2, "evaluate": 4, "merge": 3, "report": 1}
    if source == "fisher":
        expected["fisher"] = 3
    assert table.pop("total") == sum(expected.values())
    assert table == expected


def test_switching_the_source_retrains_and_reuses_only_the_data():
    """The saved Hessian is part of a training job's settings, so it enters the hash: no model trained without it
    is reused (and the models of adam and ivon differ too); the prepared data is shared."""
    plans = {source: _by_name(tiny(hessian=source)) for source in ("fisher", "adam", "ivon")}
    for name, job in plans["fisher"].items():
        if job.kind == "fisher":
            assert name not in plans["adam"]
            continue
        hashes = {plans[source][name].hash for source in plans}
        if job.kind == "prepare":
            assert len(hashes) == 1, name
        else:  # every model, and everything that reads one
            assert len(hashes) == 3, name


def test_a_pretrained_parent_still_gets_a_fisher_job():
    """hessian: adam: the children save their own Hessians; the parent, taken as it is, has no optimizer state: its
    H_0 is a Fisher job, with the fisher block's settings; base_hessian: prior still needs none."""
    jobs = _by_name(_pretrained_parent(hessian="adam"))
    assert jobs["models/parent"].kind == "pretrained"
    fishers = [j for j in jobs.values() if j.kind == "fisher"]
    assert [j.name for j in fishers] == ["fisher/parent"]
    assert fishers[0].inputs["data"] is jobs["data/original-train"]
    gm = jobs["merges/gradient_matching"]
    assert gm.inputs["parent_fisher"] is fishers[0] and gm.inputs["child_hessian/rot90"] is jobs["models/child-rot90"]
    prior = _by_name(_pretrained_parent(hessian="adam", merges=[
        {"method": "gradient_matching", "base_hessian": "prior"}, {"method": "task_arithmetic"}]))
    assert "fisher" not in {j.kind for j in prior.values()}
    assert prior["merges/gradient_matching"].params["base_hessian"] == "prior"


def test_merge_config_reads_a_saved_hessian_from_the_model_folder():
    from gradmatch.pipeline.jobs import JOB_IO, check_inputs, merge_config

    gm = _by_name(tiny(hessian="adam"))["merges/gradient_matching"]
    inputs = {role: f"/run/work/{job.hash}" for role, job in gm.inputs.items()}
    config = merge_config({**gm.params, "base_hessian_scale": 320, "hessian_scales": {"rot90": 160, "inverted": 120}},
                          inputs, 1.0)
    assert config["base_hessian"] == f"{inputs['parent_hessian']}/model/hessian"
    assert [m["hessian"] for m in config["models"]] == [f"{inputs['child_hessian/rot90']}/model/hessian",
                                                       f"{inputs['child_hessian/inverted']}/model/hessian"]
    assert config["models"][0]["model"] == f"{inputs['child/rot90']}/model"
    declared = [d.rstrip("?") for d in JOB_IO["merge"][0]]
    for role in gm.inputs:
        assert any(role.startswith(d[:-1]) if d.endswith("*") else role == d for d in declared), role
    with pytest.raises(UserError, match="has not finished"):
        check_inputs("merge", inputs)  # the roles are known; the folders do not exist


# --------------------------------------------------------------------------- the data-free Fisher


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory) -> Path:
    return make_tiny_lm(tmp_path_factory.mktemp("lm") / "lm", "gpt2", seed=3)


def _lm_experiment(lm: Path, data: Path, **changes) -> dict:
    exp = {"name": "lm", "model": str(lm),
           "parent": {"name": "general", "dataset": str(data), "finetune": False, "hessian_scale": 100},
           "children": [{"name": "negative", "dataset": str(data), "filter": {"label": 0}}],
           "training": {"per_device_train_batch_size": 4, "max_input_length": 32, "logging_strategy": "no"},
           "fisher": {"data": "generated", "examples": 6, "max_length": 12, "batch_size": 3},
           "merges": [{"method": "gradient_matching", "alphas": [-1.0]}], "multitask": False,
           "evaluation": {"batch_size": 8, "max_length": 32}}
    exp.update(changes)
    return exp


def test_generated_data_for_a_pretrained_causal_lm_parent(tiny_lm, tmp_path, capsys):
    exp = _lm_experiment(tiny_lm, tmp_path / "reviews", hessian="adam")
    jobs = _by_name(exp)
    fisher = jobs["fisher/parent"]
    assert list(fisher.inputs) == ["model"]  # no data set read
    assert fisher.params == {"data": "generated", "examples": 6, "batch_size": 3, "max_length": 12, "seed": 0}
    assert [j.name for j in jobs.values() if j.kind == "fisher"] == ["fisher/parent"]
    with_fisher = _by_name({**exp, "hessian": "fisher"})
    assert list(with_fisher["fisher/child-negative"].inputs) == ["model"]  # every Fisher job that remains
    more = _by_name({**exp, "fisher": {**exp["fisher"], "examples": 7}})
    assert more["fisher/parent"].hash != fisher.hash and more["models/child-negative"].hash == jobs[
        "models/child-negative"].hash
    from gradmatch.pipeline.preflight import JOB_SECONDS, _job_seconds

    assert _job_seconds(fisher, {}, {}) > JOB_SECONDS


def test_a_merge_may_take_its_h0_from_the_parents_own_samples(tiny_lm, tmp_path):
    """base_hessian: generated on one merge: a data-free Fisher job of the parent beside the Fisher on its data, and
    each merge reads its own H_0 (paired comparisons of the two in one run); with fisher.data generated they are
    one job."""
    split = {"estimator": "empirical", "max_examples": 8, "batch_size": 4, "max_length": 16, "examples": 6}
    exp = _lm_experiment(tiny_lm, tmp_path / "reviews", fisher=split, merges=[
        {"method": "gradient_matching", "alphas": [-1.0]},
        {"method": "gradient_matching", "name": "gm-generated", "alphas": [-1.0], "base_hessian": "generated"},
        {"method": "task_arithmetic", "alphas": [-1.0], "base_hessian": "generated"}])
    jobs = _by_name(exp)
    on_data, generated = jobs["fisher/parent"], jobs["fisher/parent-generated"]
    assert set(on_data.inputs) == {"model", "data"} and list(generated.inputs) == ["model"]
    assert generated.params == {"data": "generated", "examples": 6, "batch_size": 4, "max_length": 16, "seed": 0}
    assert jobs["merges/gradient_matching"].inputs["parent_fisher"] is on_data
    assert jobs["merges/gm-generated"].inputs["parent_fisher"] is generated
    assert "parent_fisher" not in jobs["merges/task_arithmetic"].inputs  # it reads no H_0 at all
    same = _by_name(_lm_experiment(tiny_lm, tmp_path / "reviews", merges=exp["merges"][:2]))  # fisher.data generated
    assert "fisher/parent-generated" not in same
    assert same["merges/gm-generated"].inputs["parent_fisher"] is same["fisher/parent"]
    with pytest.raises(UserError, match="base_hessian: generated samples sequences from a causal LM"):
        build_jobs(tiny(merges=[{"method": "gradient_matching", "base_hessian": "generated"}]))


def test_generated_data_with_a_classifier_parent_is_one_line_exit_2(tmp_path, capsys):
    exp = tiny(fisher={"data": "generated", "examples": 8})
    with pytest.raises(UserError, match="fisher.data: generated samples sequences from a causal LM"):
        build_jobs(exp)
    path = write_experiment(tmp_path / "bad.yaml", exp)
    assert main(["run", str(path), "--workdir", str(tmp_path / "run"), "--dry-run"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gradmatch: error: fisher.data: generated"), lines
    assert "image-classification" in lines[0] and not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("change, words", [
    ({"hessian": "sgd"}, "hessian"),
    ({"hessian": "adam", "training": {**TINY["training"], "optimizer_name": "IVON"}},
     "training.optimizer_name: IVON does not hold the Hessian estimate hessian: adam reads"),
    ({"hessian": "ivon", "children": [{**TINY["children"][0], "training": {"optim": "adamw"}}, TINY["children"][1]]},
     "rot90.training.optimizer_name: adamw does not hold"),
    ({"hessian": "adam", "multitask": {"training": {"lora": {"r": 4}}}}, "multitask.training.lora: hessian: adam"),
    ({"training": {**TINY["training"], "save_hessian": "adam"}}, "save_hessian is set by the pipeline"),
    ({"hessian": "adam", "training": {**TINY["training"], "ivon": {"hess_init": 0.1}}}, "needs optimizer_name IVON"),
    ({"fisher": {"data": "generated", "estimator": "empirical"}}, "estimator empirical does not apply"),
    ({"fisher": {"data": "disk"}}, "fisher.data"),
])
def test_bad_sources_are_refused_in_one_line_exit_2(tmp_path, capsys, change, words):
    with pytest.raises(UserError, match=words):
        load_experiment(tiny(**change))
    path = write_experiment(tmp_path / "bad.yaml", tiny(**change))
    assert main(["run", str(path), "--workdir", str(tmp_path / "run"), "--dry-run"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gradmatch: error: "), lines
    assert not (tmp_path / "run").exists()


def test_ivon_settings_pass_through_to_every_trained_model():
    jobs = _by_name(tiny(hessian="ivon", training={**TINY["training"], "ivon": {"hess_init": 0.1}}))
    assert all(j.params["training"]["ivon"] == {"hess_init": 0.1} for j in jobs.values() if j.kind == "train")


# --------------------------------------------------------------------------- merge.json and the report


def test_merge_json_names_the_estimator_of_every_hessian(tmp_path):
    import gradmatch
    from test_merge import build_family, gm_config

    fam = build_family(tmp_path / "family")
    (fam["hessians"][1] / "fisher.json").write_text(json.dumps({"estimator": "adam", "num_examples": 40}))
    record = json.loads((gradmatch.merge(gm_config(fam), tmp_path / "gm", progress=False) / "merge.json").read_text())
    assert record["base_hessian_estimator"] == "sampled"  # fisher-parent/hessian/fisher.json
    assert [m["hessian_estimator"] for m in record["models"]] == [None, "adam", None]  # None: no fisher.json
    prior = gm_config(fam, base_hessian="prior")
    record = json.loads((gradmatch.merge(prior, tmp_path / "prior", progress=False) / "merge.json").read_text())
    assert record["base_hessian_estimator"] == "prior"
    ta = {k: v for k, v in gm_config(fam, method="task_arithmetic", parameters={}).items() if k != "base_hessian"}
    record = json.loads((gradmatch.merge(ta, tmp_path / "ta", progress=False) / "merge.json").read_text())
    assert record["base_hessian_estimator"] is None and all(m["hessian_estimator"] is None for m in record["models"])

    from gradmatch.pipeline.jobs import _hessians_read

    gm = json.loads((tmp_path / "gm" / "merge.json").read_text())
    assert _hessians_read(gm, ["a", "b", "c"]) == {"parent": "sampled", "children": {"a": None, "b": "adam", "c": None}}
    assert _hessians_read(record, ["a", "b", "c"]) == {}


def _merge_metrics(folder: Path, label: str, hessians: dict | None) -> str:
    folder.mkdir(parents=True)
    point = {"alpha": 1.0, "tasks": {"a": {"accuracy": 0.5}}, "generation": None, "statistics": {}}
    metrics = {"label": label, "kind": "merge", "method": label, "parameters": {}, "alphas": [point]}
    if hessians is not None:
        metrics["hessians"] = hessians
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return str(folder)


def test_the_report_names_the_estimators(tmp_path):
    from gradmatch.pipeline.report import _text, collect

    entries = [{"key": f"merge/{label}", "label": label, "kind": "merge", "seed": 0}
               for label in ("gm", "gm-prior", "ta", "old")]
    inputs = {"merge/gm": _merge_metrics(tmp_path / "gm", "gm", {"parent": "generated",
                                                                 "children": {"x": "adam", "y": "adam"}}),
              "merge/gm-prior": _merge_metrics(tmp_path / "gmp", "gm-prior", {"parent": "prior",
                                                                             "children": {"x": "adam", "y": "adam"}}),
              "merge/ta": _merge_metrics(tmp_path / "ta", "ta", {}),
              "merge/old": _merge_metrics(tmp_path / "old", "old", None)}  # a run from before the record
    results = collect({"tasks": ["a"], "entries": entries}, inputs)
    assert results["hessian_estimators"] == {"parent": ["generated", "prior"], "children": ["adam"]}
    assert set(results["hessians"]) == {"gm", "gm-prior"}
    line = next(line for line in _text(results).splitlines() if line.startswith("Hessians read by the merges"))
    assert "the parent's (H_0) from `generated`" in line and "in gm," in line and "`prior`" in line
    assert "in gm-prior" in line and "the children's from `adam` (AdamW's second moment, saved in training)." in line
    none = collect({"tasks": ["a"], "entries": entries[2:]}, {k: inputs[k] for k in ("merge/ta", "merge/old")})
    assert none["hessian_estimators"] == {} and "Hessians read" not in _text(none)
    unrecorded = collect({"tasks": ["a"], "entries": entries[:1]},
                         {"merge/gm": _merge_metrics(tmp_path / "u", "gm", {"parent": None, "children": {"x": None}})})
    assert unrecorded["hessian_estimators"] == {"parent": ["unrecorded"], "children": ["unrecorded"]}


# --------------------------------------------------------------------------- the jobs themselves


def test_a_generated_fisher_job_calls_the_data_free_estimator(tiny_lm, tmp_path):
    try:
        from gradmatch.fisher.generated import run_generated_fisher  # noqa: F401
    except ImportError:
        pytest.skip("gradmatch.fisher.generated (the data-free Fisher) has not landed yet")
    from gradmatch.pipeline.jobs import fisher

    model = tmp_path / "pretrained"
    shutil.copytree(tiny_lm, model / "model")
    fisher({"data": "generated", "examples": 4, "batch_size": 2, "max_length": 6, "seed": 0}, {"model": str(model)},
           tmp_path / "out")
    record = json.loads((tmp_path / "out" / "fisher" / "hessian" / "fisher.json").read_text())
    assert record["estimator"] == "generated" and record["num_examples"] == 4


def _train_supports(source: str) -> bool:
    """Whether `gradmatch train` writes the Hessian of ``source`` (the training side lands separately)."""
    import gradmatch.train

    code = inspect.getsource(gradmatch.train)
    return "save_hessian" in code and (source != "ivon" or "ivon" in code.lower())


@pytest.mark.slow
@pytest.mark.parametrize("source", ["adam", "ivon"])
def test_a_tiny_run_with_a_saved_hessian_end_to_end(tmp_path, source):
    """One child, gradient matching and task arithmetic at one α, no multitask: 10 jobs, none of them a Fisher
    (34 s with adam on the 2-core machine); the merge reads the Hessians that training saved, and merge.json and
    the report say so."""
    if not _train_supports(source):
        pytest.skip(f"gradmatch train does not write save_hessian {source}'s model/hessian/ yet")
    exp = tiny(hessian=source, children=[TINY["children"][0]], multitask=False,
               merges=[{"method": "gradient_matching", "alphas": [1.0], "parameters": {"delta_0": 1.0e-12},
                        "keep_models": True}, {"method": "task_arithmetic", "alphas": [1.0]}])
    exp["parent"] = {**exp["parent"], "training": {"num_train_epochs": 6, "learning_rate": 3.0e-3}}
    path = write_experiment(tmp_path / "exp.yaml", exp)
    started = time.time()
    proc = subprocess.run([sys.executable, "-m", "gradmatch", "run", str(path), "--workdir", str(tmp_path / "run"),
                           "--cores", "2"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    print(f"tiny hessian: {source} run: {time.time() - started:.0f} s")
    run = tmp_path / "run"
    assert not list((run / "work").glob("fisher-*"))
    for model in ("parent", "child-rot90"):
        record = json.loads((run / "models" / model / "hessian" / "fisher.json").read_text())
        assert record["estimator"] == source
    merged = json.loads((run / "merges" / "gradient_matching" / "models" / "alpha-1" / "merge.json").read_text())
    assert merged["base_hessian_estimator"] == source and merged["models"][0]["hessian_estimator"] == source
    assert merged["base_hessian"].endswith("/model/hessian")
    report = json.loads((run / "report" / "report.json").read_text())
    assert report["hessian_estimators"] == {"parent": [source], "children": [source]}
    text = (run / "report" / "report.md").read_text()
    assert f"Hessians read by the merges: the parent's (H_0) from `{source}`" in text
    rows = {r["label"]: r for r in report_rows(run)}
    assert set(rows) == {"parent", "child-rot90", "gradient_matching α=1", "task_arithmetic α=1"}
    assert all(0 <= v <= 1 for row in rows.values() for v in row["values"].values())


def test_ivon_without_its_package_is_refused_before_any_job(tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ivon" else real(name, *a))
    path = write_experiment(tmp_path / "ivon.yaml", tiny(hessian="ivon"))
    assert main(["run", str(path), "--workdir", str(tmp_path / "run"), "--dry-run"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["gradmatch: error: models/parent: optimizer_name IVON needs the ivon-opt package "
                     "(pip install ivon-opt)"]
