"""Non-finite results (issue 25, class 5 and the JSON of class 6): a diverged training run, the Fisher, Gram or
mismatch of a model that holds NaN, and a statistic that overflows are refused in one line with nothing written; a
perplexity that overflows is reported as inf, and every metrics file is valid JSON (non-finite numbers as strings)."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_tiny_bert, make_tiny_lm, write_jsonl
from gradmatch.errors import UserError
from gradmatch.finite import NON_FINITE, check_finite, dumps, json_safe

TEXTS = ["a wonderful film", "terrible and boring", "i loved every minute", "awful acting, bad plot",
         "great fun", "not worth the time", "brilliant and moving", "dull"]


def _strict_json(text: str):
    """json.loads that refuses the bare NaN/Infinity Python's json writes (other readers refuse them too)."""
    def refuse(word):
        raise ValueError(f"not JSON: {word}")

    return json.loads(text, parse_constant=refuse)


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "gradmatch", *map(str, args)], capture_output=True, text=True,
                          timeout=600, cwd=cwd)


def _one_line_error(proc, *words):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = [line for line in proc.stderr.strip().splitlines()  # mismatch has no --quiet: loading bars
             if line.strip() and not re.search(r"\d+%\|.*\|", line)]
    assert len(lines) == 1 and lines[0].startswith("gradmatch: error: "), proc.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def _poisoned(src: Path, dst: Path, name_part: str, value: float = math.nan) -> Path:
    """A copy of a model folder with one entry of the first tensor whose name contains ``name_part`` set to ``value``."""
    shutil.copytree(src, dst)
    weights = load_file(dst / "model.safetensors")
    name = next(k for k in sorted(weights) if name_part in k and weights[k].is_floating_point())
    weights[name] = weights[name].clone()
    weights[name].view(-1)[0] = value
    save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.fixture
def world(tmp_path):
    bert = make_tiny_bert(tmp_path / "bert")
    data = tmp_path / "data"
    write_jsonl(data / "train.jsonl", [{"text": t, "label": i % 2} for i, t in enumerate(TEXTS)])
    write_jsonl(data / "test.jsonl", [{"text": t, "label": (i + 1) % 2} for i, t in enumerate(TEXTS)])
    return tmp_path, bert, data


# --------------------------------------------------------------------------- the mechanism


def test_check_finite_names_the_first_tensor_and_counts():
    check_finite({"a": torch.ones(3), "i": torch.arange(3)}, "the thing")  # integers and finite floats pass
    bad = {"a": torch.ones(3), "b": torch.tensor([1.0, math.nan, math.inf, -math.inf])}
    with pytest.raises(UserError, match=r"the thing holds NaN and ±Inf in 1 tensor \(first: 'b', 1 NaN, 2 ±Inf\): "
                                        r"why; nothing was written"):
        check_finite(bad, "the thing", "why")


def test_json_of_non_finite_numbers_is_strings_that_float_reads_back():
    value = {"p": math.inf, "n": -math.inf, "x": math.nan, "ok": 1.5, "rows": [{"nll": math.inf}, (math.nan, 2)]}
    text = dumps(value)
    data = _strict_json(text)
    assert data == {"p": "Infinity", "n": "-Infinity", "x": "NaN", "ok": 1.5, "rows": [{"nll": "Infinity"}, ["NaN", 2]]}
    assert float(data["p"]) == math.inf and float(data["n"]) == -math.inf and math.isnan(float(data["x"]))
    assert set(NON_FINITE.values()) == {"NaN", "Infinity", "-Infinity"}
    assert json_safe(value)["ok"] == 1.5


# --------------------------------------------------------------------------- train


@pytest.mark.parametrize("extra", [{}, {"save_hessian": "adam"}, {"optimizer_name": "IVON", "save_hessian": "ivon"}],
                         ids=["adamw", "adam-hessian", "ivon-hessian"])
def test_a_diverging_training_run_is_refused_and_writes_nothing(world, extra):
    tmp, bert, data = world
    config = {"model_name_or_path": str(bert), "dataset_name": str(data), "output_dir": str(tmp / "child"),
              "num_train_epochs": 2, "per_device_train_batch_size": 4, "max_input_length": 16,
              "learning_rate": 1e30, "max_grad_norm": 0, **extra}
    (tmp / "train.json").write_text(json.dumps(config))
    proc = _cli("train", tmp / "train.json", "--quiet")
    _one_line_error(proc, "training diverged", "NaN", "learning_rate", "nothing was written")
    assert not (tmp / "child").exists()
    assert not [p.name for p in tmp.iterdir() if p.name.startswith(".gradmatch")]


# --------------------------------------------------------------------------- fisher, gram, generated Fisher, mismatch


def test_the_fisher_of_a_model_holding_nan_is_refused(world):
    tmp, bert, data = world
    broken = _poisoned(bert, tmp / "broken", "classifier")
    proc = _cli("fisher", "--model", broken, "--data", data, "--split", "train", "--out", tmp / "f", "--quiet")
    _one_line_error(proc, "broken", "holds NaN in 1 tensor", "classifier", "the Fisher", "nothing was written")
    assert not (tmp / "f").exists()


def test_a_fisher_that_overflows_is_not_written(world, monkeypatch):
    """Finite weights, a non-finite estimate (e.g. squared gradients past float32): refused where it is written."""
    from gradmatch.fisher import run_fisher
    from gradmatch.fisher.accumulator import FisherAccumulator

    tmp, bert, data = world
    real_mean = FisherAccumulator.mean

    def overflowing(self, **kwargs):
        fisher = real_mean(self, **kwargs)
        name = sorted(fisher)[0]
        fisher[name] = torch.full_like(fisher[name], math.inf)
        return fisher

    monkeypatch.setattr(FisherAccumulator, "mean", overflowing)
    with pytest.raises(UserError, match=r"the Hessian holds ±Inf .* the weights of .* are finite, so the computation "
                                        r"overflowed.*nothing was written"):
        run_fisher(str(bert), str(data), "train", out=tmp / "f", progress=False)
    assert not (tmp / "f").exists()


def test_the_gram_of_a_model_holding_nan_is_refused_and_an_overflow_too(world, monkeypatch):
    from gradmatch.gram import GramAccumulator, run_gram

    tmp, bert, data = world
    broken = _poisoned(bert, tmp / "broken", "embeddings.word")
    proc = _cli("gram", "--model", broken, "--data", data, "--split", "train", "--out", tmp / "g", "--quiet")
    _one_line_error(proc, "holds NaN", "the Gram", "nothing was written")
    assert not (tmp / "g").exists()

    real_means = GramAccumulator.means

    def overflowing(self):
        grams = real_means(self)
        name = sorted(grams)[0]
        grams[name] = grams[name] * math.inf
        return grams

    monkeypatch.setattr(GramAccumulator, "means", overflowing)
    with pytest.raises(UserError, match="the Gram matrices holds .*Inf|the Gram matrices holds NaN"):
        run_gram(str(bert), str(data), "train", out=tmp / "g", progress=False)
    assert not (tmp / "g").exists()


def test_the_generated_fisher_of_a_model_holding_nan_is_refused(tmp_path):
    lm = _poisoned(make_tiny_lm(tmp_path / "lm"), tmp_path / "broken", "ln_f")
    proc = _cli("fisher", "--model", lm, "--data", "generated", "--examples", "2", "--max-length", "4",
                "--out", tmp_path / "f", "--quiet")
    _one_line_error(proc, "holds NaN", "ln_f", "nothing was written")
    assert not (tmp_path / "f").exists()


def test_the_mismatch_of_a_merge_holding_nan_is_refused(world):
    tmp, bert, data = world
    broken = _poisoned(bert, tmp / "broken", "encoder")
    out = tmp / "m.json"
    proc = _cli("mismatch", broken, "--children", bert, "--alphas", "1", "--data", data, "--split", "train",
                "--out", out)
    _one_line_error(proc, "broken", "holds NaN", "gradient mismatch")
    assert not out.exists()


# --------------------------------------------------------------------------- evaluate: NaN weights, inf perplexity


def test_evaluating_a_model_holding_nan_is_refused(world):
    """A classifier of NaN predicts class 0 everywhere: accuracy 0.5 here, plausible and wrong."""
    tmp, bert, data = world
    broken = _poisoned(bert, tmp / "broken", "classifier")
    config = {"model_name_or_path": str(broken), "dataset_name": str(data), "output_dir": str(tmp / "ev")}
    (tmp / "ev.json").write_text(json.dumps(config))
    _one_line_error(_cli("evaluate", tmp / "ev.json", "--quiet"), "holds NaN", "evaluation", "nothing was written")
    assert not (tmp / "ev").exists()


def test_a_perplexity_that_overflows_is_inf_and_every_output_is_valid_json(tmp_path):
    """Logits scaled by 1e6 (finite weights): mean NLL per token far above 709, exp overflows. The metrics say
    Infinity as a string, the command prints inf and exits 0; the per-sequence NLLs stay finite numbers."""
    lm = make_tiny_lm(tmp_path / "lm")
    weights = load_file(lm / "model.safetensors")
    weights["transformer.ln_f.weight"] = weights["transformer.ln_f.weight"] * 1e6
    save_file(weights, lm / "model.safetensors", metadata={"format": "pt"})
    write_jsonl(tmp_path / "text" / "test.jsonl", [{"text": t} for t in TEXTS])
    config = {"model_name_or_path": str(lm), "dataset_name": str(tmp_path / "text"), "output_dir": str(tmp_path / "ev")}
    (tmp_path / "ev.json").write_text(json.dumps(config))
    proc = _cli("evaluate", tmp_path / "ev.json", "--quiet")
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = _strict_json((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["perplexity"] == "Infinity" and float(metrics["perplexity"]) == math.inf
    assert metrics["nll_per_token"] > 709
    predictions = _strict_json((tmp_path / "ev" / "predictions.json").read_text())
    assert all(math.isfinite(r["nll"]) for r in predictions["predictions"])
    assert "perplexity inf" in proc.stdout


def test_the_loss_metrics_of_the_mismatch_take_an_overflowing_perplexity():
    from gradmatch.kinds.causal_lm import KIND, perplexity

    assert perplexity(1e6, 10) == math.inf and perplexity(10.0, 10) == pytest.approx(math.e)
    assert math.isnan(perplexity(1.0, 0))
    assert KIND.loss_metrics({"tokens": 2.0}, 1, 5000.0)["perplexity"] == math.inf
