"""lm-evaluation-harness tasks in the experiment pipeline: a task's `lm_eval` (judged on that task's prepared test
rows, its model trained on the task's prompt template), shared tasks under `evaluation.lm_eval`, the checks when an
experiment is read and before a run, and the report that uses the harness's accuracy as the run's metric."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from conftest import LM_CORPUS, make_tiny_bert, make_tiny_lm, write_jsonl
from gradmatch.cli import main
from gradmatch.config.experiment import load_experiment
from gradmatch.errors import UserError
from gradmatch.pipeline import preflight
from gradmatch.pipeline.graph import build_jobs
from gradmatch.pipeline.report import collect, markdown_table, write_report


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny Llama, two review sets of both polarities (local folders) and a data root holding imdb's test rows
    (the packaged task sentiment_imdb reads <root>/imdb/test.jsonl)."""
    root = tmp_path_factory.mktemp("lmeval")
    rows = [{"text": t, "label": y} for t, y in LM_CORPUS]
    for name in ("films", "shows"):
        write_jsonl(root / name / "train.jsonl", rows * 2)
        write_jsonl(root / name / "test.jsonl", rows)
    write_jsonl(root / "data-root" / "imdb" / "test.jsonl", rows[:6])
    return {"root": root, "films": root / "films", "shows": root / "shows", "data_root": root / "data-root",
            "lm": make_tiny_lm(root / "llama", "llama", seed=3), "bert": make_tiny_bert(root / "bert", seed=4)}


def lm_experiment(world, **changes) -> dict:
    exp = {
        "name": "tiny-lm-eval", "seed": 0, "model": str(world["lm"]),
        "parent": {"name": "general", "dataset": str(world["films"]), "train_size": 8, "finetune": False,
                   "hessian_scale": 100},
        "children": [
            {"name": "films", "dataset": str(world["films"]), "lm_eval": "sentiment_sst2"},
            {"name": "shows", "dataset": str(world["shows"]), "lm_eval": "sentiment_rotten_tomatoes"},
        ],
        "training": {"per_device_train_batch_size": 8, "max_input_length": 48, "num_train_epochs": 2,
                     "learning_rate": 5.0e-3, "logging_strategy": "no"},
        "fisher": {"estimator": "empirical", "max_examples": 8, "batch_size": 4, "max_length": 32},
        "merges": [{"method": "task_arithmetic", "alphas": [0.5, 1.0]},
                   {"method": "gradient_matching", "alphas": [0.5, 1.0]}],
        "multitask": False,
        "evaluation": {"batch_size": 8, "max_length": 48, "lm_eval": {"tasks": ["sentiment_imdb"], "batch_size": 8}},
        "resources": {"default": {"threads": 1, "mem_mb": 1000, "runtime": 15}},
    }
    exp.update(changes)
    return exp


def _child(world, **changes) -> dict:
    return {"name": "films", "dataset": str(world["films"]), "lm_eval": "sentiment_sst2", **changes}


# --------------------------------------------------------------------------- the experiment file


BAD = [
    (lambda w: {"training": {"prompt": {"task": "sentiment_sst2"}}}, "prompt is set by the pipeline"),
    (lambda w: {"children": [_child(w, training={"prompt": {"task": "x"}})]}, "prompt is set by the pipeline"),
    (lambda w: {"children": [_child(w, lm_eval="sentiment sst2")]}, "not an lm-eval task name"),
    (lambda w: {"children": [_child(w), _child(w, name="shows")]}, "already judges task films"),
    (lambda w: {"evaluation": {"lm_eval": {"tasks": ["sentiment_sst2"]}}}, "is task films's lm_eval"),
    (lambda w: {"evaluation": {"lm_eval": {"tasks": ["sentiment_imdb", "sentiment_imdb"]}}}, "must not repeat"),
    (lambda w: {"multitask": True}, "a multitask model would need one template per row"),
    (lambda w: {"multitask": {"enabled": True}}, "set multitask: false"),
    (lambda w: {"children": [{"name": "films", "dataset": "x"}], "parent": {"name": "general", "dataset": "x"},
                "multitask": False, "evaluation": {"lm_eval": {"batch_size": 4}}}, "names no lm-eval task"),
    (lambda w: {"evaluation": {"lm_eval": {"tasks": ["sentiment_imdb"], "num_fewshot": -1}}}, "num_fewshot"),
    (lambda w: {"evaluation": {"lm_eval": {"tasks": ["sentiment_imdb"], "tasks_": 1}}}, "tasks_"),
]


@pytest.mark.parametrize("index", range(len(BAD)))
def test_bad_lm_eval_experiments_are_refused_in_one_line(world, index):
    change, words = BAD[index]
    exp = lm_experiment(world, **change(world))
    with pytest.raises(UserError, match=words) as caught:
        load_experiment(exp)
    assert "\n" not in str(caught.value)


def test_multitask_left_at_its_default_is_refused_too(world):
    exp = lm_experiment(world)
    del exp["multitask"]
    with pytest.raises(UserError, match=r"children name lm_eval tasks \(films: sentiment_sst2, shows: "
                                         r"sentiment_rotten_tomatoes\).*set multitask: false"):
        load_experiment(exp)


def test_a_parent_task_may_name_an_lm_eval_task_beside_multitask(world):
    """The multitask model trains on the children's rows only: a parent's lm_eval does not stop it."""
    children = [{"name": "films", "dataset": str(world["films"])}, {"name": "shows", "dataset": str(world["shows"])}]
    exp = lm_experiment(world, children=children, multitask=True,
                        parent={"name": "general", "dataset": str(world["films"]), "lm_eval": "sentiment_sst2"})
    jobs = {j.name: j for j in build_jobs(exp, data_dir=world["data_root"])}
    assert jobs["models/parent"].params["training"]["prompt"] == {"task": "sentiment_sst2", "include_path": None}
    assert "prompt" not in jobs["models/multitask"].params["training"]
    assert "prompt" not in jobs["models/child-films"].params["training"]


def test_lm_eval_in_a_classifier_run_is_refused(world):
    exp = lm_experiment(world, model=str(world["bert"]))
    with pytest.raises(UserError, match=r"films.lm_eval: lm-eval tasks judge causal LMs, and .* is a "
                                        r"text-classification model"):
        build_jobs(exp)
    shared_only = lm_experiment(world, model=str(world["bert"]),
                                children=[{"name": "films", "dataset": str(world["films"])}])
    with pytest.raises(UserError, match="evaluation.lm_eval: lm-eval tasks judge causal LMs"):
        build_jobs(shared_only)


# --------------------------------------------------------------------------- the job graph


def test_graph_trains_on_the_template_and_judges_every_model(world, tmp_path):
    include = tmp_path / "tasks"
    include.mkdir()
    exp = lm_experiment(world)
    exp["evaluation"]["lm_eval"].update(include_path=str(include), limit=5, num_fewshot=None)
    jobs = {j.name: j for j in build_jobs(exp, data_dir=world["data_root"])}
    for name, task in (("films", "sentiment_sst2"), ("shows", "sentiment_rotten_tomatoes")):
        training = jobs[f"models/child-{name}"].params["training"]
        assert training["prompt"] == {"task": task, "include_path": str(include.resolve())}
    assert jobs["models/parent"].kind == "pretrained"  # not trained: no template
    wanted = {"tasks": {"films": "sentiment_sst2", "shows": "sentiment_rotten_tomatoes"}, "shared": ["sentiment_imdb"],
              "include_path": str(include.resolve()), "data_root": str(world["data_root"].resolve()),
              "num_fewshot": None, "batch_size": 8, "limit": 5}
    judged = [j for j in jobs.values() if j.kind in ("evaluate", "merge")]
    assert {j.name for j in judged} == {"eval/parent", "eval/child-films", "eval/child-shows",
                                        "merges/task_arithmetic", "merges/gradient_matching"}
    for job in judged:
        assert job.params["lm_eval"] == wanted, job.name
        assert set(job.params["tasks"]) == {"general", "films", "shows"}  # perplexity on every test split, as before
        assert {f"test/{t}" for t in ("general", "films", "shows")} <= set(job.inputs)
    report = jobs["report"].params
    assert report["metric"] == "accuracy" and report["higher_is_better"] is True
    assert report["lm_eval"] == {"tasks": wanted["tasks"], "shared": ["sentiment_imdb"]}


def test_shared_tasks_alone_keep_perplexity_as_the_metric(world):
    exp = lm_experiment(world, children=[{"name": "films", "dataset": str(world["films"])}])
    jobs = {j.name: j for j in build_jobs(exp, data_dir=world["data_root"])}
    assert "prompt" not in jobs["models/child-films"].params["training"]
    assert jobs["eval/child-films"].params["lm_eval"]["tasks"] == {}
    assert jobs["report"].params["metric"] == "perplexity"


def test_without_lm_eval_nothing_changes(world):
    """No lm_eval anywhere: no job gains a key, so the run folders of earlier versions keep their hashes."""
    exp = lm_experiment(world, children=[{"name": "films", "dataset": str(world["films"])}], evaluation={})
    for job in build_jobs(exp):
        assert "lm_eval" not in job.params and "prompt" not in job.params.get("training", {}), job.name


# --------------------------------------------------------------------------- checks before a run (dry run)


def _dry_run(world, tmp_path, exp, data_root=True):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(exp))
    args = ["run", str(path), "--workdir", str(tmp_path / "run"), "--dry-run"]
    return main(args + (["--data-dir", str(world["data_root"])] if data_root else []))


def test_dry_run_checks_the_lm_eval_tasks_offline(world, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("GRADMATCH_DATA_DIR", raising=False)
    assert _dry_run(world, tmp_path, lm_experiment(world)) == 0
    assert "evaluate" in capsys.readouterr().out
    assert not (tmp_path / "run").exists()

    # the shared task reads the data root; each task's own reads its prepared test rows (no data root needed)
    assert _dry_run(world, tmp_path, lm_experiment(world), data_root=False) == 2
    err = capsys.readouterr().err.strip()
    assert "sentiment_imdb reads its documents from the data root" in err and len(err.splitlines()) == 1
    own_only = lm_experiment(world, evaluation={"batch_size": 8, "max_length": 48})
    assert preflight.check_inputs(build_jobs(own_only), lambda job: False) == []

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "mine.yaml").write_text("task: mine\ndoc_to_text: [unclosed\n")
    exp = lm_experiment(world)
    exp["evaluation"]["lm_eval"]["include_path"] = str(broken)
    assert _dry_run(world, tmp_path, exp) == 2
    err = capsys.readouterr().err.strip()
    assert "mine.yaml does not parse" in err and len(err.splitlines()) == 1


@pytest.mark.slow  # an unknown name makes the harness index its own ~15,000 tasks (about 10 s)
def test_dry_run_refuses_an_unknown_lm_eval_task(world, tmp_path, capsys):
    bad = lm_experiment(world, children=[_child(world, lm_eval="sentiment_sst3")])
    assert _dry_run(world, tmp_path, bad) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown task 'sentiment_sst3'" in err and "did you mean sentiment_sst2" in err
    assert err.startswith("gradmatch: error: eval/parent: lm_eval:") and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- the report


def _scores(**accuracies) -> dict:
    return {"tasks": {name: {"acc": acc, "acc_stderr": 0.05, "num_documents": 12, "primary": "acc"}
                      for name, acc in accuracies.items()}, "num_fewshot": 0, "limit": None}


def _evaluation(films: float, shows: float, imdb: float, ppl: float = 20.0) -> dict:
    return {"tasks": {t: {"perplexity": ppl + i, "num_tokens": 100} for i, t in enumerate(("general", "films", "shows"))},
            "lm_eval": _scores(sentiment_sst2=films, sentiment_rotten_tomatoes=shows, sentiment_imdb=imdb)}


def _report_inputs(tmp_path, seeds=(0,), shift=0.0):
    lm = {"tasks": {"films": "sentiment_sst2", "shows": "sentiment_rotten_tomatoes"}, "shared": ["sentiment_imdb"]}
    inputs, entries = {}, []

    def put(key, value, seed):
        folder = tmp_path / f"{key.replace('/', '-')}-{seed}"
        folder.mkdir()
        (folder / "metrics.json").write_text(json.dumps(value))
        inputs[f"{key}@{seed}"] = str(folder)
        entries.append({"key": f"{key}@{seed}", "label": key.split("/", 1)[1], "kind": key.split("/", 1)[0],
                        "seed": seed})

    for seed in seeds:
        d = shift * seed
        put("model/parent", {"kind": "model", **_evaluation(0.5, 0.5, 0.5, 30.0)}, seed)
        put("model/child-films", {"kind": "model", **_evaluation(0.9 - d, 0.6, 0.7)}, seed)
        put("merge/gradient_matching", {"kind": "merge", "alphas": [
            {"alpha": 0.5, **_evaluation(0.8, 0.7 + d, 0.6)}, {"alpha": 1.0, **_evaluation(0.85, 0.75, 0.65)}]}, seed)
        put("merge/task_arithmetic", {"kind": "merge", "alphas": [
            {"alpha": 0.5, **_evaluation(0.7, 0.7, 0.6)}, {"alpha": 1.0, **_evaluation(0.4, 0.3 + d, 0.2, 900.0)}]}, seed)
    params = {"experiment": "toy", "tasks": ["general", "films", "shows"], "entries": entries, "seeds": list(seeds),
              "metric": "accuracy", "higher_is_better": True, "fluency_task": "general", "lm_eval": lm}
    return params, inputs


def test_report_of_one_seed_uses_the_harness_accuracy_with_its_standard_error(tmp_path):
    params, inputs = _report_inputs(tmp_path)
    results = collect(params, inputs)
    assert results["tasks"] == ["films", "shows"] and results["perplexity_tasks"] == ["general", "films", "shows"]
    rows = {r["label"]: r for r in results["rows"]}
    gm = rows["gradient_matching α=1"]
    assert gm["values"] == {"films": 0.85, "shows": 0.75} and gm["average"] == pytest.approx(0.8)
    assert gm["shared"] == {"sentiment_imdb": 0.65} and gm["stderr"] == {"films": 0.05, "shows": 0.05}
    assert gm["average_stderr"] == pytest.approx((2 * 0.05 ** 2) ** 0.5 / 2)
    assert gm["perplexity"] == {"general": 20.0, "films": 21.0, "shows": 22.0}
    assert results["best"]["gradient_matching"]["alpha"] == 1.0 and results["best"]["task_arithmetic"]["alpha"] == 0.5
    assert results["lm_eval"]["primary"] == {"sentiment_sst2": "acc", "sentiment_rotten_tomatoes": "acc",
                                             "sentiment_imdb": "acc"}
    paired = {p["what"]: p for p in results["paired"]}
    assert paired["α = 1"]["mean"] == pytest.approx(0.8 - 0.35) and paired["α = 1"]["ci95"] is None
    table = markdown_table(results).splitlines()
    assert table[0] == "| model | films | shows | average | sentiment_imdb |"
    assert "| **gradient_matching α=1** | 85.0 ± 5.0 | 75.0 ± 5.0 | **80.0 ± 3.5** | 65.0 ± 5.0 |" in table
    out = tmp_path / "report"
    out.mkdir()
    write_report(results, out)
    text = (out / "report.md").read_text()
    assert "# toy: lm-eval accuracy (%) of every model on every task" in text
    assert "films: `sentiment_sst2` (acc)" in text and "not in the average" in text
    assert "± is the harness's standard error" in text
    assert "## Perplexity on each task's test split" in text and "| task_arithmetic α=1 | 900 | 901 | 902 |" in text
    assert json.loads((out / "report.json").read_text())["rows"][0]["shared_stderr"] == {"sentiment_imdb": 0.05}


def test_report_of_several_seeds_gives_sd_not_standard_errors(tmp_path):
    params, inputs = _report_inputs(tmp_path, seeds=(0, 1, 2), shift=0.1)
    results = collect(params, inputs)
    rows = {r["label"]: r for r in results["rows"]}
    child = rows["child-films"]
    assert child["values"]["films"] == pytest.approx(0.8) and child["sd"]["films"] == pytest.approx(0.1)
    assert child["stderr"]["films"] == pytest.approx(0.05)  # kept in report.json
    assert rows["task_arithmetic α=1"]["shared_sd"]["sentiment_imdb"] == pytest.approx(0.0)
    paired = {p["what"]: p for p in results["paired"]}
    # GM α=1 (0.8 every seed) − TA α=1 ((0.4 + 0.3 + 0.1·seed) / 2)
    assert paired["α = 1"]["per_seed"] == pytest.approx({"0": 0.45, "1": 0.4, "2": 0.35})
    table = markdown_table(results)
    assert "| child-films | 80.0 ± 10.0 | 60.0 ± 0.0 | 70.0 ± 5.0 | 70.0 ± 0.0 |" in table
    out = tmp_path / "report"
    out.mkdir()
    write_report(results, out)
    assert "standard error" not in (out / "report.md").read_text().split("## Perplexity")[0]


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_a_tiny_lm_eval_experiment_runs_end_to_end(world, tmp_path):
    """A tiny Llama: two children trained on their task's template, merges at two α, every model judged by both
    tasks' lm-eval tasks on their prepared rows and by the shared sentiment_imdb, in one harness call each."""
    from gradmatch.harness import evaluate_tasks

    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(lm_experiment(world)))
    workdir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "gradmatch", "run", str(path), "--workdir", str(workdir),
                           "--cores", "2", "--data-dir", str(world["data_root"])], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((workdir / "report" / "report.json").read_text())
    assert report["metric"] == "accuracy" and report["tasks"] == ["films", "shows"]
    rows = {r["label"]: r for r in report["rows"]}
    assert set(rows) == {"parent", "child-films", "child-shows", "task_arithmetic α=0.5", "task_arithmetic α=1",
                         "gradient_matching α=0.5", "gradient_matching α=1"}
    for row in rows.values():
        assert set(row["values"]) == {"films", "shows"} and all(0 <= v <= 1 for v in row["values"].values())
        assert set(row["stderr"]) == {"films", "shows"} and set(row["shared"]) == {"sentiment_imdb"}
        assert set(row["perplexity"]) == {"general", "films", "shows"} and min(row["perplexity"].values()) > 1
    metrics = json.loads((workdir / "eval" / "child-films" / "metrics.json").read_text())
    scores = metrics["lm_eval"]["tasks"]
    # each task's own lm-eval task read that task's 12 test rows; the shared one the data root's 6
    assert {n: s["num_documents"] for n, s in scores.items()} == {
        "sentiment_sst2": 12, "sentiment_rotten_tomatoes": 12, "sentiment_imdb": 6}
    assert not list(workdir.glob("work/*/.lm_eval-documents"))
    trained = json.loads((workdir / "models" / "child-films" / ".." / "job.json").read_text())
    assert trained["params"]["training"]["prompt"] == {"task": "sentiment_sst2", "include_path": None}
    # the same number as the harness gives on the same model and rows, called directly
    documents = tmp_path / "films-test.jsonl"
    write_jsonl(documents, [{"text": t, "label": y} for t, y in LM_CORPUS])
    direct = evaluate_tasks(str(workdir / "models" / "child-films"), ["sentiment_sst2"],
                            data_files={"sentiment_sst2": str(documents)}, batch_size=8, progress=False)
    assert rows["child-films"]["values"]["films"] == pytest.approx(direct["tasks"]["sentiment_sst2"]["acc"], abs=1e-9)
    merged = json.loads((workdir / "merges" / "gradient_matching" / "metrics.json").read_text())
    assert [set(p["lm_eval"]["tasks"]) for p in merged["alphas"]] == [set(scores)] * 2
    assert {p["what"] for p in report["paired"]} >= {"α = 0.5", "α = 1"}
    text = (workdir / "report" / "report.md").read_text()
    assert "± is the harness's standard error" in text and "## Perplexity on each task's test split" in text
