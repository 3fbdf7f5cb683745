"""The pipeline with causal LMs: a pretrained parent taken as it is, a child on filtered data, an attribute
classifier trained in the run, removal merges with negative α, generations scored, the trade-off report."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import LM_CORPUS, make_tiny_bert, make_tiny_lm, write_jsonl
from gradmatch.config.experiment import load_experiment
from gradmatch.errors import UserError
from gradmatch.pipeline.graph import build_jobs


@pytest.fixture(scope="module")
def lm_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmworld")
    reviews = root / "reviews"
    rows = [{"text": t, "label": y} for t, y in LM_CORPUS]
    write_jsonl(reviews / "train.jsonl", rows * 3)
    write_jsonl(reviews / "test.jsonl", rows)
    return {"root": root, "data": reviews, "lm": make_tiny_lm(root / "lm", "gpt2", seed=3),
            "bert": make_tiny_bert(root / "bert", seed=4)}


def removal_experiment(world, **changes) -> dict:
    exp = {
        "name": "tiny-removal", "seed": 0, "model": str(world["lm"]),
        "parent": {"name": "general", "dataset": str(world["data"]), "train_size": 16, "finetune": False,
                   "hessian_scale": 100},
        "children": [{"name": "negative", "dataset": str(world["data"]), "filter": {"label": 0},
                      "training": {"num_train_epochs": 2, "learning_rate": 5.0e-3}}],
        "attribute_classifier": {"model": str(world["bert"]), "dataset": str(world["data"]),
                                 "training": {"num_train_epochs": 2, "learning_rate": 1.0e-3}},
        "training": {"per_device_train_batch_size": 4, "max_input_length": 32, "logging_strategy": "no"},
        "fisher": {"estimator": "empirical", "max_examples": 8, "batch_size": 4, "max_length": 32},
        "merges": [{"method": "task_arithmetic", "alphas": [-0.5, -1.0]},
                   {"method": "gradient_matching", "alphas": [-0.5, -1.0]}],
        "multitask": False,
        "evaluation": {"batch_size": 8, "max_length": 32,
                       "generation": {"prompts": ["the movie", "a film about"], "num_samples": 2,
                                      "max_new_tokens": 5, "seed": 1}},
        "resources": {"default": {"threads": 1, "mem_mb": 1000, "runtime": 15}},
    }
    exp.update(changes)
    return exp


def test_graph_of_a_removal_experiment(lm_world):
    jobs = build_jobs(removal_experiment(lm_world))
    by_name = {j.name: j for j in jobs}
    parent = by_name["models/parent"]
    assert parent.kind == "pretrained" and not parent.inputs
    assert by_name["models/attribute-classifier"].kind == "train"
    merge = by_name["merges/gradient_matching"]
    assert merge.params["base_hessian_scale"] == 100 and merge.params["alphas"] == [-0.5, -1.0]
    assert merge.inputs["classifier"] is by_name["models/attribute-classifier"]
    assert by_name["eval/parent"].inputs["classifier"] is by_name["models/attribute-classifier"]
    assert by_name["eval/attribute-classifier"].params["tasks"] == ["attribute-classifier"]
    report = by_name["report"]
    assert report.params["metric"] == "perplexity" and report.params["fluency_task"] == "general"


@pytest.mark.parametrize("change, words", [
    ({"parent": {"name": "general", "dataset": "x", "finetune": False}}, "set parent.hessian_scale"),
    ({"children": [{"name": "negative", "dataset": "x", "finetune": False}]}, "parent only"),
    ({"evaluation": {"fluency_task": "nope", "generation": {"prompts": ["a"]}}}, "not a task"),
    ({"evaluation": {}}, "add evaluation.generation"),
    ({"merges": [{"method": "average", "alphas": [-1.0]}]}, "positive weights"),
    ({"merges": [{"method": "task_arithmetic", "alphas": [float("nan")]}]}, "finite"),
    ({"training": {"learning_rat": 0.1}}, "unknown key"),
])
def test_bad_removal_experiments_are_refused_when_read(lm_world, change, words):
    with pytest.raises(UserError, match=words):
        load_experiment(removal_experiment(lm_world, **change))


def test_generation_for_a_classifier_run_is_refused(lm_world):
    exp = removal_experiment(lm_world, model=str(lm_world["bert"]))
    with pytest.raises(UserError, match="does not generate text"):
        build_jobs(exp)


@pytest.mark.slow
def test_a_tiny_removal_experiment_runs_end_to_end(lm_world, tmp_path):
    import yaml

    path = tmp_path / "removal.yaml"
    path.write_text(yaml.safe_dump(removal_experiment(lm_world)))
    workdir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "gradmatch", "run", str(path), "--workdir", str(workdir),
                           "--cores", "2"], capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((workdir / "report" / "report.json").read_text())
    rows = {r["label"]: r for r in report["rows"]}
    assert set(rows) == {"parent", "child-negative", "task_arithmetic α=-0.5", "task_arithmetic α=-1",
                         "gradient_matching α=-0.5", "gradient_matching α=-1"}
    for row in rows.values():
        assert row["values"]["general"] > 1 and row["values"]["negative"] > 1  # perplexities
        g = row["generation"]
        assert g["num_generations"] == 4 and 0 <= g["unwanted_rate"] <= 1 and g["unwanted_rate_se"] >= 0
    assert rows["child-negative"]["values"]["negative"] < rows["parent"]["values"]["negative"]
    assert "guarded_entries" in rows["gradient_matching α=-1"]["statistics"]
    assert report["classifier"]["label"] == "attribute-classifier" and "accuracy" in report["classifier"]
    # paired at each α, never "each at its best α": by fluency that is the α that removes least
    assert {p["what"] for p in report["paired"]} == {"α = -1", "α = -0.5"}
    text = (workdir / "report" / "report.md").read_text()
    assert "Removal: unwanted attribute against fluency" in text and "![unwanted rate against perplexity]" in text
    assert (workdir / "report" / "tradeoff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    generations = workdir / "merges" / "task_arithmetic" / "eval" / "alpha--1" / "generations.jsonl"
    assert len(generations.read_text().splitlines()) == 4
