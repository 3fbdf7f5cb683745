"""RegMean: `gradmatch gram` against forward hooks written the simple way, the merge against a float64 formula,
its special cases, and bad inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from conftest import make_tiny_bert, write_jsonl

SENTENCES = ["a fine film", "the worst thing I have seen, truly awful from start to end", "ok", "bad bad bad bad",
             "meh, it was fine I guess, though the second half drags", "an utterly charming, clever and warm comedy",
             "slow", "the actors seem to have fun and so did I"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny BERT parent, two children near it, a held-out file, and each child's Gram (via the CLI)."""
    root = tmp_path_factory.mktemp("regmean")
    parent = make_tiny_bert(root / "parent", seed=0)
    g = torch.Generator().manual_seed(1)
    children = []
    for t in range(2):
        folder = make_tiny_bert(root / f"child{t}", seed=0)
        weights = load_file(folder / "model.safetensors")
        save_file({k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
                   for k, v in weights.items()}, folder / "model.safetensors", metadata={"format": "pt"})
        children.append(folder)
    data = write_jsonl(root / "held-out.jsonl", [{"text": s, "label": i % 2} for i, s in enumerate(SENTENCES)])
    grams = []
    for t, child in enumerate(children):
        out = root / f"gram{t}"
        code = _cli("gram", "--model", child, "--data", data, "--split", "train", "--out", out, "--batch-size", 3,
                    "--quiet").returncode
        assert code == 0
        grams.append(out)
    return {"root": root, "parent": parent, "children": children, "data": data, "grams": grams}


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "gradmatch", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


def _simple_grams(folder, texts):
    """Σ x xᵀ over every token of every sentence, one unpadded sentence at a time, with plain forward hooks."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    sums, counts = {}, {}

    def hook(name):
        def record(module, args, out):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + x.t() @ x
            counts[name] = counts.get(name, 0) + x.shape[0]
        return record

    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            m.register_forward_hook(hook(f"{name}.weight"))
    with torch.no_grad():
        for text in texts:
            model(**tokenizer(text, return_tensors="pt"))
    return sums, counts


def test_gram_matches_forward_hooks_on_unpadded_sentences(world):
    written = load_file(world["grams"][0] / "gram.safetensors")
    record = json.loads((world["grams"][0] / "gram.json").read_text())
    sums, counts = _simple_grams(world["children"][0], SENTENCES)
    assert set(written) == set(sums) and record["examples"] == len(SENTENCES)
    assert record["normalisation"].startswith("mean over the non-padding")
    for name, total in sums.items():
        assert record["positions"][name] == counts[name]
        expected = total / counts[name]  # the recorded normalisation: the mean over positions
        torch.testing.assert_close(written[name].double(), expected, rtol=1e-4, atol=1e-6 * float(expected.abs().max()),
                                   msg=name)
    head = "classifier.weight"  # one pooled vector per sentence
    assert record["positions"][head] == len(SENTENCES)


def _regmean_reference(Ws, Gs, weights, r):
    """(Σ_t w_t W_t G̃_t)(Σ_t w_t G̃_t)⁻¹ in float64 numpy, G̃ = r G + (1 − r) diag(G)."""
    reduced = [r * G + (1 - r) * np.diag(np.diag(G)) for G in Gs]
    A = sum(w * G for w, G in zip(weights, reduced))
    B = sum(w * W @ G for w, W, G in zip(weights, Ws, reduced))
    return B @ np.linalg.inv(A)


def assert_regmean_formula(merged, children, grams, weights, r) -> None:
    """Every floating tensor of ``merged``: the float64 formula where it has a Gram, else the weighted average
    (norms, biases, embeddings, a tied lm_head)."""
    for name, value in merged.items():
        if not value.is_floating_point():
            continue
        if name in grams[0]:
            expected = _regmean_reference([c[name].double().numpy() for c in children],
                                          [g[name].double().numpy() for g in grams], weights, r)
        else:
            expected = (sum(w * c[name].double() for w, c in zip(weights, children)) / sum(weights)).numpy()
        np.testing.assert_allclose(value.double().numpy(), expected, rtol=1e-4, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("r", [0.9, 0.3])
def test_regmean_merge_equals_the_float64_formula(world, tmp_path, r):
    from gradmatch.merge import merge

    weights = [1.0, 3.0]
    config = {"method": "regmean", "base": str(world["parent"]), "parameters": {"reduce_nondiagonal": r},
              "models": [{"model": str(c), "gram": str(g), "weight": w}
                         for c, g, w in zip(world["children"], world["grams"], weights)]}
    out = merge(config, tmp_path / "merged", progress=False, block_rows=5)  # blocks of rows share one factorisation
    merged = load_file(out / "model.safetensors")
    children = [load_file(c / "model.safetensors") for c in world["children"]]
    grams = [load_file(g / "gram.safetensors") for g in world["grams"]]
    assert_regmean_formula(merged, children, grams, weights, r)
    assert json.loads((out / "merge.json").read_text())["models"][0]["gram"] == str(world["grams"][0])


def test_diagonal_grams_weigh_each_input_feature_and_equal_grams_average(world):
    from gradmatch.methods.regmean import regmean

    g = torch.Generator().manual_seed(3)
    Ws = [torch.randn(4, 6, generator=g, dtype=torch.float64) for _ in range(3)]
    Gs = []
    for _ in range(3):
        X = torch.randn(20, 6, generator=g, dtype=torch.float64)
        Gs.append(X.t() @ X / 20)
    weights = [1.0, 2.0, 0.5]
    got = regmean(Ws[0], Ws, weights=weights, grams=Gs, cache={}, reduce_nondiagonal=0.0)
    d = [torch.diagonal(G) for G in Gs]  # r = 0: each input feature j weighs child t by w_t G_t[j, j]
    expected = sum(w * W * dj for w, W, dj in zip(weights, Ws, d)) / sum(w * dj for w, dj in zip(weights, d))
    torch.testing.assert_close(got, expected)
    same = regmean(Ws[0], Ws, weights=weights, grams=[Gs[0]] * 3, cache={}, reduce_nondiagonal=0.7)
    torch.testing.assert_close(same, sum(w * W for w, W in zip(weights, Ws)) / sum(weights))


def test_a_singular_sum_is_an_error_unless_regularised():
    from gradmatch.methods.base import MethodError
    from gradmatch.methods.regmean import regmean

    W = [torch.ones(2, 3, dtype=torch.float64)] * 2
    G = torch.diag(torch.tensor([1.0, 2.0, 0.0], dtype=torch.float64))  # the third input is always zero
    with pytest.raises(MethodError, match="singular.*epsilon"):
        regmean(W[0], W, weights=[1, 1], grams=[G, G], cache={}, reduce_nondiagonal=1.0)
    fine = regmean(W[0], W, weights=[1, 1], grams=[G, G], cache={}, reduce_nondiagonal=1.0, epsilon=1e-6)
    assert torch.isfinite(fine).all()


def _bad(world, tmp_path, case):
    models = [{"model": str(c), "gram": str(g)} for c, g in zip(world["children"], world["grams"])]
    if case == "gram of another model":
        other = make_tiny_bert(tmp_path / "wide", hidden=32)
        _cli("gram", "--model", other, "--data", world["data"], "--split", "train", "--out", tmp_path / "g-wide",
             "--quiet")
        models[1]["gram"] = str(tmp_path / "g-wide")
        words = "is 32 × 32 but the weight's input size is 16"
    elif case == "missing layer":
        grams = load_file(world["grams"][1] / "gram.safetensors")
        grams.pop("classifier.weight")
        (tmp_path / "g-missing").mkdir()
        save_file(grams, tmp_path / "g-missing" / "gram.safetensors")
        models[1]["gram"] = str(tmp_path / "g-missing")
        words = r"differ in their layers \(e.g. classifier.weight\)"
    elif case == "NaN":
        grams = load_file(world["grams"][1] / "gram.safetensors")
        grams["classifier.weight"][0, 0] = float("nan")
        (tmp_path / "g-nan").mkdir()
        save_file(grams, tmp_path / "g-nan" / "gram.safetensors")
        models[1]["gram"] = str(tmp_path / "g-nan")
        words = "classifier.weight in .*g-nan.* holds NaN or Inf"
    else:
        models[1].pop("gram")
        words = "needs a gram for every model"
    (tmp_path / "m.yaml").write_text(yaml.safe_dump({"method": "regmean", "base": str(world["parent"]),
                                                     "models": models}))
    return words


@pytest.mark.slow
@pytest.mark.parametrize("case", ["gram of another model", "missing layer", "NaN", "no gram"])
def test_bad_grams_give_one_line_exit_2_and_nothing_written(world, tmp_path, case):
    import re

    words = _bad(world, tmp_path, case)
    result = _cli("merge", tmp_path / "m.yaml", tmp_path / "out", "--quiet")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert re.search(words, lines[0]), lines[0]
    assert not (tmp_path / "out").exists()
