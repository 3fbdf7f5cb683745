"""Fine-tuning: loss falls, metadata, determinism, LoRA folded into full weights, the original's configs,
MiniLM on Rotten Tomatoes, and bad input through the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gradmatch import UserError
from gradmatch.config.run import load_evaluate_config, load_train_config
from gradmatch.train import METADATA_FILE, read_training_metadata, train
from conftest import write_jsonl as _write_jsonl

FIXTURES = Path(__file__).parent / "fixtures" / "original_configs"
#: The keys of the original's configs that hold paths (the only ones the tests may change).
PATH_KEYS = {"model_name_or_path", "dataset_name", "output_dir", "cache_dir", "metric_output_file",
             "prediction_output_file"}




@pytest.fixture
def polarity_folder(tmp_path) -> Path:
    """A learnable toy sentiment set: the label is which of two words the text holds."""
    words = ["movie", "plot", "film", "actor", "story", "scene", "music"]  # 7 nouns: each with both labels
    rows = [{"text": f"the {words[i % 7]} was {'great' if i % 2 else 'awful'}", "label": i % 2} for i in range(48)]
    folder = tmp_path / "polarity"
    _write_jsonl(folder / "train.jsonl", rows[:40])
    _write_jsonl(folder / "test.jsonl", rows[40:])
    return folder


def _tiny_config(model, data, out, **overrides) -> dict:
    config = {"model_name_or_path": str(model), "dataset_name": str(data), "output_dir": str(out),
              "num_train_epochs": 6, "learning_rate": 2e-2, "per_device_train_batch_size": 8,
              "max_input_length": 16, "logging_steps": 5, "seed": 0}
    config.update(overrides)
    return config


def test_tiny_model_loss_falls_and_metadata(tiny_bert, polarity_folder, tmp_path):
    out = train(_tiny_config(tiny_bert, polarity_folder, tmp_path / "child"), quiet=True)
    meta = read_training_metadata(out)
    losses = meta["loss_history"]
    assert len(losses) == 6  # 30 steps, logged every 5
    assert losses[-1] < 0.2 * losses[0], losses
    assert meta["num_train_examples"] == 40
    assert meta["dataset_name"] == str(polarity_folder) and meta["train_split"] == "train"
    assert meta["seed"] == 0 and meta["parent"] == str(tiny_bert) and meta["num_labels"] == 2
    assert meta["config"]["learning_rate"] == 2e-2 and meta["global_step"] == 30
    names = set(os.listdir(out))
    assert {"config.json", "model.safetensors", "tokenizer.json", METADATA_FILE} <= names
    assert not any(n.startswith(("checkpoint", ".trainer", "optimizer", "scheduler")) for n in names), names
    assert not any(p.name.startswith(".gradmatch-tmp") for p in tmp_path.iterdir())
    # the folder is self-contained and loads
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    batch = tok(["the film was great", "the film was awful"], return_tensors="pt")
    assert model(**batch).logits.argmax(-1).tolist() == [1, 0]


def test_training_is_deterministic_given_a_seed(tiny_bert, polarity_folder, tmp_path):
    cfg = _tiny_config(tiny_bert, polarity_folder, tmp_path / "a", num_train_epochs=1, dropout=0.1)
    a = load_file(str(train(cfg, quiet=True) / "model.safetensors"))
    b = load_file(str(train(dict(cfg, output_dir=str(tmp_path / "b")), quiet=True) / "model.safetensors"))
    c = load_file(str(train(dict(cfg, output_dir=str(tmp_path / "c"), seed=1), quiet=True) / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["classifier.weight"], c["classifier.weight"])


def test_vit_digits_from_scratch_learns(tmp_path):
    out = train({"model_name_or_path": "vit-digits", "dataset_name": "digits-original",
                 "dataset_train_split": "train[:320]", "output_dir": str(tmp_path / "vit"), "num_train_epochs": 8,
                 "learning_rate": 3e-3, "per_device_train_batch_size": 32, "logging_steps": 5, "seed": 0,
                 "lr_scheduler": "cosine", "warmup_steps": 4, "weight_decay": 0.01}, quiet=True)
    meta = read_training_metadata(out)
    assert meta["num_labels"] == 10 and meta["kind"] == "image-classification" and meta["from_scratch"]
    assert meta["loss_history"][-1] < 0.8 * meta["loss_history"][0], meta["loss_history"]
    assert (out / "preprocessor_config.json").is_file()
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    assert AutoModelForImageClassification.from_pretrained(out).config.image_size == 8
    assert list(AutoImageProcessor.from_pretrained(out).image_mean) == [0.5]


def test_lora_is_folded_into_full_weights(tiny_bert, polarity_folder, tmp_path):
    cfg = _tiny_config(tiny_bert, polarity_folder, tmp_path / "lora", num_train_epochs=2,
                       lora={"r": 4, "alpha": 8, "target_modules": ["query", "value"]})
    out = train(cfg, quiet=True)
    assert not (out / "adapter_config.json").exists()
    parent = load_file(str(tiny_bert / "model.safetensors"))
    child = load_file(str(out / "model.safetensors"))
    assert set(child) == set(parent)  # same tensors as any full child: merge consumes it as is
    q = "bert.encoder.layer.0.attention.self.query.weight"
    k = "bert.encoder.layer.0.attention.self.key.weight"
    assert not torch.equal(child[q], parent[q])  # adapted and merged
    torch.testing.assert_close(child[k], parent[k])  # not adapted: frozen
    torch.testing.assert_close(child["bert.embeddings.word_embeddings.weight"], parent["bert.embeddings.word_embeddings.weight"])
    assert not torch.equal(child["classifier.weight"], parent["classifier.weight"])  # the head is trained in full
    assert read_training_metadata(out)["lora"] is True


def test_optimizer_and_schedule_settings_reach_the_trainer(tmp_path):
    from gradmatch.train import _training_arguments

    cfg = load_train_config({"model_name_or_path": "m", "dataset_name": "imdb", "output_dir": "o",
                             "beta1": 0.8, "beta2": 0.99, "eps": 1e-6, "weight_decay": 0.1, "max_grad_norm": 0.5,
                             "warmup_steps": 7, "lr_scheduler": "cosine", "min_lr": 1e-6, "learning_rate": 2e-5,
                             "gradient_accumulation_steps": 2})
    args = _training_arguments(cfg, tmp_path, quiet=True, has_eval=False)
    assert (args.adam_beta1, args.adam_beta2, args.adam_epsilon) == (0.8, 0.99, 1e-6)
    assert (args.weight_decay, args.max_grad_norm, args.warmup_steps) == (0.1, 0.5, 7)
    assert args.optim == "adamw_torch" and args.learning_rate == 2e-5 and args.gradient_accumulation_steps == 2
    assert args.lr_scheduler_type == "cosine_with_min_lr" and args.lr_scheduler_kwargs == {"min_lr": 1e-6}
    assert args.save_strategy == "no"
    linear = _training_arguments(load_train_config({"model_name_or_path": "m", "dataset_name": "imdb",
                                                    "output_dir": "o"}), tmp_path, quiet=True, has_eval=True)
    assert linear.lr_scheduler_type == "linear" and linear.eval_strategy == "epoch"


def test_config_key_checks():
    base = {"model_name_or_path": "m", "dataset_name": "imdb", "output_dir": "o"}
    with pytest.raises(UserError, match="unknown keys: batch_size, epochs"):
        load_train_config(dict(base, epochs=1, batch_size=2))
    with pytest.raises(UserError, match="lr_scheduler"):
        load_train_config(dict(base, lr_scheduler="exponential"))
    with pytest.raises(UserError, match="unknown optimizer 'SGD' \\(choose AdamW or IVON\\)"):
        load_train_config(dict(base, optimizer_name="SGD"))
    with pytest.raises(UserError, match="gradmatch evaluate"):
        load_train_config(dict(base, method="sequence_classification_squared_gradients"))
    cfg = load_train_config(dict(base, cache_dir="c", max_output_length=128, save_strategy="epoch", lr_scheduler_type="cosine"))
    assert cfg.ignored_keys == ["max_output_length", "save_strategy"] and cfg.lr_scheduler == "cosine"


@pytest.mark.parametrize("seed", [-1, 2**32, 2**64])
def test_a_seed_numpy_cannot_take_is_refused_in_one_line(seed, tiny_bert, polarity_folder, tmp_path, capsys,
                                                         monkeypatch):
    """0 <= seed < 2**32 (numpy's and transformers.set_seed's range), checked when the config is read."""
    import yaml

    from gradmatch.cli import main

    def no_data(*args, **kwargs):
        raise AssertionError("the data was loaded before the seed was checked")

    monkeypatch.setattr("gradmatch.data.load_split", no_data)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(_tiny_config(tiny_bert, polarity_folder, tmp_path / "out", seed=seed)))
    assert main(["train", str(path), "--quiet"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"gradmatch: error: {path}: seed: must be an integer from 0 to 2**32 - 1 (4294967295), "
                     f"got {seed}"], lines
    assert not (tmp_path / "out").exists()
    base = {"model_name_or_path": "m", "dataset_name": "imdb", "output_dir": "o"}
    assert load_train_config(dict(base, seed=2**32 - 1)).seed == 2**32 - 1 and load_train_config(dict(base, seed=0)).seed == 0
    with pytest.raises(UserError, match=r"seed: must be an integer from 0 to 2\*\*32 - 1"):
        load_evaluate_config(dict(base, seed=seed))
    with pytest.raises(UserError, match=r"generation.seed: must be an integer from 0 to 2\*\*32 - 1"):
        load_evaluate_config(dict(base, generation={"prompts": ["a"], "seed": seed}))


def _rebase(name: str, **paths) -> dict:
    """The original's config file with only its path keys changed."""
    config = json.loads((FIXTURES / name).read_text())
    assert set(paths) <= PATH_KEYS
    config.update({k: str(v) for k, v in paths.items()})
    return config


def test_original_configs_are_accepted_after_changing_their_paths(tiny_bert, polarity_folder, tmp_path):
    from gradmatch.evaluate import evaluate

    train_cfg = _rebase("train_config.json", model_name_or_path=tiny_bert, dataset_name=polarity_folder,
                        output_dir=tmp_path / "model", cache_dir=tmp_path / "cache")
    (tmp_path / "train.json").write_text(json.dumps(train_cfg))
    out = train(tmp_path / "train.json", quiet=True)
    meta = read_training_metadata(out)
    assert meta["num_train_examples"] == 40 and meta["val_split"] == "test[:10%]"
    assert {"max_output_length", "save_strategy"} <= set(meta["ignored_keys"])
    assert meta["eval"]["eval_accuracy"] in (0.0, 1.0)  # 10% of 8 test rows: one example
    eval_cfg = _rebase("evaluate_config.json", model_name_or_path=out, dataset_name=polarity_folder,
                       output_dir=tmp_path / "search", cache_dir=tmp_path / "cache",
                       metric_output_file=tmp_path / "search" / "metrics.json",
                       prediction_output_file=tmp_path / "search" / "predictions.json")
    (tmp_path / "evaluate.json").write_text(json.dumps(eval_cfg))
    metrics = evaluate(tmp_path / "evaluate.json", quiet=True)
    assert metrics["num_examples"] == 8
    assert json.loads((tmp_path / "search" / "metrics.json").read_text())["accuracy"] == metrics["accuracy"]
    fisher_cfg = _rebase("fisher_config.json", model_name_or_path=out, dataset_name=polarity_folder,
                         output_dir=tmp_path / "fisher", cache_dir=tmp_path / "cache")
    parsed = load_evaluate_config(fisher_cfg)
    assert parsed.is_fisher() and parsed.dataset_test_split == "train" and parsed.max_input_length == 384
    import gradmatch.fisher as fisher

    if not hasattr(fisher, "run_fisher"):
        pytest.skip("gradmatch.fisher.run_fisher is not there yet")
    result = evaluate(fisher_cfg, quiet=True)
    assert (tmp_path / "fisher" / "hessian" / "config.json").is_file(), result


@pytest.mark.slow
def test_minilm_on_rotten_tomatoes_beats_70_percent(sentiment_root, tmp_path):
    """MiniLM, one short epoch on 512 Rotten Tomatoes training examples, > 70% on 500 test examples.

    Measured (2 shared cores): ~55 s training, ~15 s evaluation; accuracy 0.752 / 0.758 / 0.702 with
    seeds 0 / 1 / 2 (the test uses seed 0). Batch 16 (32 steps) reached 0.72, lr 5e-5 0.66, lr 2e-4 with
    warmup 0.746 / 0.660 / 0.742, batch 4 0.738 / 0.718 / 0.714: 64 steps of 1e-4 it is.
    """
    from gradmatch.evaluate import evaluate

    out = train({"model_name_or_path": "minilm", "dataset_name": "rotten_tomatoes",
                 "dataset_train_split": "train[:512]", "output_dir": str(tmp_path / "rt"), "num_train_epochs": 1,
                 "learning_rate": 1e-4, "per_device_train_batch_size": 8, "dropout": 0.0,
                 "max_input_length": 64, "seed": 0}, data_dir=sentiment_root, quiet=True)
    assert read_training_metadata(out)["num_train_examples"] == 512
    metrics = evaluate({"model_name_or_path": str(out), "dataset_name": "rotten_tomatoes",
                        "dataset_test_split": "test[:500]", "output_dir": str(tmp_path / "eval"),
                        "per_device_eval_batch_size": 32, "max_input_length": 64}, data_dir=sentiment_root, quiet=True)
    assert metrics["num_examples"] == 500
    assert metrics["accuracy"] > 0.70, metrics


# --------------------------------------------------------------------------- bad input via the CLI


def _cli(*args, cwd=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
    env.pop("GRADMATCH_DATA_DIR", None)
    return subprocess.run([sys.executable, "-m", "gradmatch", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300)


def _bad_cases(tiny_bert: Path, data: Path, tmp: Path):
    three = _write_jsonl(tmp / "three.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": 2}])
    empty = tmp / "empty.jsonl"
    empty.write_text("")
    garbage = tmp / "garbage.jsonl"
    garbage.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe not json")
    base = {"model_name_or_path": str(tiny_bert), "dataset_name": str(data), "output_dir": str(tmp / "out")}
    return {
        "unknown keys": (dict(base, num_epochs=1, optimiser="adam"), r"unknown keys: num_epochs, optimiser"),
        "unknown preset": (dict(base, dataset_name="imbd"), r"unknown data set 'imbd'"),
        "split out of range": (dict(base, dataset_train_split="test[100:600]"), r"out of range: test has 8 rows"),
        "labels outside num_labels": (dict(base, dataset_name=str(three)), r"label 2 is outside 0..1"),
        "empty data": (dict(base, dataset_name=str(empty)), r"empty.jsonl is empty"),
        "unreadable file": (dict(base, dataset_name=str(garbage)), r"cannot read data file .*garbage.jsonl"),
        "missing model": (dict(base, model_name_or_path=str(tmp / "nomodel")), r"nomodel does not exist"),
    }


@pytest.mark.slow
@pytest.mark.parametrize("case", ["unknown keys", "unknown preset", "split out of range", "labels outside num_labels",
                                  "empty data", "unreadable file", "missing model"])
def test_bad_input_gives_one_line_and_exit_2(case, tiny_bert, polarity_folder, tmp_path):
    import re

    config, pattern = _bad_cases(tiny_bert, polarity_folder, tmp_path)[case]
    path = tmp_path / "config.yaml"
    import yaml

    path.write_text(yaml.safe_dump(config))
    result = _cli("train", str(path), "--quiet")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("gradmatch: error: "), result.stderr
    assert re.search(pattern, lines[0]), lines[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
    assert not any(p.name.startswith(".gradmatch") for p in tmp_path.iterdir())


@pytest.mark.slow
def test_existing_output_folder_is_kept_without_overwrite(tiny_bert, polarity_folder, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    path = tmp_path / "config.json"
    path.write_text(json.dumps(_tiny_config(tiny_bert, polarity_folder, out, num_train_epochs=1)))
    result = _cli("train", str(path), "--quiet")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "already exists" in result.stderr and "Traceback" not in result.stderr
    assert os.listdir(out) == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"
    ok = _cli("train", str(path), "--quiet", "--overwrite")
    assert ok.returncode == 0, ok.stderr
    assert (out / "model.safetensors").is_file() and not (out / "keep.txt").exists()


def test_docs_name_every_config_key():
    from gradmatch.config.run import (ORIGINAL_IGNORED_KEYS, EvaluateConfig, LmEvalSettings, LoraSettings,
                                      PromptSettings, TrainConfig)

    text = (Path(__file__).parents[1] / "docs" / "config.md").read_text()
    keys = (set(TrainConfig.model_fields) | set(EvaluateConfig.model_fields) | set(ORIGINAL_IGNORED_KEYS)) - {"ignored_keys"}
    keys |= {f"lora.{k}" for k in LoraSettings.model_fields}
    keys |= {f"prompt.{k}" for k in PromptSettings.model_fields} | {f"lm_eval.{k}" for k in LmEvalSettings.model_fields}
    missing = sorted(k for k in keys if f"`{k}`" not in text)
    assert not missing, f"docs/config.md does not describe: {missing}"


def test_docs_examples_are_valid_configs():
    import re

    import yaml

    text = (Path(__file__).parents[1] / "docs" / "config.md").read_text()
    blocks = re.findall(r"```(yaml|json)\n(.*?)```", text, flags=re.S)
    train_cfg = load_train_config(yaml.safe_load(blocks[0][1]))
    assert train_cfg.model_name_or_path == "minilm" and train_cfg.learning_rate == 1e-4 and train_cfg.dropout == 0.0
    eval_cfg = load_evaluate_config(yaml.safe_load(blocks[1][1]))
    assert eval_cfg.metric_path() == Path("results/rt-child.metrics.json")
    fisher_cfg = load_evaluate_config(json.loads(blocks[2][1]))
    assert fisher_cfg.is_fisher() and fisher_cfg.output_dir == "fishers/rt-child"
    (lm_eval,) = [b for kind, b in blocks if kind == "yaml" and b.startswith("# lm-eval.yaml")]
    lm_cfg = load_evaluate_config(yaml.safe_load(lm_eval))
    assert lm_cfg.dataset_name is None and lm_cfg.lm_eval.tasks == ["sentiment_sst2", "sentiment_imdb"]
