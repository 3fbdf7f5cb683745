"""Hardening, round four, in the merge engine (pinned before the engine is split into a package): one merge gives
one answer whichever form asks for it; stored dtypes it cannot compute; folders holding two weight layouts;
provenance that says what happened; RegMean with its statistics or not at all; path aliases; the ownership check
of Hessians. Every expected value comes from a float64 formula written here or from transformers' own loading."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from gradmatch.cli import main
from gradmatch.errors import UserError
from gradmatch.merge import merge

from test_merge import N_CHILDREN, build_family, load_folder


# --------------------------------------------------------------------------- class 1: one merge, one answer


def test_fisher_average_yaml_and_original_flags_give_one_answer_the_documented_one(tmp_path, capsys):
    """Children with training_metadata.json (N_t 500, 120, 60): the YAML form and the original flags both weigh
    the Fishers as stored (docs/merge.md: hessian_scale default 1.0), = Σ λ_t F_t θ_t / Σ λ_t F_t in float64."""
    fam = build_family(tmp_path / "fam")
    weights = (1.0, 0.7, 1.3)
    config = {"method": "fisher_average", "base": str(fam["parent"]),
              "models": [{"model": str(c), "hessian": str(h), "weight": w}
                         for c, h, w in zip(fam["children"], fam["hessians"], weights)]}
    merge(config, tmp_path / "yaml", progress=False)
    rc = main(["merge", "--method", "fisher_average", "--pretrained_model_name_or_path", str(fam["parent"]),
               "--ft_model_name_or_paths", ",".join(map(str, fam["children"])),
               "--ft_hessian_paths", ",".join(map(str, fam["hessians"])),
               "--scaling_factors", ",".join(map(str, weights)), "--out_model_path", str(tmp_path / "flags"), "--quiet"])
    assert rc == 0, capsys.readouterr().err
    from_yaml, from_flags = load_folder(tmp_path / "yaml"), load_folder(tmp_path / "flags")
    children = [load_folder(c) for c in fam["children"]]
    fishers = [load_folder(h) for h in fam["hessians"]]
    for name in ("emb.weight", "layer.weight", "layer.bias"):
        assert torch.equal(from_yaml[name], from_flags[name]), name
        num = sum(w * f[name].double() * c[name].double() for w, f, c in zip(weights, fishers, children))
        den = sum(w * f[name].double() for w, f in zip(weights, fishers))
        plain = sum(w * c[name].double() for w, c in zip(weights, children)) / sum(weights)
        expected = torch.where(den > 0, num / torch.where(den > 0, den, 1), plain)
        assert torch.allclose(from_yaml[name].double(), expected, rtol=1e-5, atol=1e-6), name
    record = json.loads((tmp_path / "yaml" / "merge.json").read_text())
    assert set(N_CHILDREN) - {1.0}  # the metadata holds other sizes, which are not used
    assert all("as stored" in source for key, source in record["scale_sources"].items() if key.startswith("models"))


def test_fisher_average_takes_a_given_scale(tmp_path):
    fam = build_family(tmp_path / "fam")
    scales = (3.0, 1.0, 0.5)
    config = {"method": "fisher_average", "base": str(fam["parent"]),
              "models": [{"model": str(c), "hessian": str(h), "hessian_scale": n}
                         for c, h, n in zip(fam["children"], fam["hessians"], scales)]}
    merge(config, tmp_path / "out", progress=False)
    out, children = load_folder(tmp_path / "out"), [load_folder(c) for c in fam["children"]]
    fishers = [load_folder(h) for h in fam["hessians"]]
    name = "layer.weight"
    den = sum(n * f[name].double() for n, f in zip(scales, fishers))
    num = sum(n * f[name].double() * c[name].double() for n, f, c in zip(scales, fishers, children))
    assert torch.allclose(out[name].double(), num / den, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- class 13: the ownership check


def _big_family(root: Path) -> dict:
    """A parent of eight 1 MB tensors and a child that differs from it in one tensor only (a LoRA folded into one
    projection), away from the start, middle and end of the file; each with a Hessian that records its owner."""
    from gradmatch.checkpoints import folder_fingerprint

    g = torch.Generator().manual_seed(0)
    parent = {f"layers.{i}.weight": torch.randn(512, 512, generator=g) for i in range(8)}
    child = dict(parent)
    child["layers.2.weight"] = parent["layers.2.weight"] + 0.01 * torch.randn(512, 8, generator=g) @ torch.randn(
        8, 512, generator=g)
    out = {}
    for name, tensors in (("parent", parent), ("child", child)):
        folder = root / name
        folder.mkdir(parents=True)
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps({"model_type": "toy"}))
        hessian = root / f"{name}-fisher" / "hessian"
        hessian.mkdir(parents=True)
        save_file({k: torch.rand(v.shape, generator=g) for k, v in tensors.items()}, hessian / "model.safetensors",
                  metadata={"format": "pt"})
        (hessian / "config.json").write_text(json.dumps({"model_type": "toy"}))
        (hessian / "fisher.json").write_text(json.dumps({"estimator": "sampled",
                                                         "weights_fingerprint": folder_fingerprint(folder)}))
        out[name], out[f"{name}_hessian"] = folder, root / f"{name}-fisher"
    return out


def test_a_child_that_differs_in_one_tensor_has_its_own_fingerprint(tmp_path):
    from gradmatch.checkpoints import _legacy_fingerprint, folder_fingerprint

    fam = _big_family(tmp_path)
    assert _legacy_fingerprint(fam["parent"]) == _legacy_fingerprint(fam["child"])  # the blind spot it had
    assert folder_fingerprint(fam["parent"]) != folder_fingerprint(fam["child"])


def test_a_swapped_parent_and_child_hessian_is_refused(tmp_path):
    fam = _big_family(tmp_path)
    swapped = {"method": "gradient_matching", "base": str(fam["parent"]), "base_hessian": str(fam["child_hessian"]),
               "base_hessian_scale": 10, "parameters": {"delta_0": 1e-12},
               "models": [{"model": str(fam["child"]), "hessian": str(fam["parent_hessian"]), "hessian_scale": 5}]}
    with pytest.raises(UserError, match="base_hessian .* was computed on another model than .*parent"):
        merge(swapped, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    right = {**swapped, "base_hessian": str(fam["parent_hessian"]),
             "models": [{"model": str(fam["child"]), "hessian": str(fam["child_hessian"]), "hessian_scale": 5}]}
    merge(right, tmp_path / "ok", progress=False)


def test_records_with_the_legacy_fingerprint_are_still_checked(tmp_path):
    """A Hessian written before the per-tensor fingerprint records the per-file one: it is checked by that one."""
    from gradmatch.checkpoints import _legacy_fingerprint, fingerprint_matches

    fam = build_family(tmp_path / "fam")
    assert fingerprint_matches(fam["children"][0], _legacy_fingerprint(fam["children"][0]))
    assert not fingerprint_matches(fam["children"][0], _legacy_fingerprint(fam["children"][1]))
    record = fam["parent_hessian"] / "hessian" / "fisher.json"
    record.write_text(json.dumps({"estimator": "sampled", "weights_fingerprint": _legacy_fingerprint(fam["children"][0])}))
    from test_merge import gm_config

    with pytest.raises(UserError, match="computed on another model"):
        merge(gm_config(fam), tmp_path / "out", progress=False)
    record.write_text(json.dumps({"estimator": "sampled", "weights_fingerprint": _legacy_fingerprint(fam["parent"])}))
    merge(gm_config(fam), tmp_path / "ok", progress=False)


# --------------------------------------------------------------------------- class 3: a folder holding two layouts


def test_a_folder_with_two_layouts_is_read_as_transformers_loads_it(tmp_path):
    """A child holding both a sharded index (stale shards) and a single model.safetensors: the merge reads the
    tensors transformers' from_pretrained loads (the single file), as fisher, evaluate and train do."""
    from transformers import AutoModelForCausalLM

    from conftest import make_tiny_lm

    parent = make_tiny_lm(tmp_path / "parent", family="llama", tie=False)
    child = tmp_path / "child"
    model = AutoModelForCausalLM.from_pretrained(parent)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    model.save_pretrained(child, max_shard_size="20KB")  # the index and its shards: the "stale" layout
    assert (child / "model.safetensors.index.json").is_file()
    stale = {k: v for f in child.glob("model-*.safetensors") for k, v in load_file(f).items()}
    fresh = {k: v + 0.5 for k, v in stale.items()}
    save_file(fresh, child / "model.safetensors", metadata={"format": "pt"})
    loaded = AutoModelForCausalLM.from_pretrained(child).state_dict()
    assert torch.equal(loaded["model.norm.weight"], fresh["model.norm.weight"])  # transformers reads the single file
    merge({"method": "task_arithmetic", "base": str(parent), "models": [{"model": str(child), "weight": 1.0}]},
          tmp_path / "out", progress=False)
    out = AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    for name, value in fresh.items():
        assert torch.allclose(out[name], value, atol=1e-6), name


# --------------------------------------------------------------------------- class 2: dtypes stored but not computed


def _float8_family(root: Path, which: str) -> dict:
    """The toy family with the parent's (or the first child's) floating tensors stored as float8_e4m3fn."""
    fam = build_family(root)
    folder = Path(fam["parent"] if which == "parent" else fam["children"][0])
    tensors = load_file(folder / "model.safetensors")
    save_file({k: v.to(torch.float8_e4m3fn) if v.is_floating_point() else v for k, v in tensors.items()},
              folder / "model.safetensors", metadata={"format": "pt"})
    return fam


@pytest.mark.parametrize("kernel", ["auto", "fused", "reference"])
def test_a_float8_parent_is_merged_from_its_values_and_written_in_bfloat16(tmp_path, kernel):
    from test_merge import gm_config
    from test_methods import ref_gradient_matching

    fam = _float8_family(tmp_path / "fam", "parent")
    merge(gm_config(fam), tmp_path / "out", progress=False, kernel=kernel)
    out = load_file(tmp_path / "out" / "model.safetensors")
    assert out["layer.weight"].dtype == torch.bfloat16
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    p, cs = load_folder(fam["parent"]), [load_folder(c) for c in fam["children"]]
    f0, fs = load_folder(fam["parent_hessian"] / "hessian"), [load_folder(h) for h in fam["hessians"]]
    name = "layer.weight"
    exact = ref_gradient_matching(p[name].float(), [c[name] for c in cs], f0[name], [f[name] for f in fs],
                                  (1.0, 0.7, 1.3), 2000.0, (500.0, 120.0, 60.0), 1e-12)
    assert torch.allclose(out[name].double(), exact, rtol=1e-2, atol=1e-2)  # one bfloat16 rounding


def test_a_quantized_checkpoint_is_refused(tmp_path):
    from test_merge import gm_config

    fam = build_family(tmp_path / "fam")
    config = json.loads((fam["children"][1] / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    (fam["children"][1] / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"models\[1\] .* is a quantized checkpoint \(quantization_config: fp8\)"):
        merge(gm_config(fam), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- class 4: provenance


def test_merge_json_names_what_computed_every_block(tmp_path):
    """A child with some tensors in float8 (the kernels do not read it): with the fused kernel chosen, those
    tensors' blocks come from the reference formula, and merge.json says so; alone, each path is named."""
    from test_merge import gm_config

    fam = build_family(tmp_path / "fam")
    folder = Path(fam["children"][0])
    tensors = load_file(folder / "model.safetensors")
    tensors["layer.weight"] = tensors["layer.weight"].to(torch.float8_e4m3fn)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    records = {}
    for kernel in ("fused", "reference"):
        merge(gm_config(fam), tmp_path / kernel, progress=False, kernel=kernel)
        records[kernel] = json.loads((tmp_path / kernel / "merge.json").read_text())
    fused = records["fused"]
    assert fused["kernel"] == "mixed" and fused["kernel_requested"] == "fused"
    assert fused["kernel_fallbacks"] == {"layer.weight": 1}
    assert fused["kernel_blocks"] == {"fused": 3, "reference": 1}  # emb.weight, layer.bias, scale; layer.weight
    ref = records["reference"]
    assert ref["kernel"] == "reference" and ref["kernel_fallbacks"] == {} and ref["kernel_blocks"]["fused"] == 0
    clean = build_family(tmp_path / "clean")
    merge(gm_config(clean), tmp_path / "clean-out", progress=False, kernel="fused")
    whole = json.loads((tmp_path / "clean-out" / "merge.json").read_text())
    assert whole["kernel"] == "fused" and whole["kernel_blocks"]["reference"] == 0 and not whole["kernel_fallbacks"]


# --------------------------------------------------------------------------- class 11: RegMean with its statistics


@pytest.fixture(scope="module")
def regmean_world(tmp_path_factory):
    """test_regmean's tiny BERT parent, two children and their Grams from the CLI, built once here."""
    from test_regmean import world

    return world.__wrapped__(tmp_path_factory)


def _regmean(world, grams):
    return {"method": "regmean", "base": str(world["parent"]),
            "models": [{"model": str(c), "gram": str(g)} for c, g in zip(world["children"], grams)]}


def _edit_gram(src: Path, dst: Path, drop: str | None = None, zero_positions: bool = False, empty: bool = False):
    import shutil

    shutil.copytree(src, dst)
    tensors = load_file(dst / "gram.safetensors")
    record = json.loads((dst / "gram.json").read_text())
    if empty:
        tensors = {}
    if drop is not None:
        del tensors[drop]
        if zero_positions:
            record["positions"][drop] = 0
        else:
            record["positions"].pop(drop, None)
    save_file(tensors, dst / "gram.safetensors", metadata={"format": "pt"})
    (dst / "gram.json").write_text(json.dumps(record))
    return dst


@pytest.mark.parametrize("case", ["a layer missing", "a layer that saw no input", "an empty Gram"])
def test_regmean_refuses_grams_that_do_not_cover_its_linear_layers(regmean_world, tmp_path, case):
    w = regmean_world
    layer = "bert.encoder.layer.0.attention.self.query.weight"
    good, other = w["grams"]
    edits = dict(drop=None if case == "an empty Gram" else layer, zero_positions=case == "a layer that saw no input",
                 empty=case == "an empty Gram")  # every child's Gram alike: a difference between them is refused already
    edited = [_edit_gram(Path(g), tmp_path / f"edited{i}", **edits) for i, g in enumerate((good, other))]
    expected = {"a layer missing": f"has no Gram for 1 Linear layer of the base model \\(e.g. {layer}\\)",
                "a layer that saw no input": "it saw no input: 0 positions in gram.json",
                "an empty Gram": "holds no Gram matrices"}[case]
    with pytest.raises(UserError, match=expected):
        merge(_regmean(w, edited), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    merge(_regmean(w, [good, other]), tmp_path / "ok", progress=False)  # complete Grams merge


# --------------------------------------------------------------------------- decisions: removal through normalize


@pytest.mark.parametrize("method", ["ties", "task_arithmetic", "dare_ties"])
def test_removal_through_a_normalized_mergekit_recipe_is_refused(tmp_path, method):
    """mergekit's normalize divides by Σ w_t: with Σ w_t < 0 (w = −1) the task comes back (θ_0 + τ). Refused (mixed
    weights with a positive sum keep mergekit's semantics, tests/test_mergekit.py's dare_ties); normalize: false
    removes it (θ_0 − τ for task arithmetic, in float64)."""
    fam = build_family(tmp_path / "fam")
    recipe = {"merge_method": method, "base_model": str(fam["parent"]),
              "models": [{"model": str(fam["children"][0]), "parameters": {"weight": -1.0, "density": 1.0}}],
              "parameters": {"normalize": True}, "dtype": "float32"}
    with pytest.raises(UserError, match="add their tasks back instead of removing them"):
        merge(recipe, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    if method == "task_arithmetic":
        recipe["parameters"]["normalize"] = False
        merge(recipe, tmp_path / "removed", progress=False)
        out, p, c = load_folder(tmp_path / "removed"), load_folder(fam["parent"]), load_folder(fam["children"][0])
        expected = 2 * p["layer.weight"].double() - c["layer.weight"].double()
        assert torch.allclose(out["layer.weight"].double(), expected, atol=1e-6)


# --------------------------------------------------------------------------- found by the hostile pass


def test_a_tensor_of_no_entries_is_merged_and_written(tmp_path):
    """A zero-size tensor beside others (its header entry, no bytes) was 'written after its shard was complete'."""
    for name, value in (("parent", 0.0), ("child", 0.1)):
        folder = tmp_path / name
        folder.mkdir()
        save_file({"a.weight": torch.full((8, 4), value), "z.empty": torch.zeros(0, 4)}, folder / "model.safetensors",
                  metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps({"model_type": "toy"}))
    merge({"method": "task_arithmetic", "base": str(tmp_path / "parent"),
           "models": [{"model": str(tmp_path / "child"), "weight": 0.5}]}, tmp_path / "out", progress=False)
    out = load_file(tmp_path / "out" / "model.safetensors")
    assert out["z.empty"].shape == (0, 4) and torch.allclose(out["a.weight"], torch.full((8, 4), 0.05))


def test_a_regmean_output_may_not_be_one_of_its_grams(regmean_world, tmp_path):
    import shutil

    w = regmean_world
    gram = shutil.copytree(w["grams"][0], tmp_path / "g0")
    with pytest.raises(UserError, match="is the input gram of models\\[0\\]"):
        merge(_regmean(w, [gram, w["grams"][1]]), gram, overwrite=True, progress=False)
    assert (gram / "gram.safetensors").is_file()


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool])
def test_a_child_storing_a_merged_weight_as_integers_is_refused(tmp_path, dtype):
    from test_merge import gm_config

    fam = build_family(tmp_path / "fam")
    folder = Path(fam["children"][1])
    tensors = load_file(folder / "model.safetensors")
    tensors["layer.weight"] = (tensors["layer.weight"] > 0).to(dtype)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match="'layer.weight' is .* in .* but float32 in the base model"):
        merge(gm_config(fam), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
