"""Evaluation: metrics agree with a hand count over the predictions file; outputs; bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from gradmatch import UserError
from gradmatch.evaluate import evaluate
from conftest import write_jsonl as _write_jsonl




@pytest.fixture
def toy(tmp_path):
    rows = [{"text": f"example {i} " + "word " * (i % 5), "label": (i * 7 // 3) % 2} for i in range(30)]
    return _write_jsonl(tmp_path / "toy" / "test.jsonl", rows)


def test_accuracy_equals_a_hand_count_over_the_predictions_file(tiny_bert, toy, tmp_path):
    from sklearn.metrics import f1_score

    config = {"model_name_or_path": str(tiny_bert), "dataset_name": str(toy.parent), "dataset_test_split": "test[2:]",
              "metric_output_file": str(tmp_path / "m" / "metrics.json"),
              "prediction_output_file": str(tmp_path / "m" / "predictions.json"), "per_device_eval_batch_size": 4}
    metrics = evaluate(config, quiet=True)
    on_disk = json.loads((tmp_path / "m" / "metrics.json").read_text())
    predictions = json.loads((tmp_path / "m" / "predictions.json").read_text())["predictions"]
    labels = [json.loads(line)["label"] for line in toy.read_text().splitlines()][2:]
    assert [p["label"] for p in predictions] == labels and [p["index"] for p in predictions] == list(range(28))
    hits = sum(p["prediction"] == p["label"] for p in predictions)
    assert on_disk["accuracy"] == metrics["accuracy"] == hits / 28
    assert 0 < hits < 28  # a random model: the count is not trivially all or nothing
    assert on_disk["macro_f1"] == pytest.approx(f1_score(labels, [p["prediction"] for p in predictions], average="macro"))
    assert on_disk["num_examples"] == 28 and on_disk["split"] == "test[2:]" and on_disk["dataset"] == str(toy.parent)
    for p in predictions:
        assert sum(p["probabilities"]) == pytest.approx(1, abs=1e-5)
        assert p["prediction"] == max(range(2), key=lambda k: p["probabilities"][k])


def test_batch_size_does_not_change_predictions(tiny_bert, toy, tmp_path):
    def run(bs, name):
        evaluate({"model_name_or_path": str(tiny_bert), "dataset_name": str(toy), "output_dir": str(tmp_path / name),
                  "per_device_eval_batch_size": bs}, quiet=True)
        return json.loads((tmp_path / name / "predictions.json").read_text())["predictions"]

    one, many = run(1, "one"), run(16, "many")
    assert [p["prediction"] for p in one] == [p["prediction"] for p in many]
    for a, b in zip(one, many):
        assert a["probabilities"] == pytest.approx(b["probabilities"], abs=1e-5)


def test_image_model_on_digits(tmp_path):
    from gradmatch.models import load_model

    model, processor = load_model("vit-digits", seed=0)
    model.save_pretrained(tmp_path / "vit")
    processor.save_pretrained(tmp_path / "vit")
    metrics = evaluate({"model_name_or_path": str(tmp_path / "vit"), "dataset_name": "digits-hflip",
                        "dataset_test_split": "test[:40]", "output_dir": str(tmp_path / "e")}, quiet=True)
    predictions = json.loads((tmp_path / "e" / "predictions.json").read_text())["predictions"]
    assert metrics["num_examples"] == 40 and len(predictions[0]["probabilities"]) == 10
    assert metrics["accuracy"] == sum(p["prediction"] == p["label"] for p in predictions) / 40


def test_outputs_are_not_overwritten_without_permission(tiny_bert, toy, tmp_path):
    config = {"model_name_or_path": str(tiny_bert), "dataset_name": str(toy), "output_dir": str(tmp_path / "e")}
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "metrics.json").write_text("old")
    with pytest.raises(UserError, match="metrics.json already exists"):
        evaluate(config, quiet=True)
    assert (tmp_path / "e" / "metrics.json").read_text() == "old"
    assert not (tmp_path / "e" / "predictions.json").exists()
    evaluate(config, overwrite=True, quiet=True)
    assert json.loads((tmp_path / "e" / "metrics.json").read_text())["num_examples"] == 30


def test_bad_evaluate_configs(tiny_bert, toy, tmp_path):
    three = _write_jsonl(tmp_path / "three.jsonl", [{"text": "a", "label": 2}])
    base = {"model_name_or_path": str(tiny_bert), "dataset_name": str(toy), "output_dir": str(tmp_path / "e")}
    with pytest.raises(UserError, match="label 2 is outside 0..1"):
        evaluate(dict(base, dataset_name=str(three)), quiet=True)
    with pytest.raises(UserError, match="metric_output_file"):
        evaluate({k: v for k, v in base.items() if k != "output_dir"}, quiet=True)
    with pytest.raises(UserError, match="needs output_dir"):
        evaluate({"model_name_or_path": str(tiny_bert), "dataset_name": str(toy),
                  "method": "sequence_classification_squared_gradients"}, quiet=True)
    with pytest.raises(UserError, match="holds an image column"):
        evaluate(dict(base, dataset_name="digits-original"), quiet=True)
    assert not (tmp_path / "e").exists()


@pytest.mark.slow
def test_cli_evaluate_prints_and_fails_cleanly(tiny_bert, toy, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
    config = tmp_path / "eval.json"
    config.write_text(json.dumps({"model_name_or_path": str(tiny_bert), "dataset_name": str(toy),
                                  "dataset_test_split": "test[:40]", "output_dir": str(tmp_path / "e")}))
    bad = subprocess.run([sys.executable, "-m", "gradmatch", "evaluate", str(config), "--quiet"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines() == [bad.stderr.strip()] and "out of range" in bad.stderr
    assert not (tmp_path / "e").exists()
    config.write_text(json.dumps({"model_name_or_path": str(tiny_bert), "dataset_name": str(toy),
                                  "output_dir": str(tmp_path / "e")}))
    ok = subprocess.run([sys.executable, "-m", "gradmatch", "evaluate", str(config), "--quiet"],
                        capture_output=True, text=True, env=env, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert "on 30 examples" in ok.stdout and (tmp_path / "e" / "predictions.json").is_file()


# --------------------------------------------------------------------------- the outputs as one set (issue 25, class 7)


@pytest.mark.parametrize("where", ["ancestor-is-a-file", "name-too-long"])
def test_a_metrics_file_that_cannot_be_written_is_refused_before_the_evaluation(tiny_bert, toy, tmp_path, where):
    """On main the predictions were written, then the metrics failed: exit 2 said nothing was written, and the
    predictions stayed. Now the metrics path is checked up front (its nearest existing folder, its name's length)."""
    (tmp_path / "afile").write_text("mine")
    metrics = tmp_path / "afile" / "sub" / "m.json" if where == "ancestor-is-a-file" else tmp_path / ("m" * 300)
    config = {"model_name_or_path": str(tiny_bert), "dataset_name": str(toy), "metric_output_file": str(metrics),
              "prediction_output_file": str(tmp_path / "out" / "p.json")}
    with pytest.raises(UserError, match="afile is not a folder|longer than the 255 bytes"):
        evaluate(config, quiet=True)
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "tiny-bert", "toy"]


@pytest.mark.parametrize("failing", ["metrics", "predictions", "generations"])
def test_a_failure_writing_any_output_leaves_none_of_them(tiny_lm_world, tmp_path, monkeypatch, failing):
    """Metrics, predictions and generations are one set: a failure while any of them is written (a full disk, an I/O
    error) leaves none of them behind — on main the files written before the failing one stayed."""
    import contextlib

    from gradmatch import fsutil

    lm, text = tiny_lm_world
    out = tmp_path / "ev"
    paths = {"metrics": out / "metrics.json", "predictions": out / "predictions.json",
             "generations": out / "generations.jsonl"}
    real = fsutil.atomic_file

    @contextlib.contextmanager
    def failing_file(path, *args, **kwargs):
        with real(path, *args, **kwargs) as fh:
            if os.path.abspath(path) == os.path.abspath(paths[failing]):
                raise OSError(5, "Input/output error (injected)")
            yield fh

    monkeypatch.setattr(fsutil, "atomic_file", failing_file)
    config = {"model_name_or_path": str(lm), "dataset_name": str(text), "output_dir": str(out),
              "generation": {"prompts": ["the movie"], "max_new_tokens": 2}}
    with pytest.raises((OSError, UserError)):
        evaluate(config, quiet=True)
    left = sorted(p.name for p in out.iterdir()) if out.exists() else []
    assert left == [], left


@pytest.fixture
def tiny_lm_world(tmp_path):
    from conftest import make_tiny_lm

    lm = make_tiny_lm(tmp_path / "lm")
    text = _write_jsonl(tmp_path / "text" / "test.jsonl", [{"text": f"the movie was good {i}"} for i in range(6)])
    return lm, text.parent
