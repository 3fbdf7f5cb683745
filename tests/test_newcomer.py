"""A newcomer's path: Hessians checked against their models, children whose config changes the function, what a
merge records, options anywhere on the command line, -q that is quiet, and errors that say what to pass."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from conftest import make_tiny_bert, write_jsonl

TEXTS = ["a wonderful film", "terrible and boring", "i loved every minute", "awful acting, bad plot",
         "great fun", "not worth the time", "brilliant and moving", "dull"]


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "gradmatch", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=cwd)


def _child(parent, folder, seed):
    shutil.copytree(parent, folder)
    weights = load_file(folder / "model.safetensors")
    g = torch.Generator().manual_seed(seed)
    save_file({k: v + 0.02 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
               for k, v in weights.items()}, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "training_metadata.json").write_text(json.dumps({"num_train_examples": 8}))
    return folder


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A tiny BERT parent, two children and the Fishers of all three, as gradmatch fisher writes them."""
    from gradmatch.fisher import run_fisher

    root = tmp_path_factory.mktemp("newcomer")
    parent = make_tiny_bert(root / "parent", seed=0)
    (parent / "training_metadata.json").write_text(json.dumps({"num_train_examples": 20}))
    children = [_child(parent, root / f"child{i}", seed=i + 1) for i in range(2)]
    data = write_jsonl(root / "data.jsonl", [{"text": t, "label": i % 2} for i, t in enumerate(TEXTS)])
    fishers = [run_fisher(str(m), str(data), "train", out=root / f"f-{m.name}", progress=False)
               for m in [parent, *children]]
    return {"root": root, "parent": parent, "children": children, "fishers": fishers, "data": data}


def _config(fam, hessians=None):
    hessians = hessians or fam["fishers"]
    return {"method": "gradient_matching", "base": str(fam["parent"]), "base_hessian": str(hessians[0]),
            "models": [{"model": str(c), "hessian": str(h)} for c, h in zip(fam["children"], hessians[1:])]}


def test_a_swapped_hessian_is_refused_unless_told(family, tmp_path):
    swapped = [family["fishers"][1], family["fishers"][0], family["fishers"][2]]  # the parent's and a child's
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(_config(family, swapped)))
    refused = _cli("merge", tmp_path / "m.yaml", tmp_path / "out", "-q")
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode == 2 and len(lines) == 1, refused.stderr
    assert "was computed on another model than" in lines[0] and str(family["parent"]) in lines[0]
    assert not (tmp_path / "out").exists()
    allowed = _cli("merge", tmp_path / "m.yaml", tmp_path / "out", "-q", "--no-check-hessians")
    assert allowed.returncode == 0, allowed.stderr


def test_hessians_without_a_fingerprint_pass_with_a_note(family, tmp_path):
    legacy = tmp_path / "legacy"
    shutil.copytree(family["fishers"][1], legacy)
    (legacy / "hessian" / "fisher.json").unlink()  # as the original code writes them
    hessians = [family["fishers"][0], legacy, family["fishers"][2]]
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(_config(family, hessians)))
    result = _cli("merge", tmp_path / "m.yaml", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert "has no weights_fingerprint" in result.stderr


@pytest.mark.parametrize("key, value, other", [("hidden_act", "relu", None),
                                               ("id2label", {"0": "positive", "1": "negative"},
                                                {"0": "negative", "1": "positive"})])
def test_a_child_whose_config_changes_the_function_is_refused(family, tmp_path, key, value, other):
    """Another activation than the parent's; labels in another order than the other child's (the parent names none)."""
    children = []
    for i, setting in enumerate([value, other]):
        child = tmp_path / f"child{i}"
        shutil.copytree(family["children"][i], child)
        if setting is not None:
            config = json.loads((child / "config.json").read_text())
            config[key] = setting
            (child / "config.json").write_text(json.dumps(config))
        children.append(child)
    spec = {"method": "task_arithmetic", "base": str(family["parent"]),
            "models": [{"model": str(children[0])}, {"model": str(children[1])}]}
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(spec))
    refused = _cli("merge", tmp_path / "m.yaml", tmp_path / "out")
    assert refused.returncode == 2 and f"has {key}" in refused.stderr and "--allow-config-mismatch" in refused.stderr
    assert _cli("merge", tmp_path / "m.yaml", tmp_path / "out", "--allow-config-mismatch", "-q").returncode == 0


def test_a_key_only_one_config_spells_out_is_not_compared(family, tmp_path):
    """A child saved by another transformers version writes defaults its parent's config omits (MiniLM's config has
    no add_cross_attention; a child trained from it says false): merged, not refused."""
    child = tmp_path / "newer-child"
    shutil.copytree(family["children"][0], child)
    config = json.loads((child / "config.json").read_text())
    config["a_key_the_parent_does_not_have"] = False
    (child / "config.json").write_text(json.dumps(config))
    spec = {"method": "task_arithmetic", "base": str(family["parent"]), "models": [{"model": str(child)}]}
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(spec))
    result = _cli("merge", tmp_path / "m.yaml", tmp_path / "out", "-q")
    assert result.returncode == 0, result.stderr


def test_the_merge_records_absolute_inputs_fingerprints_scale_sources_and_its_config(family, tmp_path):
    from gradmatch.checkpoints import folder_fingerprint

    spec = _config(family)
    spec["models"][0]["hessian_scale"] = 5
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(spec))
    os.symlink(family["parent"], tmp_path / "parent-link")
    spec["base"] = "parent-link"  # relative, through a link
    (tmp_path / "rel.yaml").write_text(yaml.safe_dump(spec))
    assert _cli("merge", "rel.yaml", "out", "-q", cwd=tmp_path).returncode == 0
    record = json.loads((tmp_path / "out" / "merge.json").read_text())
    assert record["inputs"]["base"] == {"path": str(family["parent"].resolve()),
                                        "fingerprint": folder_fingerprint(family["parent"])}
    assert record["scale_sources"] == {"models[0]": "config", "models[1]": "training_metadata.json",
                                       "base": "training_metadata.json"}
    assert (tmp_path / "out" / "merge.yaml").read_text() == (tmp_path / "rel.yaml").read_text()


def test_options_may_come_between_the_positionals(family, tmp_path):
    (tmp_path / "m.yaml").write_text(yaml.safe_dump({"method": "task_arithmetic", "base": str(family["parent"]),
                                                     "models": [{"model": str(c)} for c in family["children"]]}))
    result = _cli("merge", tmp_path / "m.yaml", "--out-dtype", "float16", tmp_path / "merged", "-q")
    assert result.returncode == 0, result.stderr
    assert all(v.dtype == torch.float16 for v in load_file(tmp_path / "merged" / "model.safetensors").values()
               if v.is_floating_point())


@pytest.mark.slow
def test_quiet_fisher_and_train_print_only_their_last_line(family, tmp_path):
    fisher = _cli("fisher", "--model", family["parent"], "--data", family["data"], "--split", "train", "--out",
                  tmp_path / "f", "-q")
    assert fisher.returncode == 0 and fisher.stderr == "", fisher.stderr
    assert fisher.stdout.strip().splitlines() == [f"Fisher written to {tmp_path / 'f'}/hessian"]
    (tmp_path / "t.yaml").write_text(yaml.safe_dump({"model_name_or_path": str(family["parent"]),
                                                     "dataset_name": str(family["data"]),
                                                     "output_dir": str(tmp_path / "t"), "max_input_length": 16}))
    train = _cli("train", tmp_path / "t.yaml", "-q")
    assert train.returncode == 0 and train.stderr == "", train.stderr
    assert train.stdout.strip().splitlines() == [f"trained model written to {tmp_path / 't'}"]


def test_the_original_flags_zero_denominator_error_says_what_to_pass(family, tmp_path):
    zero = tmp_path / "zero"
    shutil.copytree(family["fishers"][0], zero)
    weights = load_file(zero / "hessian" / "model.safetensors")
    save_file({k: torch.zeros_like(v) for k, v in weights.items()}, zero / "hessian" / "model.safetensors")
    children = ",".join(str(c) for c in family["children"])
    result = _cli("merge", "--pretrained-model-name-or-path", family["parent"], "--pretrained_hessian_path", zero,
                  "--ft-model-name-or-paths", children, "--ft_hessian_paths", f"{zero},{zero}", "--out-model-path",
                  tmp_path / "out", "--no-check-hessians")
    assert result.returncode == 2
    line = result.stderr.strip().splitlines()[-1]
    assert "δ defaults to 0 and every N to 1" in line and "--delta_0 1e-12" in line and "--scaling_factor_pt" in line


def test_errors_do_not_repeat_the_program_name():
    result = _cli("merge", "--precision", "int8")
    assert result.returncode == 2
    assert result.stderr.startswith("gradmatch: error: merge: argument --precision") and "gradmatch: error: gradmatch" \
        not in result.stderr


def test_pad_token_id_matters_only_to_classifiers():
    """gradmatch train gives a causal LM without a pad token one (its config then says pad_token_id 0 where the
    parent's says null): a language model's logits do not depend on it, so its child is merged; a decoder
    classifier pools at the last non-pad token, so there a different pad_token_id is refused."""
    from types import SimpleNamespace

    from gradmatch.errors import UserError
    from gradmatch.engine.plan import _check_same_function

    def ckpt(arch, pad, role):
        return SimpleNamespace(config={"architectures": [arch], "model_type": "gpt2", "pad_token_id": pad,
                                       "n_embd": 16}, role=role, folder=f"/{role}")

    _check_same_function(ckpt("GPT2LMHeadModel", None, "base"), ckpt("GPT2LMHeadModel", 0, "child"))
    with pytest.raises(UserError, match="has pad_token_id 0"):
        _check_same_function(ckpt("GPT2ForSequenceClassification", None, "base"),
                             ckpt("GPT2ForSequenceClassification", 0, "child"))
    with pytest.raises(UserError, match="has n_embd 32"):  # the other keys are still compared
        other = ckpt("GPT2LMHeadModel", 0, "child")
        other.config["n_embd"] = 32
        _check_same_function(ckpt("GPT2LMHeadModel", None, "base"), other)
