"""lm-evaluation-harness tasks in `gradmatch evaluate`: the numbers equal the `lm_eval` command line's on the same
model and tasks; the packaged sentiment tasks read the data root; bad input is one line and nothing written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_tiny_lm, write_jsonl
from gradmatch import UserError
from gradmatch.evaluate import evaluate
from gradmatch.harness import DATA_ROOT_TOKEN, PACKAGED_DIR

pytestmark = pytest.mark.slow

REVIEWS = [("a wonderful , moving film", 1), ("dull and far too long", 0), ("the best cast of the year", 1),
           ("i want my money back", 0), ("a delight from start to finish", 1), ("painful dialogue , silly ending", 0),
           ("an instant classic", 1), ("the worst film i have seen", 0), ("beautiful music and a great story", 1),
           ("boring , slow and empty", 0), ("funny and warm", 1)]

#: A task of the user's own (three choices, its own template and data file) beside the packaged ones.
CUSTOM_TASK = """task: mood3
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
doc_to_text: "Text: {{{{text}}}}\\nMood:"
doc_to_choice: ["sad", "calm", "happy"]
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmeval")
    model = make_tiny_lm(root / "lm", family="llama")
    data = root / "data"
    write_jsonl(data / "sst2" / "test.jsonl", [{"text": t, "label": y} for t, y in REVIEWS])
    write_jsonl(data / "imdb" / "test.jsonl", [{"text": t + " " + t, "label": y} for t, y in REVIEWS[:7]])
    other = write_jsonl(root / "other.jsonl", [{"text": t.upper(), "label": 1 - y} for t, y in REVIEWS[3:]])
    include = root / "include"
    include.mkdir()
    mood = write_jsonl(root / "mood.jsonl", [{"text": t, "label": i % 3} for i, (t, _) in enumerate(REVIEWS)])
    (include / "mood3.yaml").write_text(CUSTOM_TASK.format(data=mood), encoding="utf-8")
    return {"root": root, "model": model, "data": data, "other": other, "include": include}


def command_line(setup, tasks: list[str], out: Path, sst2_file: Path | None = None) -> dict:
    """The harness's own command line on a folder of the packaged YAMLs with the data root written in by hand."""
    rendered = out / "tasks"
    rendered.mkdir(parents=True)
    for path in PACKAGED_DIR.glob("*.yaml"):
        (rendered / path.name).write_text(path.read_text().replace(DATA_ROOT_TOKEN, str(setup["data"])))
    if sst2_file is not None:
        text = (rendered / "sentiment_sst2.yaml").read_text()
        (rendered / "sentiment_sst2.yaml").write_text(text.replace(str(setup["data"] / "sst2" / "test.jsonl"),
                                                                   str(sst2_file)))
    for path in setup["include"].glob("*.yaml"):
        (rendered / path.name).write_text(path.read_text())
    result = subprocess.run([sys.executable, "-m", "lm_eval", "run", "--model", "hf", "--model_args",
                             f"pretrained={setup['model']}", "--tasks", *tasks, "--include_path", str(rendered),
                             "--batch_size", "4", "--device", "cpu", "--num_fewshot", "0", "--output_path",
                             str(out / "results")], capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (found,) = list((out / "results").rglob("results_*.json"))
    return json.loads(found.read_text())["results"]


def test_evaluate_equals_the_lm_eval_command_line(setup, tmp_path):
    tasks = ["sentiment_sst2", "sentiment_imdb", "mood3"]
    config = {"model_name_or_path": str(setup["model"]), "output_dir": str(tmp_path / "ours"),
              "lm_eval": {"tasks": tasks, "include_path": str(setup["include"]), "batch_size": 4}}
    metrics = evaluate(config, data_dir=setup["data"], quiet=True)
    assert json.loads((tmp_path / "ours" / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    assert not (tmp_path / "ours" / "predictions.json").exists() and "perplexity" not in metrics  # no dataset_name
    theirs = command_line(setup, tasks, tmp_path / "cli")
    ours = metrics["lm_eval"]["tasks"]
    sizes = {"sentiment_sst2": len(REVIEWS), "sentiment_imdb": 7, "mood3": len(REVIEWS)}
    for task in tasks:
        assert ours[task]["num_documents"] == sizes[task]
        assert ours[task]["primary"] == "acc"
        for metric in ("acc", "acc_norm") if task == "mood3" else ("acc",):
            assert ours[task][metric] == pytest.approx(theirs[task][f"{metric},none"], abs=1e-6)
            assert ours[task][f"{metric}_stderr"] == pytest.approx(theirs[task][f"{metric}_stderr,none"], abs=1e-6)
    assert 0 < ours["mood3"]["acc"] < 1 or 0 < ours["sentiment_sst2"]["acc"] < 1  # not all-or-nothing everywhere


def test_data_files_replace_a_tasks_documents_as_its_yaml_would(setup, tmp_path):
    """The pipeline's route: a task's test documents from another file equal the harness run on a YAML naming it."""
    config = {"model_name_or_path": str(setup["model"]), "output_dir": str(tmp_path / "ours"),
              "lm_eval": {"tasks": ["sentiment_sst2"], "batch_size": 4,
                          "data_files": {"sentiment_sst2": str(setup["other"])}}}
    ours = evaluate(config, quiet=True)["lm_eval"]["tasks"]["sentiment_sst2"]  # no data root needed
    theirs = command_line(setup, ["sentiment_sst2"], tmp_path / "cli", sst2_file=setup["other"])["sentiment_sst2"]
    assert ours["num_documents"] == len(REVIEWS) - 3
    assert ours["acc"] == pytest.approx(theirs["acc,none"], abs=1e-6)
    assert ours["acc_stderr"] == pytest.approx(theirs["acc_stderr,none"], abs=1e-6)


def test_accuracy_is_the_argmax_of_the_answer_tokens_log_likelihood(setup, tmp_path):
    """What the packaged task scores, recomputed with the model by hand: the context is the review cut to 64 words
    and the question; the choice with the larger log p(" negative" | context) or log p(" positive" | context) wins."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    long = [(" ".join(f"w{i}" for i in range(80)) + " great", 1), ("short and bad", 0)]
    rows = [{"text": t, "label": y} for t, y in REVIEWS + long]
    data = tmp_path / "data"
    write_jsonl(data / "sst2" / "test.jsonl", rows)
    got = evaluate({"model_name_or_path": str(setup["model"]), "output_dir": str(tmp_path / "o"),
                    "lm_eval": {"tasks": ["sentiment_sst2"], "batch_size": 3}}, data_dir=data, quiet=True)
    tok = AutoTokenizer.from_pretrained(setup["model"])
    model = AutoModelForCausalLM.from_pretrained(setup["model"]).eval()
    hits = 0
    for row in rows:
        context = ("Review: " + " ".join(row["text"].split()[:64])
                   + "\nQuestion: Is this review negative or positive?\nAnswer:")
        scores = []
        for choice in ("negative", "positive"):
            whole = tok(context + " " + choice)["input_ids"]
            n = len(tok(context)["input_ids"])
            ids = torch.tensor([whole[-64:]])  # the model's 64 positions: the harness keeps the last ones
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
            targets = ids[0, 1:]
            picked = logp.gather(-1, targets[:, None])[:, 0]
            scores.append(float(picked[-(len(whole) - n):].sum()))
        hits += int(max(range(2), key=lambda k: scores[k]) == row["label"])
    assert got["lm_eval"]["tasks"]["sentiment_sst2"]["acc"] == pytest.approx(hits / len(rows), abs=1e-12)


def test_quiet_silences_the_harness_and_progress_shows_it(setup, tmp_path, capfd):
    base = {"model_name_or_path": str(setup["model"]), "lm_eval": {"tasks": ["sentiment_imdb"], "batch_size": 4}}
    evaluate({**base, "output_dir": str(tmp_path / "q")}, data_dir=setup["data"], quiet=True)
    quiet = capfd.readouterr()
    evaluate({**base, "output_dir": str(tmp_path / "p")}, data_dir=setup["data"], quiet=False)
    loud = capfd.readouterr()
    assert "Running loglikelihood requests" not in quiet.err + quiet.out
    assert "Running loglikelihood requests" in loud.err + loud.out


@pytest.mark.parametrize("case", ["unknown task", "yaml does not parse", "data root lacks the file", "no data root",
                                  "a classifier", "data_files of another task", "data_files missing",
                                  "no include folder"])
def test_bad_input_is_one_line_and_nothing_written(setup, tmp_path, tiny_bert, case):
    model, data_dir = str(setup["model"]), setup["data"]
    settings: dict = {"tasks": ["sentiment_sst2"]}
    expected = {"unknown task": "unknown task 'sentiment_sst3'", "yaml does not parse": "does not parse",
                "data root lacks the file": "which does not exist", "no data root": "give --data-dir",
                "a classifier": "need a causal language model", "data_files of another task": "not among the tasks",
                "data_files missing": "does not exist", "no include folder": "is not a folder"}[case]
    if case == "unknown task":
        settings["tasks"] = ["sentiment_sst3"]
    elif case == "yaml does not parse":
        broken = tmp_path / "broken"
        broken.mkdir()
        (broken / "bad.yaml").write_text("task: bad\ndoc_to_text: [unclosed\n")
        settings["include_path"] = str(broken)
    elif case == "data root lacks the file":
        settings["tasks"] = ["sentiment_yelp_polarity"]
    elif case == "no data root":
        data_dir = None
    elif case == "a classifier":
        model = str(tiny_bert)
    elif case == "data_files of another task":
        settings["data_files"] = {"sentiment_imdb": str(setup["other"])}
    elif case == "data_files missing":
        settings["data_files"] = {"sentiment_sst2": str(tmp_path / "nope.jsonl")}
    elif case == "no include folder":
        settings["include_path"] = str(tmp_path / "nowhere")
    config = {"model_name_or_path": model, "output_dir": str(tmp_path / "out"), "lm_eval": settings}
    env = {k: v for k, v in os.environ.items() if k != "GRADMATCH_DATA_DIR"}
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("GRADMATCH_DATA_DIR", raising=False)
        with pytest.raises(UserError, match=expected.replace("(", r"\(")):
            evaluate(config, data_dir=data_dir, quiet=True)
    assert not (tmp_path / "out").exists()
    if case in ("unknown task", "a classifier"):  # the command: exit 2, one line, no traceback
        path = tmp_path / "config.json"
        path.write_text(json.dumps(config))
        args = [sys.executable, "-m", "gradmatch", "evaluate", str(path), "--data-dir", str(setup["data"])]
        result = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and expected in result.stderr
        assert not (tmp_path / "out").exists()


def test_the_command_prints_each_tasks_accuracy(setup, tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_name_or_path": str(setup["model"]), "output_dir": str(tmp_path / "o"),
                                "lm_eval": {"tasks": ["sentiment_imdb"], "batch_size": 4}}))
    result = subprocess.run([sys.executable, "-m", "gradmatch", "evaluate", str(path), "--data-dir", str(setup["data"]),
                             "--quiet"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    saved = json.loads((tmp_path / "o" / "metrics.json").read_text())["lm_eval"]["tasks"]["sentiment_imdb"]
    assert f"sentiment_imdb: acc {saved['acc']:.4f} ± {saved['acc_stderr']:.4f} on 7 documents" in result.stdout


def test_dataset_name_is_optional_only_with_lm_eval(setup, tmp_path):
    with pytest.raises(UserError, match="optional only with an lm_eval block"):
        evaluate({"model_name_or_path": str(setup["model"]), "output_dir": str(tmp_path / "o")})
    with pytest.raises(UserError, match="tasks must not repeat"):
        evaluate({"model_name_or_path": str(setup["model"]), "output_dir": str(tmp_path / "o"),
                  "lm_eval": {"tasks": ["sentiment_sst2", "sentiment_sst2"]}})


def test_perplexity_and_lm_eval_together(setup, tmp_path):
    metrics = evaluate({"model_name_or_path": str(setup["model"]), "dataset_name": str(setup["data"] / "sst2"),
                        "output_dir": str(tmp_path / "o"), "lm_eval": {"tasks": ["sentiment_sst2"], "batch_size": 4}},
                       data_dir=setup["data"], quiet=True)
    assert metrics["perplexity"] > 1 and metrics["num_examples"] == len(REVIEWS)
    assert metrics["lm_eval"]["tasks"]["sentiment_sst2"]["num_documents"] == len(REVIEWS)
    assert (tmp_path / "o" / "predictions.json").exists()
