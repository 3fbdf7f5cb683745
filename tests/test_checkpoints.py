"""Checkpoint I/O: validated safetensors headers, sharded and .bin reading, sharded writing, non-weight files."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from gradmatch.checkpoints import (
    Checkpoint,
    ShardedWriter,
    copy_non_weight_files,
    find_hessian_folder,
    parse_size,
    read_safetensors_header,
)
from gradmatch.errors import UserError


def tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "emb.weight": torch.randn(40, 6, generator=g),
        "layer.bias": torch.randn(6, generator=g),
        "ids": torch.arange(7),
        "half": torch.randn(3, 3, generator=g).to(torch.bfloat16),
    }


def raw_file(path, header: dict, data: bytes = b"", claimed: int | None = None):
    body = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body) if claimed is None else claimed) + body + data)
    return path


def test_header_gives_names_shapes_dtypes_in_file_order(tmp_path):
    save_file(tensors(), tmp_path / "m.safetensors")
    infos = read_safetensors_header(tmp_path / "m.safetensors")
    assert set(infos) == set(tensors())
    assert infos["emb.weight"].shape == (40, 6) and infos["emb.weight"].dtype == torch.float32
    assert infos["ids"].dtype == torch.int64 and not infos["ids"].is_floating
    assert infos["half"].dtype == torch.bfloat16 and infos["half"].numel == 9


def test_truncated_file_is_reported(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file(tensors(), path)
    data = path.read_bytes()
    path.write_bytes(data[:-50])
    with pytest.raises(UserError, match=r"truncated.*'(emb\.weight|layer\.bias|ids|half)'"):
        read_safetensors_header(path)
    path.write_bytes(data[:5])
    with pytest.raises(UserError, match="only 5 bytes"):
        read_safetensors_header(path)


def test_header_claiming_a_huge_tensor_is_rejected_before_reading(tmp_path):
    huge = 10**6 * 10**6
    path = raw_file(tmp_path / "x.safetensors", {"w": {"dtype": "F32", "shape": [10**6, 10**6], "data_offsets": [0, 4 * huge]}}, b"\0" * 16)
    with pytest.raises(UserError, match=r"truncated or corrupt: tensor 'w' ends at byte 4000000000000"):
        read_safetensors_header(path)
    path = raw_file(tmp_path / "y.safetensors", {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, claimed=2**40)
    with pytest.raises(UserError, match="header claims 1099511627776 bytes"):
        read_safetensors_header(path)


@pytest.mark.parametrize(
    "header, message",
    [
        ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, "needs 8 bytes but its offsets span 4"),
        ({"w": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]}}, "unknown dtype 'Q7'"),
        ({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, "corrupt: tensor 'w' has shape"),
        ({"w": {"dtype": "F32"}}, "header entry of tensor 'w' is malformed"),
    ],
)
def test_bad_headers(tmp_path, header, message):
    path = raw_file(tmp_path / "bad.safetensors", header, b"\0" * 8)
    with pytest.raises(UserError, match=message):
        read_safetensors_header(path)


def test_header_that_is_not_json(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", 6) + b"{nope!" + b"\0" * 8)
    with pytest.raises(UserError, match="not valid JSON"):
        read_safetensors_header(path)


def test_sharded_writer_round_trip(tmp_path):
    ts = tensors()
    writer = ShardedWriter(tmp_path, max_shard_bytes=200)
    for name, t in ts.items():
        writer.add(name, t)
    files = writer.finish()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert [f.name for f in files][-1] == "model.safetensors.index.json"
    shards = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    # emb.weight (960 B) exceeds the limit and gets a shard alone; bias (24 B), ids (56 B), half (18 B) share one
    assert shards == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert index["weight_map"]["emb.weight"] == shards[0]
    assert {index["weight_map"][k] for k in ("layer.bias", "ids", "half")} == {shards[1]}
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in ts.values())
    assert set(index["weight_map"]) == set(ts)
    ckpt = Checkpoint(tmp_path, "test")
    for name, t in ts.items():
        assert torch.equal(ckpt.read(name), t)
    assert torch.equal(ckpt.read("emb.weight", slice(10, 13)), ts["emb.weight"][10:13])
    assert not list(tmp_path.glob(".shard-*"))


def test_single_shard_is_model_safetensors(tmp_path):
    writer = ShardedWriter(tmp_path, max_shard_bytes=10**9)
    for name, t in tensors().items():
        writer.add(name, t)
    assert [f.name for f in writer.finish()] == ["model.safetensors"]
    assert not (tmp_path / "model.safetensors.index.json").exists()
    loaded = load_file(tmp_path / "model.safetensors")
    assert all(torch.equal(loaded[k], v) for k, v in tensors().items())


def test_bin_checkpoint_is_read_with_weights_only(tmp_path):
    torch.save(tensors(), tmp_path / "pytorch_model.bin")
    ckpt = Checkpoint(tmp_path, "bin model")
    assert ckpt.layout == "pytorch_model.bin"
    assert torch.equal(ckpt.read("emb.weight", slice(0, 2)), tensors()["emb.weight"][:2])

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"w": torch.zeros(2), "x": Evil()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(UserError, match="not a plain tensor file"):
        Checkpoint(tmp_path, "bin model")


def test_sharded_bin_with_index(tmp_path):
    ts = tensors()
    torch.save({k: ts[k] for k in ("emb.weight", "ids")}, tmp_path / "pytorch_model-00001-of-00002.bin")
    torch.save({k: ts[k] for k in ("layer.bias", "half")}, tmp_path / "pytorch_model-00002-of-00002.bin")
    weight_map = {"emb.weight": "pytorch_model-00001-of-00002.bin", "ids": "pytorch_model-00001-of-00002.bin",
                  "layer.bias": "pytorch_model-00002-of-00002.bin", "half": "pytorch_model-00002-of-00002.bin"}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    ckpt = Checkpoint(tmp_path, "m")
    assert all(torch.equal(ckpt.read(k), v) for k, v in ts.items())


def test_index_naming_a_missing_shard(tmp_path):
    save_file(tensors(), tmp_path / "model-00001-of-00002.safetensors")
    weight_map = {k: "model-00001-of-00002.safetensors" for k in tensors()} | {"extra": "model-00002-of-00002.safetensors"}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(UserError, match="names shard model-00002-of-00002.safetensors which does not exist"):
        Checkpoint(tmp_path, "m")


def test_folders_that_are_not_models(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        Checkpoint(tmp_path / "nowhere", "base model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="is not a model folder"):
        Checkpoint(tmp_path / "empty", "base model")
    (tmp_path / "empty" / "adapter_config.json").write_text("{}")
    with pytest.raises(UserError, match="is a LoRA/PEFT adapter"):
        Checkpoint(tmp_path / "empty", "models[0]")


def test_hessian_folder_layouts(tmp_path):
    (tmp_path / "out" / "hessian").mkdir(parents=True)
    save_file({"w": torch.ones(2)}, tmp_path / "out" / "hessian" / "model.safetensors")
    assert find_hessian_folder(tmp_path / "out") == tmp_path / "out" / "hessian"
    assert find_hessian_folder(tmp_path / "out" / "hessian") == tmp_path / "out" / "hessian"


def test_copy_non_weight_files(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "1_Pooling").mkdir(parents=True)
    (src / "hessian").mkdir()
    dst.mkdir()
    for name in ("config.json", "tokenizer.json", "vocab.txt", "preprocessor_config.json", "generation_config.json"):
        (src / name).write_bytes(f"{name} \x00 bytes".encode())
    (src / "1_Pooling" / "config.json").write_text("{}")
    for name in ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "tf_model.h5",
                 "training_metadata.json", "model-00001-of-00002.safetensors", "optimizer.pt", "rng_state.pth",
                 "training_args.bin", "trainer_state.json"):
        (src / name).write_text("weights")
    (src / "hessian" / "model.safetensors").write_text("weights")
    copy_non_weight_files(src, dst)
    copied = sorted(str(p.relative_to(dst)) for p in dst.rglob("*") if p.is_file())
    assert copied == ["1_Pooling/config.json", "config.json", "generation_config.json", "preprocessor_config.json",
                      "tokenizer.json", "vocab.txt"]
    assert (dst / "vocab.txt").read_bytes() == (src / "vocab.txt").read_bytes()


@pytest.mark.parametrize("text, size", [("5GB", 5 * 10**9), ("500MB", 5 * 10**8), ("2GiB", 2 * 2**30), ("1000", 1000), (42, 42)])
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["five", "0", "-3MB", "5XB"])
def test_parse_size_rejects(text):
    with pytest.raises(UserError):
        parse_size(text)
