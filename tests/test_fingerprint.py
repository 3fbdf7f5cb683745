"""The weights fingerprint (checkpoints.folder_fingerprint): it names the tensors a merge reads — by name, dtype,
shape and every byte — so identical tensors re-saved in another order, sharding or file format keep it, files the
merge does not read do not change it, and a change of a few rows does; records of the older sampled schemes are
still checked by their own algorithms. Each case is built by hand (the bytes written here, not by the code under
test), and the merge-level cases say whether a correct Hessian is accepted and a swapped one refused."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_merge import build_family, gm_config

from gradmatch.checkpoints import fingerprint_matches, folder_fingerprint
from gradmatch.errors import UserError
from gradmatch.merge import merge


def write_safetensors(path: Path, tensors: list[tuple[str, np.ndarray]]) -> Path:
    """A safetensors file written byte by byte: the tensors' data in the order given (the header's keys sorted)."""
    codes = {np.dtype(np.float32): "F32", np.dtype(np.int64): "I64", np.dtype(np.float16): "F16"}
    header, data = {}, b""
    for name, array in tensors:
        raw = np.ascontiguousarray(array).tobytes()
        header[name] = {"dtype": codes[array.dtype], "shape": list(array.shape),
                        "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def _pinned_tensors() -> list[tuple[str, np.ndarray]]:
    return [("a.weight", np.arange(64 * 32, dtype=np.float32).reshape(64, 32) / 7),
            ("b.bias", -np.arange(32, dtype=np.float32)),
            ("c.weight", np.sin(np.arange(12000, dtype=np.float32)).reshape(3000, 4))]


def _folder(root: Path, tensors, order=None) -> Path:
    tensors = list(tensors)
    if order is not None:
        tensors = [tensors[i] for i in order]
    write_safetensors(root / "model.safetensors", tensors)
    (root / "config.json").write_text('{"model_type": "toy"}')
    return root


# --------------------------------------------------------------------------- the tensors, not the files


def test_identical_tensors_in_another_order_sharding_or_format_keep_the_fingerprint(tmp_path):
    tensors = _pinned_tensors()
    reference = folder_fingerprint(_folder(tmp_path / "a", tensors))
    assert folder_fingerprint(_folder(tmp_path / "reversed", tensors, order=[2, 1, 0])) == reference
    sharded = tmp_path / "sharded"
    write_safetensors(sharded / "model-00001-of-00002.safetensors", tensors[2:])
    write_safetensors(sharded / "model-00002-of-00002.safetensors", tensors[:2][::-1])
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {
        "a.weight": "model-00002-of-00002.safetensors", "b.bias": "model-00002-of-00002.safetensors",
        "c.weight": "model-00001-of-00002.safetensors"}}))
    assert folder_fingerprint(sharded) == reference
    as_bin = tmp_path / "bin"
    as_bin.mkdir()
    torch.save({name: torch.from_numpy(array.copy()) for name, array in tensors}, as_bin / "pytorch_model.bin")
    assert folder_fingerprint(as_bin) == reference


def test_files_the_merge_does_not_read_do_not_change_it(tmp_path):
    folder = _folder(tmp_path / "m", _pinned_tensors())
    before = folder_fingerprint(folder)
    torch.save({"learning_rate": torch.tensor(1e-4)}, folder / "training_args.bin")  # Trainer writes one
    (folder / "optimizer.safetensors").write_bytes(b"not read")
    write_safetensors(folder / "head_init" / "model.safetensors", [("x", np.zeros(3, np.float32))])
    assert folder_fingerprint(folder) == before
    # a second layout that transformers does not load (it loads model.safetensors first)
    write_safetensors(folder / "model-00001-of-00001.safetensors", [("a.weight", np.ones((2, 2), np.float32))])
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a.weight": "model-00001-of-00001.safetensors"}}))
    assert folder_fingerprint(folder) == before


@pytest.mark.parametrize("change", ["two middle rows", "one entry", "a dtype", "a name", "a tensor more"])
def test_any_change_of_the_tensors_changes_it(tmp_path, change):
    tensors = _pinned_tensors()
    reference = folder_fingerprint(_folder(tmp_path / "a", tensors))
    name, array = tensors[2]
    array = array.copy()
    if change == "two middle rows":  # far from the start, middle and end samples of the older scheme
        array[1100:1102] += 0.5
        tensors[2] = (name, array)
    elif change == "one entry":
        array[2999, 3] = np.nextafter(array[2999, 3], np.float32(10))
        tensors[2] = (name, array)
    elif change == "a dtype":
        tensors[1] = ("b.bias", np.arange(32, dtype=np.int64))
    elif change == "a name":
        tensors[1] = ("b.bias2", tensors[1][1])
    else:
        tensors.append(("d.bias", np.zeros(4, np.float32)))
    assert folder_fingerprint(_folder(tmp_path / "b", tensors)) != reference


@pytest.mark.parametrize("remembered", [False, True])
def test_a_file_rewritten_in_place_is_read_again(tmp_path, monkeypatch, remembered):
    """A fingerprint is remembered for the state of the files it read (in one process), and only once they have
    settled (file times advance in ticks): a rewrite of the same size in place is seen either way."""
    import time

    from gradmatch.checkpoints import fingerprint

    if remembered:
        monkeypatch.setattr(fingerprint, "_SETTLED_NS", 0)
    tensors = _pinned_tensors()
    folder = _folder(tmp_path / "m", tensors)
    size = (folder / "model.safetensors").stat().st_size
    before = folder_fingerprint(folder)
    assert folder_fingerprint(folder) == before
    if remembered:
        assert any(key[0] == str(folder.resolve()) for key in fingerprint._MEMO)
        time.sleep(0.05)  # past a tick of the file times
    tensors[0] = (tensors[0][0], tensors[0][1] + 1)
    _folder(folder, tensors)
    assert (folder / "model.safetensors").stat().st_size == size
    assert folder_fingerprint(folder) != before


# --------------------------------------------------------------------------- older records


def test_records_of_the_previous_scheme_written_by_the_released_code_are_checked(tmp_path):
    """gradmatch's previous per-tensor scheme (sha256-tensors:) on this hand-written folder, as the released code
    (commit 4b399cd) computed it, and the per-file scheme (sha256:) before it: both still checked by their own
    algorithms, and still telling another folder apart."""
    folder = _folder(tmp_path / "m", _pinned_tensors())
    released = "sha256-tensors:104606aedea53d9cea2a677ee9e92fdeb83e422bd8628a153648cbbc998e259d"
    legacy = "sha256:f786ad85de7b7da7db7c9d91cbcdba1f5b2d5742ab84de144d4257b8aed86c53"
    assert fingerprint_matches(folder, released) and fingerprint_matches(folder, legacy)
    other = _folder(tmp_path / "other", _pinned_tensors()[:2])
    assert not fingerprint_matches(other, released) and not fingerprint_matches(other, legacy)


# --------------------------------------------------------------------------- in a merge


def _record(hessian: Path, model: Path) -> None:
    """A fisher.json naming ``model``'s weights, as `gradmatch fisher` writes it."""
    (hessian / "fisher.json").write_text(json.dumps({"estimator": "sampled",
                                                     "weights_fingerprint": folder_fingerprint(model)}))


def _recorded_family(root: Path) -> dict:
    fam = build_family(root, T=2)
    _record(fam["parent_hessian"] / "hessian", fam["parent"])
    for child, hessian in zip(fam["children"], fam["hessians"]):
        _record(hessian, child)
    return fam


@pytest.mark.parametrize("resave", ["another order", "two shards", "training_args.bin beside it"])
def test_correct_hessians_are_accepted_after_the_model_is_saved_again(tmp_path, resave):
    fam = _recorded_family(tmp_path / "fam")
    merge(gm_config(fam), tmp_path / "before", progress=False)
    parent = Path(fam["parent"])
    tensors = load_file(parent / "model.safetensors")
    if resave == "another order":
        (parent / "model.safetensors").unlink()
        write_safetensors(parent / "model.safetensors", [(k, tensors[k].numpy()) for k in sorted(tensors, reverse=True)])
    elif resave == "two shards":
        (parent / "model.safetensors").unlink()
        names = sorted(tensors)
        shards = {"model-00001-of-00002.safetensors": names[:2], "model-00002-of-00002.safetensors": names[2:]}
        for shard, part in shards.items():
            save_file({k: tensors[k] for k in part}, parent / shard, metadata={"format": "pt"})
        (parent / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {}, "weight_map": {k: shard for shard, part in shards.items() for k in part}}))
    else:
        torch.save({"seed": torch.tensor(0)}, parent / "training_args.bin")
    merge(gm_config(fam), tmp_path / "after", progress=False)
    assert load_file(tmp_path / "after" / "model.safetensors").keys() == tensors.keys()
    for name, value in load_file(tmp_path / "before" / "model.safetensors").items():
        assert torch.equal(load_file(tmp_path / "after" / "model.safetensors")[name], value), name


def _rows_family(root: Path) -> dict:
    """A parent with a 4096 × 16 embedding and a child that differs from it in two rows of it (a trained token),
    bytes 64000-64127 of 262144: away from the start, middle and end samples of the older scheme. Each with a
    Hessian recording its model."""
    g = torch.Generator().manual_seed(0)
    parent = {"emb.weight": torch.randn(4096, 16, generator=g), "layer.weight": torch.randn(16, 16, generator=g)}
    child = dict(parent, **{"emb.weight": parent["emb.weight"].clone()})
    child["emb.weight"][1000:1002] += 0.25
    out = {}
    for name, tensors in (("parent", parent), ("child", child)):
        folder = root / name
        folder.mkdir(parents=True)
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        (folder / "config.json").write_text('{"model_type": "toy"}')
        hessian = root / f"{name}-fisher" / "hessian"
        hessian.mkdir(parents=True)
        save_file({k: torch.rand(v.shape, generator=g) for k, v in tensors.items()}, hessian / "model.safetensors",
                  metadata={"format": "pt"})
        (hessian / "config.json").write_text('{"model_type": "toy"}')
        _record(hessian, folder)
        out[name], out[f"{name}_hessian"] = folder, root / f"{name}-fisher"
    return out


def test_a_swapped_hessian_of_a_child_that_differs_in_a_few_rows_is_refused(tmp_path):
    fam = _rows_family(tmp_path)
    swapped = {"method": "gradient_matching", "base": str(fam["parent"]), "base_hessian": str(fam["child_hessian"]),
               "base_hessian_scale": 10, "parameters": {"delta_0": 1e-12},
               "models": [{"model": str(fam["child"]), "hessian": str(fam["parent_hessian"]), "hessian_scale": 5}]}
    with pytest.raises(UserError, match="base_hessian .* was computed on another model than .*parent"):
        merge(swapped, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    right = {**swapped, "base_hessian": str(fam["parent_hessian"]),
             "models": [{"model": str(fam["child"]), "hessian": str(fam["child_hessian"]), "hessian_scale": 5}]}
    merge(right, tmp_path / "ok", progress=False)
