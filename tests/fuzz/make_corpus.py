"""Write the seed corpus of the fuzzers (tests/fuzz/corpus/): small valid and broken safetensors files and
configs of every kind. Rerun after changing it: `python tests/fuzz/make_corpus.py`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import save

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: pipeline_helpers

CORPUS = Path(__file__).resolve().parent / "corpus"


def _raw(header: dict, data: bytes = b"") -> bytes:
    body = json.dumps(header).encode()
    return len(body).to_bytes(8, "little") + body + data


def safetensors_seeds() -> dict[str, bytes]:
    g = torch.Generator().manual_seed(0)
    seeds = {
        "small_f32": save({"w": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g)}, metadata={"format": "pt"}),
        "dtypes": save({"f16": torch.ones(2, 2, dtype=torch.float16), "bf16": torch.ones(3, dtype=torch.bfloat16),
                        "i64": torch.arange(5), "u8": torch.arange(4, dtype=torch.uint8),
                        "bool": torch.tensor([True, False]), "f64": torch.zeros(1, dtype=torch.float64)}),
        "scalar_and_empty": save({"s": torch.tensor(3.5), "e": torch.zeros(0, 4)}),
        "no_tensors": save({}, metadata={"format": "pt"}),
        "bert_like": save({"bert.embeddings.word_embeddings.weight": torch.randn(30, 8, generator=g),
                           "bert.embeddings.position_ids": torch.arange(16).unsqueeze(0),
                           "classifier.weight": torch.randn(2, 8, generator=g), "classifier.bias": torch.zeros(2)}),
        "huge_claim": _raw({"w": {"dtype": "F32", "shape": [1 << 20, 1 << 20], "data_offsets": [0, 4 << 40]}}, bytes(64)),
        "length_overflow": (1 << 63).to_bytes(8, "little") + b'{"w": {}}',
        "offsets_overlap": _raw({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                 "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(12)),
        "gap": _raw({"a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]},
                     "b": {"dtype": "U8", "shape": [2], "data_offsets": [4, 6]}}, bytes(6)),
        "unknown_dtype": _raw({"a": {"dtype": "F12", "shape": [1], "data_offsets": [0, 4]}}, bytes(4)),
        "truncated": save({"w": torch.randn(8, 8, generator=g)})[:-50],
        "not_json": b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!",
    }
    deep = b"[" * 5000 + b"]" * 5000
    seeds["deep_json"] = len(deep).to_bytes(8, "little") + deep
    return seeds


def config_seeds() -> dict[str, bytes]:
    from pipeline_helpers import TINY

    merge = {"method": "gradient_matching", "base": "parent", "base_hessian": "fisher-parent", "base_hessian_scale": 2000,
             "models": [{"model": "child0", "hessian": "hessian0", "weight": 1.0, "hessian_scale": 500},
                        {"model": "child1", "hessian": "hessian1", "parameters": {"weight": 0.5}}],
             "parameters": {"delta_0": 1e-12}, "out_dtype": "float32"}
    train = {"model_name_or_path": "minilm", "dataset_name": "imdb", "dataset_train_split": "train[:20%]",
             "output_dir": "out", "learning_rate": 2e-5, "num_train_epochs": 1, "per_device_train_batch_size": 16,
             "lr_scheduler": "cosine", "warmup_steps": 10, "max_input_length": 128, "seed": 0, "max_output_length": 8,
             "lora": {"r": 4, "alpha": 8}}
    evaluate = {"model_name_or_path": "minilm", "dataset_name": "sst2", "dataset_test_split": "test[100:600]",
                "output_dir": "eval", "per_device_eval_batch_size": 32}
    fisher = {"method": "sequence_classification_squared_gradients", "model_name_or_path": "m", "dataset_name": "imdb",
              "per_device_eval_batch_size": 1, "track_fim": True, "output_dir": "f"}
    seeds = {
        "merge.yaml": yaml.safe_dump(merge, sort_keys=False).encode(),
        "merge.json": json.dumps(merge).encode(),
        "ties.yaml": b"method: ties\nbase: p\nmodels:\n  - model: a\n    weight: 1\n  - {model: b, weight: 0.5}\nparameters: {density: 0.3}\n",
        "train.json": json.dumps(train, indent=1).encode(),
        "evaluate.yaml": yaml.safe_dump(evaluate).encode(),
        "fisher.json": json.dumps(fisher).encode(),
        "experiment.yaml": yaml.safe_dump(TINY, sort_keys=False).encode(),
        "anchors.yaml": b"base: &p parent\nmethod: task_arithmetic\nmodels: [{model: *p}]\n",
        "int_key.yaml": b"1: a\nmodel_name_or_path: m\n",
        "python_tag.yaml": b"!!python/object/apply:os.system ['true']\n",
        "list.json": b"[1, 2, 3]",
        "empty.yaml": b"",
    }
    return seeds


def main() -> None:
    for kind, seeds, ext in (("safetensors", safetensors_seeds(), ".safetensors"), ("config", config_seeds(), "")):
        folder = CORPUS / kind
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in seeds.items():
            assert len(data) < 100_000, name
            (folder / (name + ext)).write_bytes(data)
        print(f"{len(seeds)} seeds in {folder}")


if __name__ == "__main__":
    main()
