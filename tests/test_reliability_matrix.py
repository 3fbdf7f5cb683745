"""The bad-input matrix over every command (merge, fisher, train, evaluate, run, report, mismatch): each case
gets exit status 2, exactly one line on stderr naming the problem and the file/key, no traceback, and nothing
written or overwritten anywhere. Kinds the per-module tests already cover are not repeated here (see
docs/reliability.md for the whole list, theirs and these)."""

from __future__ import annotations

import fcntl
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from gradmatch.cli import main

from conftest import make_tiny_bert, write_jsonl as _jsonl
from pipeline_helpers import tiny, write_experiment
from test_merge import build_family, gm_config
from test_security import snapshot

TEXTS = ["a fine film", "the worst thing ever", "ok", "bad bad bad", "charming and warm", "dull", "I laughed", "meh"]




def _perturb(src: Path, dst: Path, seed: int, metadata: dict | None = None) -> Path:
    shutil.copytree(src, dst)
    g = torch.Generator().manual_seed(seed)
    weights = load_file(dst / "model.safetensors")
    save_file({k: v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
               for k, v in weights.items()}, dst / "model.safetensors", metadata={"format": "pt"})
    if metadata:
        (dst / "training_metadata.json").write_text(json.dumps(metadata))
    return dst


@dataclass
class World:
    """Read-only inputs shared by every case (a case breaks copies in its own tmp folder)."""

    root: Path
    bert: Path
    data: Path
    fam: dict
    merge_yaml: Path
    merged: Path
    children: list[Path]
    run: Path
    experiment: Path
    adam_child: Path


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    from gradmatch.merge import merge

    root = tmp_path_factory.mktemp("world")
    bert = make_tiny_bert(root / "bert", seed=3)
    data = root / "data"
    _jsonl(data / "train.jsonl", [{"text": t, "label": i % 2} for i, t in enumerate(TEXTS)])
    _jsonl(data / "test.jsonl", [{"text": t, "label": (i + 1) % 2} for i, t in enumerate(TEXTS)])
    fam = build_family(root / "fam", T=2)
    merge_yaml = root / "merge.yaml"
    merge_yaml.write_text(yaml.safe_dump(gm_config(fam)))
    meta = {"num_train_examples": 8, "dataset_name": str(data)}
    children = [_perturb(bert, root / f"child{i}", seed=i, metadata=meta) for i in range(2)]
    merged = merge({"method": "task_arithmetic", "base": str(bert),
                    "models": [{"model": str(c), "weight": 0.5} for c in children]}, root / "merged", progress=False)
    # a finished run folder, as `gradmatch run` leaves it (one evaluated model), for `gradmatch report`
    run = root / "run"
    (run / "work" / "eval").mkdir(parents=True)
    (run / "work" / "eval" / "metrics.json").write_text(json.dumps(
        {"label": "parent", "kind": "model", "tasks": {"a": {"accuracy": 0.75, "macro_f1": 0.7, "num_examples": 8}}}))
    spec = {"kind": "report", "params": {"experiment": "toy", "tasks": ["a"],
                                         "entries": [{"key": "model/parent", "label": "parent", "kind": "model"}]},
            "inputs": {"model/parent": str(run / "work" / "eval")}}
    (run / "jobs").mkdir()
    (run / "jobs" / "report-1.json").write_text(json.dumps(spec))
    (run / "plan.json").write_text(json.dumps({"jobs": [{"kind": "report", "spec": str(run / "jobs" / "report-1.json")}]}))
    experiment = write_experiment(root / "tiny.yaml")
    from gradmatch.train import train

    adam_child = train({"model_name_or_path": str(bert), "dataset_name": str(data), "output_dir": str(root / "adam"),
                        "save_hessian": "adam", "num_train_epochs": 1, "per_device_train_batch_size": 4,
                        "max_input_length": 16}, quiet=True)
    return World(root, bert, data, fam, merge_yaml, merged, children, run, experiment, adam_child)


@dataclass
class Case:
    id: str
    command: str
    build: Callable[[World, Path], list]  # returns argv (words; paths as Path or str)
    words: list[str]  # substrings of the one error line ({tmp} and {world} are replaced)


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _yaml(path: Path, value) -> Path:
    return _write(path, yaml.safe_dump(value))


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _merge_with(w: World, t: Path, **changes) -> list:
    return ["merge", _yaml(t / "m.yaml", gm_config(w.fam, **changes)), t / "out", "--quiet"]


def _child_copy(w: World, t: Path, edit) -> list:
    child = _copy(w.fam["children"][0], t / "child")
    edit(child)
    config = gm_config(w.fam)
    config["models"][0]["model"] = str(child)
    return ["merge", _yaml(t / "m.yaml", config), t / "out", "--quiet"]


def _hessian_int(folder: Path) -> None:
    sd = load_file(folder / "model.safetensors")
    sd["layer.bias"] = torch.zeros(8, dtype=torch.int32)
    save_file(sd, folder / "model.safetensors")


def _hessian_copy(w: World, t: Path, edit) -> list:
    hessian = _copy(w.fam["hessians"][1], t / "hessian")
    edit(hessian)
    config = gm_config(w.fam)
    config["models"][1]["hessian"] = str(hessian)
    return ["merge", _yaml(t / "m.yaml", config), t / "out", "--quiet"]


def _sharded_missing(child: Path) -> None:
    (child / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"emb.weight": "model-00001-of-00002.safetensors"}}))
    (child / "model.safetensors").unlink()


def _lora(child: Path) -> None:
    for f in child.iterdir():
        f.unlink()
    (child / "adapter_config.json").write_text("{}")
    (child / "adapter_model.safetensors").write_bytes(b"")


def _mpnet_config(t: Path) -> Path:
    """A classifier folder of an architecture without GradientCheckpointingLayer blocks (MPNet): its config alone."""
    from transformers import MPNetConfig

    folder = t / "mpnet"
    MPNetConfig(vocab_size=30527, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                architectures=["MPNetForSequenceClassification"], num_labels=2).save_pretrained(folder)
    return folder


def _fisher(w: World, t: Path, **flags) -> list:
    options = {"--model": w.bert, "--data": w.data, "--split": "train", "--out": t / "fisher-out"}
    options.update(flags)
    argv = ["fisher", "--quiet"]
    for k, v in options.items():
        if v is not None:
            argv += [k, v]
    return argv


def _train(w: World, t: Path, name="train.json", **changes) -> list:
    config = {"model_name_or_path": str(w.bert), "dataset_name": str(w.data), "output_dir": str(t / "trained"),
              "num_train_epochs": 1, "per_device_train_batch_size": 4, "max_input_length": 16}
    config.update(changes)
    config = {k: v for k, v in config.items() if v is not None}
    path = t / name
    path.write_text(json.dumps(config) if name.endswith(".json") else yaml.safe_dump(config))
    return ["train", path, "--quiet"]


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _link(target: Path, link: Path) -> Path:
    link.symlink_to(target, target_is_directory=True)
    return link


def _evaluate(w: World, t: Path, **changes) -> list:
    config = {"model_name_or_path": str(w.bert), "dataset_name": str(w.data), "output_dir": str(t / "evaluated")}
    config.update(changes)
    config = {k: v for k, v in config.items() if v is not None}
    return ["evaluate", _write(t / "eval.json", json.dumps(config)), "--quiet"]


def _run(w: World, t: Path, *extra, **changes) -> list:
    return ["run", write_experiment(t / "exp.yaml", tiny(**changes)), "--workdir", t / "workdir", "--dry-run", *extra]


def _locked_run(w: World, t: Path) -> list:
    workdir = t / "workdir"
    workdir.mkdir()
    fh = open(workdir / ".gradmatch-run.lock", "w")
    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    _HELD.append(fh)  # released after the case
    return ["run", w.experiment, "--workdir", workdir]


_HELD: list = []
_PROGRESS = re.compile(r"\d+%\|.*\|")


def _report_copy(w: World, t: Path, edit, *extra) -> list:
    run = _copy(w.run, t / "run")
    spec = run / "jobs" / "report-1.json"
    text = spec.read_text().replace(str(w.run), str(run))
    spec.write_text(text)
    (run / "plan.json").write_text((run / "plan.json").read_text().replace(str(w.run), str(run)))
    edit(run)
    return ["report", run, *extra]


def _mismatch(w: World, t: Path, *extra, merged=None) -> list:
    return ["mismatch", merged or w.merged, "--split", "train", *map(str, extra)]


def _merge_record(w: World, t: Path, text: str) -> Path:
    merged = _copy(w.merged, t / "merged")
    (merged / "merge.json").write_text(text)
    return merged


def _ivon_child_without_hessian(w: World, t: Path) -> Path:
    """A child trained with IVON but without save_hessian: a model folder with no hessian/ inside."""
    child = _copy(w.adam_child, t / "ivon-child")
    shutil.rmtree(child / "hessian")
    meta = json.loads((child / "training_metadata.json").read_text())
    meta["config"].update(optimizer_name="IVON", save_hessian=None)
    meta["hessian"] = None
    (child / "training_metadata.json").write_text(json.dumps(meta))
    return child


def _quantized(child: Path) -> None:
    config = json.loads((child / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8"}
    (child / "config.json").write_text(json.dumps(config))


def _regmean_grams(w: World, t: Path, tensors: dict, positions: dict) -> list:
    """A RegMean merge of the toy family whose every child has the Gram file given (tensors, gram.json positions)."""
    from safetensors.torch import save_file

    models = []
    for i, child in enumerate(w.fam["children"]):
        folder = t / f"gram{i}"
        folder.mkdir(parents=True)
        save_file(tensors, folder / "gram.safetensors", metadata={"format": "pt"})
        (folder / "gram.json").write_text(json.dumps({"examples": 4, "positions": positions}))
        models.append({"model": str(child), "gram": str(folder)})
    config = {"method": "regmean", "base": str(w.fam["parent"]), "models": models}
    return ["merge", _yaml(t / "m.yaml", config), t / "out", "--quiet"]


def _one_tensor_child_swap(w: World, t: Path) -> list:
    """A parent and a child that differ in one 1 MB tensor (past the old fingerprint's samples), Hessians swapped."""
    from test_merge_hardening import _big_family

    fam = _big_family(t / "big")
    config = {"method": "gradient_matching", "base": str(fam["parent"]), "base_hessian": str(fam["child_hessian"]),
              "base_hessian_scale": 10, "parameters": {"delta_0": 1e-12},
              "models": [{"model": str(fam["child"]), "hessian": str(fam["parent_hessian"]), "hessian_scale": 5}]}
    return ["merge", _yaml(t / "m.yaml", config), t / "out", "--quiet"]


def _float64_hessian(value: float):
    """An edit of a Hessian folder: its tensors stored in float64, emb.weight[5, 3] = ``value``."""
    def edit(folder: Path) -> None:
        sd = {k: v.double() for k, v in load_file(folder / "model.safetensors").items()}
        sd["emb.weight"][5, 3] = value
        save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    return edit


def _adapter_beside(child: Path) -> None:
    """A LoRA adapter saved into the child's own folder, beside its model.safetensors."""
    (child / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2}))
    save_file({"base_model.model.layer.lora_A.weight": torch.zeros(2, 8)}, child / "adapter_model.safetensors")


def _rows_child_swap(w: World, t: Path) -> list:
    """A parent and a child two rows of one tensor apart (a trained token, past the sampled scheme's samples),
    Hessians swapped."""
    from test_fingerprint import _rows_family

    fam = _rows_family(t / "rows")
    config = {"method": "gradient_matching", "base": str(fam["parent"]), "base_hessian": str(fam["child_hessian"]),
              "base_hessian_scale": 10, "parameters": {"delta_0": 1e-12},
              "models": [{"model": str(fam["child"]), "hessian": str(fam["parent_hessian"]), "hessian_scale": 5}]}
    return ["merge", _yaml(t / "m.yaml", config), t / "out", "--quiet"]


def _conv1d_gram_wrong_size(w: World, t: Path) -> list:
    """RegMean of GPT-2 children with hand-made Grams (Conv1D layers, in × out), one of them of the output size."""
    from conftest import make_tiny_lm
    from test_hostile_pass import _gram_layers

    parent = make_tiny_lm(t / "gpt2", family="gpt2")
    tensors = {name: torch.eye(size) for name, (size, _) in _gram_layers(parent).items()}
    tensors["transformer.h.0.mlp.c_proj.weight"] = torch.eye(16)  # in × out = 64 × 16: its Gram is 64 × 64
    folder = t / "gram"
    folder.mkdir()
    save_file(tensors, folder / "gram.safetensors", metadata={"format": "pt"})
    config = {"method": "regmean", "base": str(parent), "models": [{"model": str(parent), "gram": str(folder)}]}
    return ["merge", _yaml(t / "m.yaml", config), t / "out", "--quiet"]


#: Merge cases refused while the values stream (block by block, after the output's hidden folder was made beside it).
_REFUSED_WHILE_MERGING = {"merge: a float64 Hessian entry of -1e-300", "merge: a float64 Hessian beyond float32's range",
                          "merge: an all-zero RegMean Gram of a layer that saw no input",
                          "merge: every RegMean Gram of a layer zero"}

CASES = [
    # ---------------------------------------------------------------- merge (kinds test_merge.py does not cover)
    Case("merge: config file missing", "merge", lambda w, t: ["merge", t / "nope.yaml", t / "out"],
         ["config file", "nope.yaml", "does not exist"]),
    Case("merge: config is not YAML", "merge", lambda w, t: ["merge", _write(t / "m.yaml", "method: [unclosed\n"), t / "out"],
         ["m.yaml", "not valid YAML"]),
    Case("merge: config is a list", "merge", lambda w, t: ["merge", _write(t / "m.yaml", "- a\n- b\n"), t / "out"],
         ["m.yaml", "must hold a mapping", "list"]),
    Case("merge: config is a folder", "merge", lambda w, t: ["merge", t, t / "out"], ["config file", "is a folder"]),
    Case("merge: no children", "merge", lambda w, t: _merge_with(w, t, models=[]), ["m.yaml", "models", "at least 1"]),
    Case("merge: output is a file", "merge",
         lambda w, t: ["merge", w.merge_yaml, _write(t / "out.txt", "mine"), "--overwrite", "--quiet"],
         ["out.txt", "exists and is not a folder"]),
    Case("merge: output replaces the base model", "merge",
         lambda w, t: ["merge", w.merge_yaml, w.fam["parent"], "--overwrite", "--quiet"],
         ["would replace the input base model", "parent"]),
    Case("merge: bad shard size", "merge", lambda w, t: ["merge", w.merge_yaml, t / "out", "--max-shard-size", "5 parsecs"],
         ["cannot read the size", "5 parsecs"]),
    Case("merge: zero block rows", "merge", lambda w, t: ["merge", w.merge_yaml, t / "out", "--block-rows", "0"],
         ["--block-rows must be positive"]),
    Case("merge: output inside a child's folder", "merge",
         lambda w, t: ["merge", w.merge_yaml, Path(w.fam["children"][0]) / "merged", "--quiet"],
         ["lies inside the input models[0]", "would change the input models[0]"]),
    Case("merge: guard bound 1e308", "merge",
         lambda w, t: _merge_with(w, t, parameters={"delta_0": 1e-12, "max_update_ratio": 1e308}),
         ["m.yaml", "max_update_ratio", "less than or equal to 1000"]),
    Case("merge: mergekit merge_method a list", "merge",
         lambda w, t: ["merge", _yaml(t / "m.yaml", {"merge_method": ["ties"], "base_model": str(w.fam["parent"]),
                                                     "models": [{"model": str(w.fam["children"][0])}]}), t / "out"],
         ["m.yaml", "merge_method", "not list"]),
    Case("merge: zero threads", "merge", lambda w, t: ["merge", w.merge_yaml, t / "out", "--threads", "0"],
         ["threads must be positive"]),
    Case("merge: fused kernel of a method without one", "merge",
         lambda w, t: _merge_with(w, t, method="fisher_average", parameters={}) + ["--kernel", "fused"],
         ["fisher_average has no fused kernel", "gradient_matching, task_arithmetic", "--kernel reference"]),
    Case("merge: fused kernel in float64", "merge",
         lambda w, t: ["merge", w.merge_yaml, t / "out", "--kernel", "fused", "--precision", "float64"],
         ["fused kernels compute in float32 on a CPU", "float64"]),
    Case("merge: unknown kernel", "merge", lambda w, t: ["merge", w.merge_yaml, t / "out", "--kernel", "numba"],
         ["--kernel", "invalid choice", "numba"]),
    Case("merge: unknown precision", "merge", lambda w, t: ["merge", w.merge_yaml, t / "out", "--precision", "int8"],
         ["--precision", "invalid choice", "int8"]),
    Case("merge: the removed clamp flag", "merge",
         lambda w, t: _merge_with(w, t, method="task_arithmetic", parameters={}) + ["--clamp-denominator", "1e-6"],
         ["--clamp-denominator was replaced", "max_update_ratio"]),
    Case("merge: negative weights in an average", "merge",
         lambda w, t: _merge_with(w, t, method="fisher_average", parameters={}, models=[
             {"model": str(w.fam["children"][0]), "hessian": str(w.fam["hessians"][0]), "weight": -1.0}]),
         ["m.yaml", "non-negative weights"]),
    Case("merge: shard index names a missing shard", "merge", lambda w, t: _child_copy(w, t, _sharded_missing),
         ["child/model.safetensors.index.json", "model-00001-of-00002.safetensors", "does not exist"]),
    Case("merge: child config.json corrupt", "merge",
         lambda w, t: _child_copy(w, t, lambda c: (c / "config.json").write_text("{model_type: toy")),
         ["child/config.json", "not valid JSON"]),
    Case("merge: training_metadata.json corrupt", "merge",
         lambda w, t: _child_copy(w, t, lambda c: (c / "training_metadata.json").write_text('{"num_train_examples": "many"}')),
         ["child/training_metadata.json", "num_train_examples must be a positive integer"]),
    Case("merge: a LoRA adapter as a child", "merge", lambda w, t: _child_copy(w, t, _lora),
         ["models[0]", "LoRA/PEFT adapter", "merge_and_unload"]),
    Case("merge: integer Hessian", "merge", lambda w, t: _hessian_copy(w, t, _hessian_int),
         ["'layer.bias'", "hessian/model.safetensors", "not floating point"]),
    # ---------------------------------------------------------------- fisher
    Case("fisher: model missing", "fisher", lambda w, t: _fisher(w, t, **{"--model": t / "nomodel"}),
         ["nomodel", "does not exist"]),
    Case("fisher: data missing", "fisher", lambda w, t: _fisher(w, t, **{"--data": t / "nodata"}), ["nodata"]),
    Case("fisher: batch size 0", "fisher", lambda w, t: _fisher(w, t, **{"--batch-size": "0"}),
         ["--batch-size must be at least 1"]),
    Case("fisher: unknown estimator", "fisher", lambda w, t: _fisher(w, t, **{"--estimator": "exact"}),
         ["--estimator", "invalid choice", "exact"]),
    Case("fisher: output is a file", "fisher", lambda w, t: _fisher(w, t, **{"--out": _write(t / "f.txt", "mine")}),
         ["f.txt", "already exists"]),
    Case("fisher: split syntax", "fisher", lambda w, t: _fisher(w, t, **{"--split": "train[::2]"}), ["train[::2]"]),
    Case("fisher: images for a text model", "fisher", lambda w, t: _fisher(w, t, **{"--data": "digits-original"}),
         ["digits-original", "holds an image column", "text-classification model"]),
    Case("fisher: truncated model weights", "fisher",
         lambda w, t: _fisher(w, t, **{"--model": _truncated_model(w, t)}), ["cannot load the weights", "model"]),
    Case("fisher: no --split", "fisher", lambda w, t: _fisher(w, t, **{"--split": None}),
         ["the following arguments are required: --split"]),
    Case("fisher: --shard outside torchrun", "fisher", lambda w, t: _fisher(w, t) + ["--shard"],
         ["--shard", "WORLD_SIZE is not set"]),
    Case("fisher: --out-dtype int8", "fisher", lambda w, t: _fisher(w, t, **{"--out-dtype": "int8"}),
         ["--out-dtype", "invalid choice: 'int8'"]),
    Case("fisher: --shard with --data generated", "fisher",
         lambda w, t: _fisher(w, t, **{"--data": "generated", "--split": None, "--examples": "2"}) + ["--shard"],
         ["--shard does not apply to --data generated"]),
    Case("fisher: --gradient-checkpointing on a model without recomputable layers", "fisher",
         lambda w, t: _fisher(w, t, **{"--model": _mpnet_config(t)}) + ["--gradient-checkpointing"],
         ["no layers transformers can recompute", "drop --gradient-checkpointing"]),
    # ---------------------------------------------------------------- train
    Case("train: unknown save_hessian", "train", lambda w, t: _train(w, t, save_hessian="fisher"),
         ["train.json", "save_hessian", "'adam' or 'ivon'"]),
    Case("train: save_hessian ivon with AdamW", "train", lambda w, t: _train(w, t, save_hessian="ivon"),
         ["save_hessian ivon needs optimizer_name IVON"]),
    Case("train: save_hessian with lora", "train", lambda w, t: _train(w, t, save_hessian="adam", lora={"r": 2}),
         ["save_hessian adam with lora", "adapters only"]),
    Case("train: unknown optimizer", "train", lambda w, t: _train(w, t, optimizer_name="sgd"),
         ["unknown optimizer", "sgd", "AdamW or IVON"]),
    Case("merge: second-moment Hessian of another model", "merge",
         lambda w, t: ["merge", _yaml(t / "m.yaml", {
             "method": "gradient_matching", "base": str(w.bert), "base_hessian": str(w.adam_child),
             "models": [{"model": str(w.adam_child), "hessian": str(w.adam_child), "weight": 1.0}],
             "base_hessian_scale": 8}), t / "out", "--quiet"],
         ["base_hessian", "computed on another model", "--no-check-hessians"]),
    Case("merge: IVON state missing (a child trained without save_hessian as its own Hessian)", "merge",
         lambda w, t: ["merge", _yaml(t / "m.yaml", {
             "method": "gradient_matching", "base": str(w.bert), "base_hessian": str(w.adam_child),
             "models": [{"model": str(c := _ivon_child_without_hessian(w, t)), "hessian": str(c), "weight": 1.0}],
             "base_hessian_scale": 8}), t / "out", "--quiet"],
         ["ivon-child is a model trained by gradmatch train and holds no hessian/ folder",
          "save_hessian: ivon saves IVON's", "gradmatch fisher --model"]),
    Case("merge: a quantized checkpoint as a child", "merge", lambda w, t: _child_copy(w, t, _quantized),
         ["models[0]", "child is a quantized checkpoint (quantization_config: fp8)", "codes and scales"]),
    Case("merge: RegMean Grams without a Linear layer", "merge",
         lambda w, t: _regmean_grams(w, t, {"emb.weight": torch.eye(8)}, {"emb.weight": 4, "layer.weight": 3}),
         ["gram0", "has no Gram for 1 Linear layer of the base model (e.g. layer.weight)", "average it silently"]),
    Case("merge: RegMean Gram of a layer that saw no input", "merge",
         lambda w, t: _regmean_grams(w, t, {"emb.weight": torch.eye(8)}, {"emb.weight": 4, "layer.weight": 0}),
         ["layer.weight", "it saw no input: 0 positions in gram.json"]),
    Case("merge: an empty RegMean Gram", "merge", lambda w, t: _regmean_grams(w, t, {}, {}),
         ["gram0", "holds no Gram matrices", "would average every tensor"]),
    Case("merge: Hessians swapped between a parent and a one-tensor child", "merge", _one_tensor_child_swap,
         ["base_hessian", "child-fisher", "was computed on another model than", "--no-check-hessians"]),
    # ---------------------------------------------------------------- the fresh hostile pass's violations, fixed
    Case("merge: Hessians swapped between a parent and a child two rows apart", "merge", _rows_child_swap,
         ["base_hessian", "child-fisher", "was computed on another model than", "--no-check-hessians"]),
    Case("merge: a float64 Hessian entry of -1e-300", "merge", lambda w, t: _hessian_copy(w, t, _float64_hessian(-1e-300)),
         ["'emb.weight'", "hessian/model.safetensors", "has negative values (down to -1e-300)"]),
    Case("merge: a float64 Hessian beyond float32's range", "merge",
         lambda w, t: _hessian_copy(w, t, _float64_hessian(1e300)),
         ["the computation overflows float32, the compute precision", "holds 1e+300", "--precision float64 merges it"]),
    Case("merge: an all-zero RegMean Gram of a layer that saw no input", "merge",
         lambda w, t: _regmean_grams(w, t, {"emb.weight": torch.eye(8), "layer.weight": torch.zeros(8, 8)},
                                     {"emb.weight": 4, "layer.weight": 0}),
         ["gram0", "the Gram of layer.weight is all zero", "0 input positions", "saw no input"]),
    Case("merge: every RegMean Gram of a layer zero", "merge",
         lambda w, t: _regmean_grams(w, t, {"emb.weight": torch.eye(8), "layer.weight": torch.zeros(8, 8)},
                                     {"emb.weight": 4, "layer.weight": 4}),
         ["'layer.weight'", "is zero", "an epsilon cannot help"]),
    Case("merge: a Conv1D Gram of the output's size", "merge", _conv1d_gram_wrong_size,
         ["the Gram of transformer.h.0.mlp.c_proj.weight is 16 × 16", "input size is 64",
          "(a Conv1D weight, stored in × out)"]),
    Case("merge: a child holding a LoRA adapter beside its weights", "merge", lambda w, t: _child_copy(w, t, _adapter_beside),
         ["models[0]", "holds a full model (model.safetensors) and a LoRA/PEFT adapter", "merge_and_unload"]),
    Case("fisher: generated data for a classifier", "fisher",
         lambda w, t: _fisher(w, t, **{"--data": "generated", "--split": None, "--examples": "4"}),
         ["--data generated samples sequences from a causal language model", "bert"]),
    Case("train: config missing", "train", lambda w, t: ["train", t / "none.json"], ["none.json", "does not exist"]),
    Case("train: config is not JSON", "train", lambda w, t: ["train", _write(t / "c.json", "{'lr': 1}")],
         ["c.json", "not valid JSON"]),
    Case("train: negative learning rate", "train", lambda w, t: _train(w, t, learning_rate=-1e-3),
         ["train.json", "learning_rate", "greater than 0"]),
    Case("train: learning rate not a number", "train", lambda w, t: _train(w, t, learning_rate="fast"),
         ["train.json", "learning_rate", "valid number"]),
    Case("train: evaluation without a validation split", "train", lambda w, t: _train(w, t, evaluation_strategy="epoch"),
         ["train.json", "needs dataset_val_split"]),
    Case("train: min_lr with a linear schedule", "train", lambda w, t: _train(w, t, min_lr=1e-6),
         ["min_lr", "needs lr_scheduler cosine"]),
    Case("train: output is a file", "train", lambda w, t: _train(w, t, output_dir=str(_write(t / "o.txt", "mine"))),
         ["o.txt", "already exists"]),
    Case("train: text data for an image model", "train", lambda w, t: _train(w, t, model_name_or_path="vit-digits"),
         ["holds a text column", "vit-digits", "image-classification model"]),
    Case("train: a key and its alias", "train", lambda w, t: _train(w, t, lr_scheduler="linear", lr_scheduler_type="cosine"),
         ["train.json", "lr_scheduler or lr_scheduler_type, not both"]),
    Case("train: the Fisher method", "train", lambda w, t: _train(w, t, method="sequence_classification_squared_gradients"),
         ["train.json", "gradmatch evaluate"]),
    Case("train: validation split out of range", "train", lambda w, t: _train(w, t, dataset_val_split="test[20:40]"),
         ["out of range"]),
    Case("train: integer key", "train", lambda w, t: ["train", _write(t / "c.yaml", "1: 2\nmodel_name_or_path: m\n")],
         ["c.yaml", "key 1 is not a name"]),
    # ---------------------------------------------------------------- evaluate
    Case("evaluate: unknown method", "evaluate", lambda w, t: _evaluate(w, t, method="regression"),
         ["eval.json", "unknown method 'regression'"]),
    Case("evaluate: metrics and predictions in one file", "evaluate",
         lambda w, t: _evaluate(w, t, output_dir=None, metric_output_file=str(t / "m.json"),
                                prediction_output_file=str(t / "m.json")), ["same file", "m.json"]),
    Case("evaluate: metrics and predictions one file through '..'", "evaluate",
         lambda w, t: _evaluate(w, t, output_dir=None, metric_output_file=str(t / "m.json"),
                                prediction_output_file=str(_mkdir(t / "sub") / ".." / "m.json")),
         ["two outputs of this evaluation are the same file", "the metrics file", "the predictions file"]),
    Case("evaluate: metrics and predictions one file through a linked folder", "evaluate",
         lambda w, t: _evaluate(w, t, output_dir=None, metric_output_file=str(t / "m.json"),
                                prediction_output_file=str(_link(t, t / "alias") / "m.json")),
         ["two outputs of this evaluation are the same file", "alias"]),
    Case("evaluate: metrics under a file", "evaluate",
         lambda w, t: _evaluate(w, t, output_dir=None, metric_output_file=str(_write(t / "f", "x") / "m.json")),
         ["m.json", "is not a folder"]),
    Case("evaluate: metrics exist", "evaluate",
         lambda w, t: _evaluate(w, t, output_dir=str(_write(t / "ev" / "metrics.json", "old").parent)),
         ["metrics.json already exists", "--overwrite"]),
    Case("evaluate: model missing", "evaluate", lambda w, t: _evaluate(w, t, model_name_or_path=str(t / "gone")),
         ["gone", "does not exist"]),
    Case("evaluate: Fisher output exists", "evaluate",
         lambda w, t: _evaluate(w, t, method="sequence_classification_squared_gradients",
                                output_dir=str(_write(t / "fo" / "keep.txt", "x").parent)), ["fo", "already exists"]),
    Case("evaluate: split the data lacks", "evaluate", lambda w, t: _evaluate(w, t, dataset_test_split="validation"),
         ["validation"]),
    Case("evaluate: config is a list", "evaluate", lambda w, t: ["evaluate", _write(t / "e.json", "[1, 2]")],
         ["e.json", "must hold a mapping"]),
    # ---------------------------------------------------------------- run
    Case("run: experiment is not YAML", "run", lambda w, t: ["run", _write(t / "e.yaml", "parent: {name: a\n"), "--dry-run"],
         ["e.yaml", "not valid YAML"]),
    Case("run: empty experiment", "run", lambda w, t: ["run", _write(t / "e.yaml", ""), "--dry-run"],
         ["e.yaml", "must hold a mapping", "NoneType"]),
    Case("run: unknown nested key", "run", lambda w, t: _run(w, t, resources={"train": {"cpus": 4}}),
         ["exp.yaml", "resources.train.cpus", "unknown key"]),
    Case("run: no model", "run", lambda w, t: ["run", _yaml(t / "e.yaml", {k: v for k, v in tiny().items() if k != "model"}),
                                              "--dry-run"], ["e.yaml", "model", "Field required"]),
    Case("run: unknown merge parameter", "run",
         lambda w, t: _run(w, t, merges=[{"method": "gradient_matching", "parameters": {"delta": 1.0}}]),
         ["exp.yaml", "merges.0", "parameters.delta", "not a parameter of gradient_matching"]),
    Case("run: merge parameter out of range", "run",
         lambda w, t: _run(w, t, merges=[{"method": "ties", "parameters": {"density": 1.5}}]),
         ["exp.yaml", "merges.0", "parameters.density", "less than or equal to 1"]),
    Case("run: negative resources", "run", lambda w, t: _run(w, t, resources={"default": {"mem_mb": -1}}),
         ["exp.yaml", "resources.default.mem_mb", "greater than 0"]),
    # a Fisher job of several processes (torchrun on one node; docs/pipeline.md "Fisher jobs of several processes")
    Case("run: zero processes", "run", lambda w, t: _run(w, t, resources={"fisher": {"processes": 0}}),
         ["exp.yaml", "resources.fisher.processes", "greater than or equal to 1"]),
    Case("run: processes on a train job", "run", lambda w, t: _run(w, t, resources={"train": {"processes": 2}}),
         ["exp.yaml", "resources.train", "processes applies to fisher jobs only"]),
    Case("run: shard for every kind of job", "run", lambda w, t: _run(w, t, resources={"default": {"shard": True}}),
         ["exp.yaml", "resources.default", "shard applies to fisher jobs only"]),
    Case("run: shard over one process", "run", lambda w, t: _run(w, t, resources={"fisher": {"shard": True}}),
         ["exp.yaml", "fisher.shard: true", "set fisher.processes to 2 or more"]),
    Case("run: fewer GPUs than processes", "run",
         lambda w, t: _run(w, t, resources={"fisher": {"processes": 4, "gpus": 2}}),
         ["exp.yaml", "fisher.gpus: 2 with fisher.processes: 4", "one GPU of its own"]),
    Case("run: a data-free Fisher sharded", "run",
         lambda w, t: _run(w, t, fisher={"data": "generated"}, resources={"fisher": {"processes": 2, "shard": True}}),
         ["exp.yaml", "resources.fisher.shard: true with fisher.data: generated", "cannot be sharded"]),
    Case("run: a merge's data-free H_0 sharded", "run",
         lambda w, t: _run(w, t, merges=[{"method": "gradient_matching", "base_hessian": "generated"}],
                           resources={"fisher": {"processes": 2, "shard": True}}),
         ["exp.yaml", "merges: gradient_matching: base_hessian: generated", "cannot be sharded"]),
    Case("run: unknown Fisher storage dtype", "run", lambda w, t: _run(w, t, fisher={"out_dtype": "int8"}),
         ["exp.yaml", "fisher.out_dtype", "'bfloat16'"]),
    Case("run: shard on a model without the rules (dry run)", "run",
         lambda w, t: _run(w, t, resources={"fisher": {"processes": 2, "shard": True}}),
         ["fisher/parent: resources.fisher.shard", "vit.embeddings (ViTEmbeddings)", "drop shard"]),
    Case("run: zero jobs", "run", lambda w, t: _run(w, t, "--jobs", "0"), ["--jobs must be positive"]),
    Case("run: unbalanced snakemake args", "run", lambda w, t: _run(w, t, "--snakemake-args", "--foo 'bar"),
         ["--snakemake-args", "quotation"]),
    Case("run: run folder is a file", "run",
         lambda w, t: ["run", w.experiment, "--workdir", _write(t / "wd", "mine"), "--dry-run"],
         ["run folder", "wd", "not a folder"]),
    Case("run: another run holds the folder", "run", _locked_run, ["another gradmatch run", "workdir"]),
    Case("run: a data set missing (dry run)", "run",
         lambda w, t: _run(w, t, children=[{"name": "rot", "dataset": "nosuchset"}]),
         ["unknown data set 'nosuchset'"]),
    Case("run: task name with a path", "run",
         lambda w, t: _run(w, t, children=[{"name": "../../etc", "dataset": "digits-rot90"}]),
         ["exp.yaml", "children.0.name", "letters, digits"]),
    # names that would be one Snakemake rule or folder, or too long for a file name; relative paths (resolved against
    # the current directory when the experiment is read: the error names the absolute path that was looked for)
    Case("run: task names one rule apart", "run",
         lambda w, t: _run(w, t, children=[{"name": "rot-90", "dataset": "digits-rot90"},
                                           {"name": "rot_90", "dataset": "digits-rot90"}]),
         ["task names must be unique", "'rot-90' and 'rot_90' differ only in"]),
    Case("run: task names apart only in case", "run",
         lambda w, t: _run(w, t, children=[{"name": "Rot90", "dataset": "digits-rot90"},
                                           {"name": "rot90", "dataset": "digits-rot90"}]),
         ["task names must be unique", "'Rot90' and 'rot90'"]),
    Case("run: merge names one rule apart", "run",
         lambda w, t: _run(w, t, merges=[{"method": "task_arithmetic", "name": "ta-1"},
                                         {"method": "task_arithmetic", "name": "ta.1", "alphas": [2.0]}]),
         ["merge names", "'ta-1' and 'ta.1'"]),
    Case("run: classifier named like the parent", "run",
         lambda w, t: _run(w, t, attribute_classifier={"name": "Parent", "dataset": "digits-rot90"}),
         ["attribute_classifier.name 'Parent'", "'parent'"]),
    Case("run: a child named multitask", "run",
         lambda w, t: _run(w, t, children=[{"name": "multitask", "dataset": "digits-rot90"}]),
         ["task 'multitask'", "data/multitask-train"]),
    Case("run: task name too long", "run",
         lambda w, t: _run(w, t, children=[{"name": "x" * 230, "dataset": "digits-rot90"}]),
         ["exp.yaml", "children.0.name", "230 characters; at most 128"]),
    Case("run: experiment name too long", "run", lambda w, t: _run(w, t, name="e" * 200),
         ["exp.yaml", "name", "200 characters; at most 128"]),
    Case("run: run folder name too long", "run",
         lambda w, t: ["run", w.experiment, "--workdir", t / ("w" * 300), "--dry-run"],
         ["run folder", "300 bytes", "at most 255"]),
    Case("run: relative model path missing", "run", lambda w, t: _run(w, t, model="./no-such-model-3c9"),
         [f"model {Path.cwd() / 'no-such-model-3c9'} does not exist"]),
    Case("run: relative data file missing", "run",
         lambda w, t: _run(w, t, children=[{"name": "mine", "dataset": "no-such-data-3c9.jsonl"}]),
         [f"data set {Path.cwd() / 'no-such-data-3c9.jsonl'} does not exist"]),
    Case("run: relative extra data missing", "run",
         lambda w, t: _run(w, t, children=[{"name": "mine", "dataset": "digits-rot90",
                                            "extra_train": [{"dataset": "./no-such-extra-3c9"}]}]),
         [f"data set {Path.cwd() / 'no-such-extra-3c9'} does not exist"]),
    Case("run: relative prompts file missing", "run", lambda w, t: _run(
        w, t, model=str(__import__("conftest").make_tiny_lm(t / "lm")), merges=[], multitask=False,
        evaluation={"generation": {"prompts": "no-such-prompts-3c9.txt"}}),
         ["evaluation.generation.prompts", f"prompts file {Path.cwd() / 'no-such-prompts-3c9.txt'} does not exist"]),
    # ---------------------------------------------------------------- report
    Case("report: run folder missing", "report", lambda w, t: ["report", t / "norun"], ["norun", "not a gradmatch run folder"]),
    Case("report: plan.json corrupt", "report",
         lambda w, t: _report_copy(w, t, lambda r: (r / "plan.json").write_text("{not json")),
         ["run/plan.json", "not a readable gradmatch plan"]),
    Case("report: plan.json of another shape", "report",
         lambda w, t: _report_copy(w, t, lambda r: (r / "plan.json").write_text("[1, 2]")),
         ["run/plan.json", "not a readable gradmatch plan"]),
    Case("report: no report job", "report",
         lambda w, t: _report_copy(w, t, lambda r: (r / "plan.json").write_text('{"jobs": []}')),
         ["run/plan.json", "has no report job"]),
    Case("report: report spec missing", "report",
         lambda w, t: _report_copy(w, t, lambda r: (r / "jobs" / "report-1.json").unlink()),
         ["report job of", "cannot be read", "report-1.json"]),
    Case("report: metrics.json corrupt", "report",
         lambda w, t: _report_copy(w, t, lambda r: (r / "work" / "eval" / "metrics.json").write_text("{")),
         ["metrics.json", "cannot read"]),
    Case("report: nothing finished", "report",
         lambda w, t: _report_copy(w, t, lambda r: (r / "work" / "eval" / "metrics.json").unlink()),
         ["nothing in", "has finished yet"]),
    Case("report: --out is a file", "report",
         lambda w, t: _report_copy(w, t, lambda r: None, "--out", str(_write(t / "rep.txt", "mine"))),
         ["rep.txt", "not a folder"]),
    Case("report: --out is someone's folder", "report",
         lambda w, t: _report_copy(w, t, lambda r: None, "--out", str(_write(t / "docs" / "thesis.tex", "mine").parent)),
         ["docs", "already exists and is not a report folder"]),
    # ---------------------------------------------------------------- mismatch
    Case("mismatch: merged folder missing", "mismatch", lambda w, t: _mismatch(w, t, merged=t / "gone"),
         ["gone", "no merge.json"]),
    Case("mismatch: merge.json corrupt", "mismatch",
         lambda w, t: _mismatch(w, t, merged=_merge_record(w, t, '{"models": 3}')), ["merge.json", "not a merge record"]),
    Case("mismatch: wrong number of data sets", "mismatch",
         lambda w, t: _mismatch(w, t, "--data", w.data), ["1 data sets given for 2 children"]),
    Case("mismatch: child without training metadata", "mismatch",
         lambda w, t: _mismatch(w, t, "--children", f"{w.bert},{w.bert}", "--alphas", "0.5,0.5"),
         ["child", "bert", "training_metadata.json", "--data"]),
    Case("mismatch: batch size 0", "mismatch", lambda w, t: _mismatch(w, t, "--batch-size", "0"),
         ["batch size", "must be positive"]),
    Case("mismatch: --out under a file", "mismatch",
         lambda w, t: _mismatch(w, t, "--out", _write(t / "f.txt", "mine") / "m.json"), ["f.txt/m.json", "not one"]),
    Case("mismatch: --out is a folder", "mismatch",
         lambda w, t: _mismatch(w, t, "--out", (t / "outdir").mkdir() or t / "outdir", "--overwrite"),
         ["outdir", "is a folder"]),
    Case("mismatch: child of another architecture", "mismatch",
         lambda w, t: _mismatch(w, t, "--children", f"{_other_bert(t)},{w.children[1]}", "--alphas", "0.5,0.5",
                                "--data", w.data, "--data", w.data), ["have different parameters"]),
    Case("mismatch: split the data lacks", "mismatch",
         lambda w, t: ["mismatch", w.merged, "--split", "validation"], ["validation"]),
    # ---------------------------------------------------------------- issue 25: non-finite results (class 5), settings
    # that contradict (6), outputs as a set (7), what merge.json names (10)
    Case("train: a learning rate that diverges", "train", lambda w, t: _train(w, t, learning_rate=1e30, max_grad_norm=0),
         ["training diverged", "NaN", "learning_rate", "nothing was written"]),
    Case("fisher: model holding NaN", "fisher", lambda w, t: _fisher(w, t, **{"--model": _nan_copy(w.bert, t)}),
         ["nan-model", "holds NaN in 1 tensor", "the Fisher", "nothing was written"]),
    Case("evaluate: model holding NaN", "evaluate",
         lambda w, t: _evaluate(w, t, model_name_or_path=str(_nan_copy(w.bert, t))),
         ["nan-model", "holds NaN", "an evaluation", "nothing was written"]),
    Case("evaluate: greedy decoding with several samples", "evaluate",
         lambda w, t: _lm_evaluate(w, t, do_sample=False, num_samples=2),
         ["eval.json", "generation: num_samples 2 with do_sample false", "one continuation per prompt"]),
    Case("evaluate: a temperature with greedy decoding", "evaluate",
         lambda w, t: _lm_evaluate(w, t, do_sample=False, temperature=0.7),
         ["generation: temperature 0.7 applies to sampling, and do_sample is false"]),
    Case("evaluate: metrics two folders under a file", "evaluate",
         lambda w, t: _evaluate(w, t, output_dir=None, prediction_output_file=str(t / "p.json"),
                                metric_output_file=str(_write(t / "f", "x") / "a" / "b" / "m.json")),
         ["m.json", "f is not a folder"]),
    Case("evaluate: metrics name longer than a file name may be", "evaluate",
         lambda w, t: _evaluate(w, t, output_dir=None, prediction_output_file=str(t / "p.json"),
                                metric_output_file=str(t / ("m" * 300))),
         ["longer than the 255 bytes"]),
    Case("mismatch: a child replaced since the merge", "mismatch", lambda w, t: _mismatch(w, t, merged=_replaced(w, t)),
         ["models[0]", "is not the model", "merge.json records", "--children"]),
    Case("mismatch: a recorded child gone", "mismatch", lambda w, t: _mismatch(w, t, merged=_replaced(w, t, gone=True)),
         ["merge.json names models[0]", "which does not exist", "--children"]),
    Case("mismatch: a weight edited into text", "mismatch",
         lambda w, t: _mismatch(w, t, merged=_edited(w, t, lambda r: r["models"][0].update(weight="half"))),
         ["merge.json", "models.0.weight", "valid number"]),
    Case("mismatch: parameters edited into text", "mismatch",
         lambda w, t: _mismatch(w, t, merged=_edited(w, t, lambda r: r.update(parameters="fast"))),
         ["merge.json", "parameters", "valid dictionary"]),
    Case("mismatch: a record without children", "mismatch",
         lambda w, t: _mismatch(w, t, merged=_edited(w, t, lambda r: r.update(models=[]))),
         ["merge.json", "models", "at least 1 item"]),
    Case("mismatch: --out is the merge record", "mismatch",
         lambda w, t: _mismatch(w, t, "--out", w.merged / "merge.json", "--overwrite"),
         ["--out", "merge.json", "lies inside the merged model"]),
    Case("mismatch: --out is a child's weights", "mismatch",
         lambda w, t: _mismatch(w, t, "--out", w.children[0] / "model.safetensors", "--overwrite"),
         ["--out", "model.safetensors", "lies inside child 1"]),
    Case("mismatch: --out is the run folder", "mismatch",
         lambda w, t: ["mismatch", "--run", w.run, "--out", w.run, "--overwrite"], ["is or contains the run"]),
]


def _nan_copy(model: Path, t: Path) -> Path:
    """A copy of ``model`` with one NaN in its classifier's weight."""
    copy = _copy(model, t / "nan-model")
    weights = load_file(copy / "model.safetensors")
    name = next(k for k in sorted(weights) if "classifier" in k and weights[k].is_floating_point())
    weights[name] = weights[name].clone()
    weights[name].view(-1)[0] = float("nan")
    save_file(weights, copy / "model.safetensors", metadata={"format": "pt"})
    return copy


def _lm_evaluate(w: World, t: Path, **generation) -> list:
    from conftest import make_tiny_lm

    return _evaluate(w, t, model_name_or_path=str(make_tiny_lm(t / "lm")),
                     generation={"prompts": ["the movie"], **generation})


def _edited(w: World, t: Path, edit) -> Path:
    merged = _copy(w.merged, t / "merged")
    record = json.loads((merged / "merge.json").read_text())
    edit(record)
    (merged / "merge.json").write_text(json.dumps(record))
    return merged


def _replaced(w: World, t: Path, gone: bool = False) -> Path:
    """The world's merge with its first child moved to a folder that now holds other weights (or nothing)."""
    other = t / "child0"
    if not gone:
        _perturb(w.children[0], other, seed=11, metadata={"num_train_examples": 8, "dataset_name": str(w.data)})

    def point(record):
        record["models"][0]["model"] = str(other)
        record["inputs"]["models[0]"]["path"] = str(other)

    return _edited(w, t, point)


def _truncated_model(w: World, t: Path) -> Path:
    model = _copy(w.bert, t / "model")
    data = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(data[: len(data) // 2])
    return model


def _other_bert(t: Path) -> Path:
    return make_tiny_bert(t / "other", seed=5, layers=1, with_tokenizer=True)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(world, tmp_path, capfd, case):
    work = tmp_path / "case"
    work.mkdir()
    argv = [str(a) for a in case.build(world, work)]
    before = snapshot(tmp_path), snapshot(world.root)
    capfd.readouterr()
    try:
        rc = main(argv)
    finally:
        while _HELD:
            _HELD.pop().close()
    out, err = capfd.readouterr()
    assert rc == 2, (rc, out[-2000:], err[-3000:])
    lines = err.strip().splitlines()
    if case.command == "mismatch":  # no --quiet: models load (with transformers' progress bars) before late checks
        lines = [line for line in lines if line.strip() and not _PROGRESS.search(line)]
    assert len(lines) == 1, err
    assert lines[0].startswith("gradmatch: error: ") and "Traceback" not in err + out, err
    for word in case.words:
        assert word in lines[0], (word, lines[0])
    after = snapshot(tmp_path), snapshot(world.root)
    if case.id == "run: another run holds the folder":  # the refused run opened the lock file to try it
        before[0].pop("case/workdir/.gradmatch-run.lock"), after[0].pop("case/workdir/.gradmatch-run.lock")
    if case.id == "train: a learning rate that diverges" or case.id in _REFUSED_WHILE_MERGING:  # it worked in a
        before[0].pop("case"), after[0].pop("case")  # hidden folder beside its output (gone now): the case folder's
        # modification time changed
    assert after == before  # nothing written, nothing overwritten


def test_the_matrix_covers_every_command():
    by_command: dict[str, int] = {}
    for case in CASES:
        by_command[case.command] = by_command.get(case.command, 0) + 1
    assert set(by_command) == {"merge", "fisher", "train", "evaluate", "run", "report", "mismatch"}
    assert min(by_command.values()) >= 7 and len(CASES) >= 60, by_command
    assert len({c.id for c in CASES}) == len(CASES)
    doc = (Path(__file__).resolve().parents[1] / "docs" / "reliability.md").read_text()
    missing = [c.id for c in CASES if f"| {c.command} | {c.id.split(': ', 1)[1]} |" not in doc]
    assert not missing, f"not listed in docs/reliability.md: {missing}"
