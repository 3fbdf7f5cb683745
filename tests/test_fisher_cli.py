"""`gradmatch fisher` on the command line: bad input fails cleanly, torchrun with 2 processes equals 1 process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

TEXTS = ["a fine film", "the worst thing I have ever seen, truly awful from start to end", "ok", "bad bad bad",
         "meh, it was fine I guess, though the second half drags", "x", "an utterly charming, clever and warm comedy",
         "dull", "I laughed, I cried, I left early"]


def _env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    return env


def _fisher(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "gradmatch", "fisher", *map(str, args)], capture_output=True,
                          text=True, env=_env(), cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from conftest import make_tiny_bert
    from transformers import BertConfig, BertModel

    root = tmp_path_factory.mktemp("fisher-cli")
    model = make_tiny_bert(root / "bert", seed=2, num_labels=3)
    data = root / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("".join(json.dumps({"text": t, "label": i % 3}) + "\n" for i, t in enumerate(TEXTS)))
    (data / "test.jsonl").write_text("".join(json.dumps({"text": t, "label": 5}) + "\n" for t in TEXTS[:3]))
    headless = root / "headless"
    BertModel(BertConfig(vocab_size=100, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=8)).save_pretrained(headless)
    return root, model, data, headless


BAD = {
    "wrong split": ({"--split": "validation"}, "has no split 'validation'"),
    "empty data": ({"--split": "train[:0]"}, "is empty"),
    "labels outside the head": ({"--split": "test"}, "label 5 is outside"),
    "no classification head": ({"--split": "train", "--model": "{headless}"}, "no classification head"),
    "existing output": ({"--split": "train", "--out": "{existing}"}, "already exists"),
    "max-examples 0": ({"--split": "train", "--max-examples": "0"}, "--max-examples must be at least 1"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_exit_2_nothing_written(setup, case):
    root, model, data, headless = setup
    existing = root / "existing"
    existing.mkdir(exist_ok=True)
    (existing / "keep.txt").write_text("mine")
    overrides, message = BAD[case]
    out = root / f"out-{case.replace(' ', '-')}"
    options = {"--model": model, "--data": data, "--out": out}
    options.update({k: v.format(headless=headless, existing=existing) for k, v in overrides.items()})
    proc = _fisher(*[x for kv in options.items() for x in kv])
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("gradmatch: error: ") and message in lines[0], lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not out.exists()
    assert sorted(p.name for p in existing.iterdir()) == ["keep.txt"]
    assert not [p for p in root.iterdir() if p.name.startswith(".gradmatch-")]


@pytest.mark.parametrize("seed", ["-1", str(2**32)])
def test_a_seed_numpy_cannot_take_is_refused_before_any_work(setup, tmp_path, capsys, seed):
    from gradmatch.cli import main

    _, model, data, _ = setup
    out = tmp_path / "out"
    assert main(["fisher", "--model", str(model), "--data", str(data), "--split", "train", "--seed", seed,
                 "--out", str(out), "--quiet"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"gradmatch: error: --seed must be an integer from 0 to 2**32 - 1 (4294967295), got {seed}"], lines
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".gradmatch-")]


def test_two_processes_give_the_one_process_result(setup, tmp_path):
    from safetensors.torch import load_file

    _, model, data, _ = setup
    common = ["--model", model, "--data", data, "--split", "train", "--batch-size", "2", "--seed", "4", "--quiet"]
    one = _fisher(*common, "--out", tmp_path / "one")
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "gradmatch", "fisher", *map(str, common), "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, env=_env(), timeout=300)
    assert two.returncode == 0, two.stderr
    meta1 = json.loads((tmp_path / "one" / "hessian" / "fisher.json").read_text())
    meta2 = json.loads((tmp_path / "two" / "hessian" / "fisher.json").read_text())
    assert meta1["num_examples"] == meta2["num_examples"] == len(TEXTS)
    assert meta2["num_processes"] == 2 and meta1["model_fingerprint"] == meta2["model_fingerprint"]
    f1 = load_file(tmp_path / "one" / "hessian" / "model.safetensors")
    f2 = load_file(tmp_path / "two" / "hessian" / "model.safetensors")
    assert f1.keys() == f2.keys()
    scale = max(float(v.abs().max()) for v in f1.values())
    for k in f1:
        torch.testing.assert_close(f2[k], f1[k], rtol=1e-5, atol=1e-7 * scale, msg=k)
    assert sum(float(v.sum()) for v in f1.values()) > 0


def test_one_bar_and_no_library_chatter_unless_verbose(setup, tmp_path):
    """A long command shows its own bar; transformers' and datasets' bars (loading weights, writing shards, mapping
    the data) and informational lines only with -v."""
    root, model, data, _ = setup
    chatter = ("Loading weights", "Writing model shards", "Map", "examples/s")
    plain = _fisher("--model", model, "--data", data, "--split", "train", "--out", tmp_path / "a")
    assert plain.returncode == 0, plain.stderr[-2000:]
    assert "fisher:" in plain.stderr and not [c for c in chatter if c in plain.stderr], plain.stderr[-2000:]
    verbose = _fisher("--model", model, "--data", data, "--split", "train", "--out", tmp_path / "b", "-v")
    assert verbose.returncode == 0, verbose.stderr[-2000:]
    assert [c for c in chatter if c in verbose.stderr], verbose.stderr[-2000:]  # the libraries speak with -v
