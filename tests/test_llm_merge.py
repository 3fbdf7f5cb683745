"""LLM-scale merging on tiny checkpoints: the streaming safetensors writer, bf16/fp16 inputs end to end against
a float64 reference, sharded inputs and outputs, the model card, links in model folders, the prefetching reader."""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import gradmatch
from gradmatch.checkpoints import (SAFE_INDEX, Checkpoint, SafetensorsWriter, TensorSpec, copy_non_weight_files,
                                   plan_shards, read_safetensors_header)
from gradmatch.cli import main
from gradmatch.errors import UserError

from test_methods import ref_gradient_matching

# --------------------------------------------------------------------------- the streaming writer


def specs_and_values():
    g = torch.Generator().manual_seed(0)
    values = {
        "embed.weight": torch.randn(37, 6, generator=g).to(torch.bfloat16),
        "norm.weight": torch.randn(6, generator=g),  # float32 after a bf16 tensor: alignment matters
        "odd.weight": torch.randn(3, 3, generator=g).to(torch.float16),  # 18 bytes
        "ids": torch.arange(7),
        "scale": torch.tensor(2.5, dtype=torch.float64),
        "empty": torch.zeros(0, 4),
        "mask": torch.tensor([True, False, True]),
    }
    return [TensorSpec(k, v.dtype, tuple(v.shape)) for k, v in values.items()], values


@pytest.mark.parametrize("max_bytes", [10**9, 100, 1])
def test_streaming_writer_writes_blocks_at_their_offsets(tmp_path, max_bytes):
    specs, values = specs_and_values()
    writer = SafetensorsWriter(tmp_path, specs, max_bytes)
    for spec in specs:  # every tensor in blocks of 5 rows (scalars whole)
        v = values[spec.name]
        if v.dim() == 0:
            writer.write(spec.name, v)
        for start in range(0, v.shape[0] if v.dim() else 0, 5):
            writer.write(spec.name, v[start:start + 5], start)
    files = writer.finish()
    shards = plan_shards(specs, max_bytes)
    if len(shards) == 1:
        assert [f.name for f in files] == ["model.safetensors"]
        assert not (tmp_path / SAFE_INDEX).exists()
    else:
        n = len(shards)
        assert [f.name for f in files] == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)] + [SAFE_INDEX]
        index = json.loads((tmp_path / SAFE_INDEX).read_text())
        assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in values.values())
        assert set(index["weight_map"]) == set(values)
    assert not list(tmp_path.glob(".shard-*"))
    for f in tmp_path.glob("*.safetensors"):
        header = read_safetensors_header(f)  # our validation: offsets, sizes, dtypes
        for info in header.values():  # every tensor aligned to its element size
            assert info.offset % info.dtype.itemsize == 0
        with safe_open(f, "pt") as fh:
            assert fh.metadata() == {"format": "pt"}
            for name in fh.keys():
                assert torch.equal(fh.get_tensor(name), values[name]), name
    ckpt = Checkpoint(tmp_path, "written")
    assert set(ckpt) == set(values)
    # the shard split follows transformers' rule, tensors in the order given
    assert [s.name for shard in shards for s in shard] == list(values)
    if max_bytes == 100:
        assert all(sum(s.nbytes for s in shard) <= 100 or len(shard) == 1 for shard in shards)


def test_streaming_writer_refuses_blocks_out_of_order_or_missing(tmp_path):
    spec = TensorSpec("w", torch.float32, (4, 2))
    writer = SafetensorsWriter(tmp_path, [spec], 10**9)
    with pytest.raises(RuntimeError, match="out of order"):
        writer.write("w", torch.zeros(2, 2), 2)
    with pytest.raises(RuntimeError, match="planned as"):
        writer.write("w", torch.zeros(2, 2, dtype=torch.float64), 0)
    writer.write("w", torch.zeros(2, 2), 0)
    with pytest.raises(RuntimeError, match="not \\(completely\\) written"):
        writer.finish()
    writer.close()


def test_a_parent_in_bf16_gives_a_bf16_output_by_default_and_out_dtype_overrides(tmp_path):
    fam = llama_family(tmp_path / "fam", T=2)
    ta = {"method": "task_arithmetic", "base": str(fam["parent"]), "models": [{"model": str(c)} for c in fam["children"]]}
    out = gradmatch.merge(ta, tmp_path / "bf16", progress=False)
    assert {t.dtype for t in load_dir(out).values() if t.is_floating_point()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text()) == json.loads((fam["parent"] / "config.json").read_text())
    out32 = gradmatch.merge(ta, tmp_path / "f32", progress=False, out_dtype="float32")
    assert {t.dtype for t in load_dir(out32).values() if t.is_floating_point()} == {torch.float32}
    assert json.loads((out32 / "config.json").read_text())["dtype"] == "float32"
    # the bf16 output is the float32 output rounded to bf16 (compute is float32 either way)
    a, b = load_dir(out), load_dir(out32)
    assert all(torch.equal(a[k], b[k].to(torch.bfloat16)) for k in a if a[k].is_floating_point())


# --------------------------------------------------------------------------- bf16/fp16 end to end

LLAMA = {"vocab_size": 96, "hidden_size": 16, "intermediate_size": 40, "num_hidden_layers": 2,
         "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 32, "tie_word_embeddings": False}


def llama_family(root: Path, T: int = 3, seed: int = 0, shard: str = "4KB") -> dict:
    """A tiny bf16 Llama parent saved sharded with an index, T bf16 children near it, Hessians in bf16 and fp16."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**LLAMA)).to(torch.bfloat16)
    model.save_pretrained(root / "parent", max_shard_size=shard)
    (root / "parent" / "README.md").write_text("# the parent's own card\n")
    theta0 = load_dir(root / "parent")
    g = torch.Generator().manual_seed(seed + 1)
    fam = {"parent": root / "parent", "children": [], "hessians": [], "theta0": theta0}
    config = json.loads((root / "parent" / "config.json").read_text())

    def write(folder: Path, tensors: dict) -> Path:
        folder.mkdir(parents=True)
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps(config))
        return folder

    def fisher(dtype):
        return {k: (torch.rand(v.shape, generator=g) ** 2 * 1e-2).to(dtype) for k, v in theta0.items()}

    fam["parent_hessian"] = write(root / "parent-hessian", fisher(torch.float16))
    for t in range(T):
        child = {k: (v.float() + 0.02 * torch.randn(v.shape, generator=g)).to(torch.bfloat16) for k, v in theta0.items()}
        fam["children"].append(write(root / f"child{t}", child))
        fam["hessians"].append(write(root / f"h{t}", fisher(torch.bfloat16 if t % 2 else torch.float16)))
    return fam


def load_dir(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return llama_family(tmp_path_factory.mktemp("llama"))


ALPHAS, N0, NS, DELTA = (1.0, 0.6, 1.4), 900.0, (300.0, 50.0, 120.0), 1e-8


def gm(llama, **extra):
    config = {
        "method": "gradient_matching",
        "base": str(llama["parent"]),
        "base_hessian": str(llama["parent_hessian"]),
        "base_hessian_scale": N0,
        "models": [{"model": str(c), "hessian": str(h), "weight": a, "hessian_scale": n}
                   for c, h, a, n in zip(llama["children"], llama["hessians"], ALPHAS, NS)],
        "parameters": {"delta_0": DELTA},
    }
    config.update(extra)
    return config


def test_bf16_gradient_matching_equals_the_float64_reference(llama, tmp_path):
    out = gradmatch.merge(gm(llama), tmp_path / "out", max_shard_size="3KB", block_rows=5, progress=False)
    # sharded output with transformers' index
    index = json.loads((out / SAFE_INDEX).read_text())
    assert set(index["weight_map"]) == set(llama["theta0"])
    assert all((out / f).is_file() for f in set(index["weight_map"].values()))
    merged = load_dir(out)
    p = llama["theta0"]
    cs = [load_dir(c) for c in llama["children"]]
    f0 = load_dir(llama["parent_hessian"])
    fs = [load_dir(h) for h in llama["hessians"]]
    for name in p:
        assert merged[name].dtype == torch.bfloat16, name
        ref = ref_gradient_matching(p[name], [c[name] for c in cs], f0[name], [f[name] for f in fs], list(ALPHAS),
                                    N0, list(NS), DELTA)
        # float32 compute, then rounded once to bf16: within half a bf16 step (2^-9 relative) of the exact value
        err = (merged[name].double() - ref).abs()
        assert bool((err <= ref.abs() * 2.0**-8 + 1e-30).all()), name
        assert float((merged[name] == ref.to(torch.bfloat16)).double().mean()) > 0.97, name


def test_bf16_output_loads_with_from_pretrained(llama, tmp_path):
    from transformers import AutoModelForCausalLM

    out = gradmatch.merge(gm(llama), tmp_path / "out", max_shard_size="3KB", progress=False)
    model = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert next(model.parameters()).dtype == torch.bfloat16
    merged = load_dir(out)
    for name, param in model.state_dict().items():
        assert torch.equal(param, merged[name]), name


def test_the_merge_never_writes_more_than_a_block_at_once(llama, tmp_path, monkeypatch):
    """Output memory is bounded by the block: the writer never receives a whole large tensor."""
    import gradmatch.checkpoints as c

    sizes = []
    original = c.SafetensorsWriter.write

    def spy(self, name, tensor, first_row=0):
        sizes.append((name, tensor.numel()))
        return original(self, name, tensor, first_row)

    monkeypatch.setattr(c.SafetensorsWriter, "write", spy)
    monkeypatch.setattr(importlib.import_module("gradmatch.engine.blocks"), "DEFAULT_BLOCK_ELEMENTS", 256)
    gradmatch.merge(gm(llama), tmp_path / "out", progress=False)
    embed = LLAMA["vocab_size"] * LLAMA["hidden_size"]
    assert max(n for _, n in sizes) <= 256
    assert sum(n for name, n in sizes if name == "model.embed_tokens.weight") == embed


def test_prefetching_reader_gives_the_same_bytes(llama, tmp_path):
    """The reader thread (used with --device cuda) gives identical output on the CPU, with and without its
    reused buffers, and for whole-tensor methods."""
    a = gradmatch.merge(gm(llama), tmp_path / "a", block_rows=3, progress=False, prefetch=False)
    b = gradmatch.merge(gm(llama), tmp_path / "b", block_rows=3, progress=False, prefetch=True)
    names = sorted(p.name for p in a.glob("*.safetensors"))
    assert names and all((a / n).read_bytes() == (b / n).read_bytes() for n in names)

    from gradmatch.engine.execute import Executor
    from gradmatch.merge import load_merge_config, plan_merge

    plan = plan_merge(load_merge_config(gm(llama)))
    for pinned in (False, True):
        ex = Executor(plan, dict(plan.config.parameters), torch.device("cpu"), torch.float32, 3)
        ex.start_reader(pinned=pinned)
        try:
            got = {name: torch.cat([blk for _, blk in ex.merged_blocks(name, torch.float32)])
                   for name in plan.merged}
        finally:
            ex.close()
        ref = load_dir(gradmatch.merge(gm(llama), tmp_path / f"f32-{pinned}", block_rows=3, progress=False,
                                       out_dtype="float32"))
        assert all(torch.equal(got[k].reshape(ref[k].shape), ref[k]) for k in plan.merged)


def test_blocks_are_larger_on_a_gpu(llama, monkeypatch):
    """On a GPU a block holds about GPU_BLOCK_ELEMENTS entries per input, on the CPU DEFAULT_BLOCK_ELEMENTS
    (planning only: no GPU is needed)."""
    from gradmatch.engine.execute import Executor
    from gradmatch.merge import load_merge_config, plan_merge

    blocks = importlib.import_module("gradmatch.engine.blocks")
    monkeypatch.setattr(blocks, "DEFAULT_BLOCK_ELEMENTS", 64)
    monkeypatch.setattr(blocks, "GPU_BLOCK_ELEMENTS", 256)
    plan = plan_merge(load_merge_config(gm(llama)))
    name = "model.embed_tokens.weight"
    hidden = LLAMA["hidden_size"]
    for device, elements in (("cpu", 64), ("cuda", 256)):
        ex = Executor(plan, dict(plan.config.parameters), torch.device(device), torch.float32, None)
        blocks = ex.row_blocks(name)
        assert all(b.stop - b.start == max(1, elements // hidden) for b in blocks[:-1])
        assert blocks[-1].stop == LLAMA["vocab_size"]


def test_prefetching_reader_with_whole_tensor_methods(llama, tmp_path):
    config = {"method": "ties", "base": str(llama["parent"]), "parameters": {"density": 0.4},
              "models": [{"model": str(c), "weight": w} for c, w in zip(llama["children"], ALPHAS)]}
    a = gradmatch.merge(config, tmp_path / "a", progress=False, prefetch=False, card=False)
    b = gradmatch.merge(config, tmp_path / "b", progress=False, prefetch=True, card=False)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()


def test_prefetching_reader_reports_a_file_truncated_while_merging(llama, tmp_path, capsys):
    child = tmp_path / "child-trunc"
    child.mkdir()
    for f in llama["children"][0].iterdir():
        (child / f.name).write_bytes(f.read_bytes())
    config = gm(llama)
    config["models"][0]["model"] = str(child)

    from gradmatch.engine.execute import Executor
    from gradmatch.merge import load_merge_config, plan_merge

    plan = plan_merge(load_merge_config(config))
    data = (child / "model.safetensors").read_bytes()
    (child / "model.safetensors").write_bytes(data[: len(data) // 2])  # after validation: truncated mid-merge
    ex = Executor(plan, dict(plan.config.parameters), torch.device("cpu"), torch.float32, 3)
    ex.start_reader(pinned=False)
    with pytest.raises(UserError, match="ended early"):
        for name in plan.merged:
            for _ in ex.merged_blocks(name, torch.float32):
                pass
    ex.close()


# --------------------------------------------------------------------------- the model card


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_model_card_names_the_method_formula_and_every_input(llama, tmp_path):
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(gm(llama)))
    assert main(["merge", str(tmp_path / "merge.yaml"), str(tmp_path / "out"), "--quiet", "--out-dtype", "float32"]) == 0
    card = (tmp_path / "out" / "README.md").read_text()
    meta = front_matter(card)
    assert meta["base_model"][0] == str(llama["parent"])
    assert meta["library_name"] == "transformers" and meta["tags"] == ["merge", "gradmatch"]
    assert "the parent's own card" not in card  # the merge's card replaces the parent's README
    assert "gradient_matching" in card and "(H_0 + H_t)" in card
    for path in [llama["parent_hessian"], *llama["children"], *llama["hessians"]]:
        assert str(path) in card
    for alpha, n in zip(ALPHAS, NS):
        assert f"| {alpha:g} | {n:g} |" in card
    assert f"| {N0:g} |" in card and f"`delta_0` = {DELTA:g}" in card
    assert f"gradmatch {gradmatch.__version__}" in card
    assert "gradmatch merge merge.yaml OUT --out-dtype float32" in card
    assert (tmp_path / "merge.yaml").read_text().strip() in card  # the config, as written
    # --no-card: no card of ours (the parent's files are copied as they are)
    assert main(["merge", str(tmp_path / "merge.yaml"), str(tmp_path / "plain"), "--quiet", "--no-card"]) == 0
    assert (tmp_path / "plain" / "README.md").read_text() == "# the parent's own card\n"


def test_model_card_of_a_dict_config_is_its_yaml(llama, tmp_path):
    config = {"method": "task_arithmetic", "base": str(llama["parent"]),
              "models": [{"model": str(c), "weight": 0.3} for c in llama["children"]]}
    out = gradmatch.merge(config, tmp_path / "out", progress=False)
    card = (out / "README.md").read_text()
    text = card.split("```yaml\n")[1].split("```")[0]
    assert yaml.safe_load(text) == config
    assert "θ = θ_0 + λ · Σ_t α_t (θ_t − θ_0) / Z" in card


# --------------------------------------------------------------------------- links in model folders


@contextlib.contextmanager
def captured_warnings(caplog, name: str):
    """caplog for logger ``name`` even where the CLI has stopped gradmatch's loggers from propagating to the root."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.addHandler(caplog.handler)
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.removeHandler(caplog.handler)
        logger.setLevel(level)


def test_copy_non_weight_files_does_not_follow_links_out_of_the_folder(tmp_path, caplog):
    src, dst = tmp_path / "model", tmp_path / "out"
    (src / "sub").mkdir(parents=True)
    dst.mkdir()
    (tmp_path / "secret.txt").write_text("private")
    (src / "config.json").write_text("{}")
    (src / "sub" / "tokenizer.json").write_text("tok")
    os.symlink(src, src / "loop")  # a link to the folder itself: 40 nested copies before
    os.symlink(".", src / "sub" / "here")
    os.symlink(tmp_path / "secret.txt", src / "notes.txt")  # outside: not copied
    os.symlink(src / "config.json", src / "config-link.json")  # inside: copied as a file
    os.symlink(tmp_path, src / "up")
    with captured_warnings(caplog, "gradmatch.checkpoints"):
        copy_non_weight_files(src, dst)
    copied = sorted(str(p.relative_to(dst)) for p in dst.rglob("*"))
    assert copied == ["config-link.json", "config.json", "sub", "sub/tokenizer.json"]
    assert not (dst / "config-link.json").is_symlink()
    assert "outside the model folder" in caplog.text and "link to a folder" in caplog.text


def test_hub_cache_snapshots_keep_their_links_into_blobs(tmp_path):
    repo = tmp_path / "hub" / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (repo / "blobs" / "f00").write_text('{"model_type": "toy"}')
    os.symlink("../../blobs/f00", snap / "config.json")
    dst = tmp_path / "out"
    dst.mkdir()
    copy_non_weight_files(snap, dst)
    assert (dst / "config.json").read_text() == '{"model_type": "toy"}'
