"""The merge engine end to end: every method against a float64 reference, the original script's formula,
Hugging Face loading, atomic output under SIGKILL, start-up imports, and every bad input through the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import gradmatch
from gradmatch.cli import main
from gradmatch.errors import UserError
from gradmatch.engine.execute import _tensor_seed

from conftest import make_tiny_bert
from test_methods import original_script_formula, ref_dare, ref_gradient_matching, ref_ties, rel_err

REPO = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------- a family of tiny checkpoints

SHAPES = {"emb.weight": (300, 8), "layer.weight": (8, 8), "layer.bias": (8,), "scale": ()}
N_PARENT, N_CHILDREN = 2000, (500, 120, 60)


def _write_model(folder: Path, tensors: dict[str, torch.Tensor], config: dict, n: int | None = None, extra=True) -> Path:
    folder.mkdir(parents=True)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config))
    if extra:
        (folder / "tokenizer.json").write_text('{"toy": true}')
        (folder / "generation_config.json").write_bytes(b'{"max_length": 20}\n')
    if n is not None:
        (folder / "training_metadata.json").write_text(json.dumps({"num_train_examples": n, "epochs": 1}))
    return folder


def build_family(root: Path, dtype=torch.float32, T: int = 3, seed: int = 0) -> dict:
    """A parent, T children near it, and their Hessians (F ≥ 0 with some exact zeros), like train + fisher outputs."""
    g = torch.Generator().manual_seed(seed)
    config = {"model_type": "toy", "architectures": ["ToyForSequenceClassification"]}
    parent = {k: torch.randn(s, generator=g).to(dtype) for k, s in SHAPES.items()}
    parent["position_ids"] = torch.arange(5)
    fam = {"root": root, "parent": _write_model(root / "parent", parent, config, N_PARENT), "children": [], "hessians": []}

    def fisher(name):
        shape = SHAPES[name]
        f = torch.rand(shape, generator=g) ** 2
        return torch.where(torch.rand(shape, generator=g) < 0.1, torch.zeros(shape), f)

    h0 = {k: fisher(k) for k in SHAPES}
    (root / "fisher-parent").mkdir()
    _write_model(root / "fisher-parent" / "hessian", h0, config, extra=False)
    (root / "fisher-parent" / "hessian" / "fisher.json").write_text(json.dumps({"estimator": "sampled", "num_examples": 50}))
    fam["parent_hessian"] = root / "fisher-parent"
    for t in range(T):
        child = {k: (v.float() + 0.05 * torch.randn(v.shape, generator=g)).to(dtype) for k, v in parent.items() if v.is_floating_point()}
        child["position_ids"] = torch.arange(5) + t + 1  # differs: must come from the parent
        fam["children"].append(_write_model(root / f"child{t}", child, config, N_CHILDREN[t], extra=False))
        fam["hessians"].append(_write_model(root / f"hessian{t}", {k: fisher(k) for k in SHAPES}, config, extra=False))
    return fam


def load_folder(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def fam(tmp_path_factory) -> dict:
    return build_family(tmp_path_factory.mktemp("family"))


def gm_config(fam, **extra) -> dict:
    config = {
        "method": "gradient_matching",
        "base": str(fam["parent"]),
        "base_hessian": str(fam["parent_hessian"]),
        "models": [{"model": str(c), "hessian": str(h), "weight": w} for c, h, w in zip(fam["children"], fam["hessians"], (1.0, 0.7, 1.3))],
        "parameters": {"delta_0": 1e-12},
    }
    config.update(extra)
    return config


def inputs(fam):
    return (load_folder(fam["parent"]), [load_folder(c) for c in fam["children"]],
            load_folder(fam["parent_hessian"] / "hessian"), [load_folder(h) for h in fam["hessians"]])


# --------------------------------------------------------------------------- values


METHOD_CASES = {
    "gradient_matching": {"delta_0": 1e-6},
    "task_arithmetic": {},
    "average": {"include_base": True, "base_weight": 0.5},
    "fisher_average": {"epsilon": 1e-3},
    "ties": {"density": 0.3},
    "dare": {"p": 0.4, "seed": 3, "combine": "ties", "density": 0.5},
}


def reference(method, params, p, cs, f0, fs, alphas, name):
    """The method written the simple way, in float64."""
    p64, cs64 = p.double(), [c.double() for c in cs]
    if method == "gradient_matching":
        return ref_gradient_matching(p, cs, f0, fs, alphas, N_PARENT, N_CHILDREN, params["delta_0"])
    if method == "task_arithmetic":
        return p64 + sum(a * (c - p64) for a, c in zip(alphas, cs64))
    if method == "average":
        return (sum(a * c for a, c in zip(alphas, cs64)) + params["base_weight"] * p64) / (sum(alphas) + params["base_weight"])
    if method == "fisher_average":
        P = [a * (N * f.double() + params["epsilon"]) for a, N, f in zip(alphas, N_CHILDREN, fs)]
        return sum(Pt * c for Pt, c in zip(P, cs64)) / sum(P)
    if method == "ties":
        return ref_ties(p, cs, alphas, params["density"])
    if method == "dare":
        return ref_dare(p, cs, alphas, params["p"], _tensor_seed(params["seed"], name), params["combine"], params["density"])
    raise AssertionError(method)


@pytest.mark.parametrize("method", list(METHOD_CASES))
def test_every_method_equals_its_float64_reference(fam, tmp_path, method):
    config = gm_config(fam, method=method, parameters=METHOD_CASES[method])
    for entry, n in zip(config["models"], N_CHILDREN):
        entry["hessian_scale"] = n  # explicit N_t (fisher_average would use 1.0 otherwise)
    if method not in ("gradient_matching",):
        config.pop("base_hessian")
    out = gradmatch.merge(config, tmp_path / "out", block_rows=7, max_shard_size="3KB", progress=False)
    assert (out / "model.safetensors.index.json").is_file()  # sharded: emb.weight alone is 9.6 KB
    merged = load_folder(out)
    p, cs, f0, fs = inputs(fam)
    alphas = [1.0, 0.7, 1.3]
    for name in SHAPES:
        expected = reference(method, METHOD_CASES[method], p[name], [c[name] for c in cs], f0[name], [f[name] for f in fs], alphas, name)
        assert merged[name].dtype == torch.float32
        assert rel_err(merged[name], expected) <= 1e-6, name
    assert torch.equal(merged["position_ids"], p["position_ids"])
    assert (out / "tokenizer.json").read_bytes() == (fam["parent"] / "tokenizer.json").read_bytes()
    assert (out / "config.json").read_bytes() == (fam["parent"] / "config.json").read_bytes()
    assert not (out / "training_metadata.json").exists()
    provenance = json.loads((out / "merge.json").read_text())
    assert provenance["method"] == method and [m["weight"] for m in provenance["models"]] == alphas


def test_scales_default_to_training_metadata_and_blocks_change_nothing(fam, tmp_path):
    threads = torch.get_num_threads()
    out = gradmatch.merge(gm_config(fam), tmp_path / "a", progress=False, threads=1)
    assert torch.get_num_threads() == threads  # restored after the merge
    provenance = json.loads((out / "merge.json").read_text())
    assert provenance["base_hessian_scale"] == N_PARENT
    assert [m["hessian_scale"] for m in provenance["models"]] == list(N_CHILDREN)
    blocked = gradmatch.merge(gm_config(fam), tmp_path / "b", block_rows=1, progress=False)
    a, b = load_folder(out), load_folder(blocked)
    assert all(torch.equal(a[k], b[k]) for k in a)
    p, cs, f0, fs = inputs(fam)
    for name in SHAPES:
        expected = ref_gradient_matching(p[name], [c[name] for c in cs], f0[name], [f[name] for f in fs], [1.0, 0.7, 1.3],
                                         N_PARENT, N_CHILDREN, 1e-12)
        assert rel_err(a[name], expected) <= 1e-6


def test_float64_precision_and_output_dtypes(fam, tmp_path):
    out = gradmatch.merge(gm_config(fam), tmp_path / "f64", precision="float64", out_dtype="float64", progress=False)
    merged = load_folder(out)
    p, cs, f0, fs = inputs(fam)
    for name in SHAPES:
        expected = ref_gradient_matching(p[name], [c[name] for c in cs], f0[name], [f[name] for f in fs], [1.0, 0.7, 1.3],
                                         N_PARENT, N_CHILDREN, 1e-12)
        assert merged[name].dtype == torch.float64
        assert rel_err(merged[name], expected) <= 1e-12
    assert merged["position_ids"].dtype == torch.int64
    assert json.loads((out / "config.json").read_text())["dtype"] == "float64"


def test_bfloat16_parent_gives_bfloat16_output(tmp_path):
    fam = build_family(tmp_path / "bf16", dtype=torch.bfloat16, T=2)
    config = {"method": "task_arithmetic", "base": str(fam["parent"]),
              "models": [{"model": str(c), "weight": 0.5} for c in fam["children"]]}
    merged = load_folder(gradmatch.merge(config, tmp_path / "out", progress=False))
    p, cs = load_folder(fam["parent"]), [load_folder(c) for c in fam["children"]]
    for name in SHAPES:
        assert merged[name].dtype == torch.bfloat16
        expected = (p[name].double() + sum(0.5 * (c[name].double() - p[name].double()) for c in cs)).to(torch.bfloat16)
        assert torch.allclose(merged[name].float(), expected.float(), rtol=1e-2, atol=1e-2)


def test_sharded_and_bin_inputs_give_the_same_merge(fam, tmp_path):
    from gradmatch.checkpoints import ShardedWriter

    # the parent as sharded safetensors with an index, the first child and a Hessian as pytorch_model.bin
    parent = tmp_path / "parent-sharded"
    parent.mkdir()
    for f in ("config.json", "tokenizer.json", "generation_config.json", "training_metadata.json"):
        (parent / f).write_bytes((fam["parent"] / f).read_bytes())
    writer = ShardedWriter(parent, 2000)
    for name, t in load_folder(fam["parent"]).items():
        writer.add(name, t)
    writer.finish()
    child = tmp_path / "child-bin"
    child.mkdir()
    (child / "config.json").write_bytes((fam["children"][0] / "config.json").read_bytes())
    (child / "training_metadata.json").write_bytes((fam["children"][0] / "training_metadata.json").read_bytes())
    torch.save(load_folder(fam["children"][0]), child / "pytorch_model.bin")
    hessian = tmp_path / "hessian-bin" / "hessian"  # the original code's layout: <dir>/hessian/pytorch_model.bin
    hessian.mkdir(parents=True)
    torch.save(load_folder(fam["hessians"][1]), hessian / "pytorch_model.bin")
    config = gm_config(fam, base=str(parent))
    config["models"][0]["model"] = str(child)
    config["models"][1]["hessian"] = str(hessian.parent)
    a = load_folder(gradmatch.merge(config, tmp_path / "a", progress=False))
    b = load_folder(gradmatch.merge(gm_config(fam), tmp_path / "b", progress=False))
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_merges_are_deterministic_to_the_byte(fam, tmp_path):
    config = gm_config(fam, method="dare", parameters={"p": 0.5, "seed": 11})
    config.pop("base_hessian")
    a = gradmatch.merge(config, tmp_path / "a", max_shard_size="3KB", progress=False)
    b = gradmatch.merge(config, tmp_path / "b", max_shard_size="3KB", progress=False)
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    config["parameters"]["seed"] = 12
    c = load_folder(gradmatch.merge(config, tmp_path / "c", progress=False))
    assert not torch.equal(c["emb.weight"], load_folder(a)["emb.weight"])


def test_yaml_form_through_the_cli(fam, tmp_path, capsys):
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(gm_config(fam)))
    assert main(["merge", str(path), str(tmp_path / "out"), "--quiet", "--max-shard-size", "4KB"]) == 0
    assert "merged model written to" in capsys.readouterr().out
    api = load_folder(gradmatch.merge(path, tmp_path / "api", progress=False))
    cli = load_folder(tmp_path / "out")
    assert all(torch.equal(api[k], cli[k]) for k in api)


def test_per_model_parameters_in_mergekit_spelling(fam, tmp_path):
    config = gm_config(fam)
    for entry, n in zip(config["models"], N_CHILDREN):
        entry["parameters"] = {"weight": entry.pop("weight"), "hessian_scale": n}
    a = load_folder(gradmatch.merge(config, tmp_path / "a", progress=False))
    b = load_folder(gradmatch.merge(gm_config(fam), tmp_path / "b", progress=False))
    assert all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- the original script, Hugging Face


@pytest.fixture(scope="module")
def berts(tmp_path_factory) -> dict:
    """A tiny BERT parent with tokenizer, two children near it, Hessians in the original code's layout."""
    root = tmp_path_factory.mktemp("berts")
    parent = make_tiny_bert(root / "parent", seed=0)
    sd = load_file(parent / "model.safetensors")
    g = torch.Generator().manual_seed(1)
    out = {"parent": parent, "children": [], "hessians": []}
    for name in ("parent", "a", "b"):
        h = root / f"h-{name}" / "hessian"
        h.mkdir(parents=True)
        (h / "config.json").write_bytes((parent / "config.json").read_bytes())
        save_file({k: torch.rand(v.shape, generator=g) ** 2 for k, v in sd.items()}, h / "model.safetensors", metadata={"format": "pt"})
        if name == "parent":
            out["parent_hessian"] = root / "h-parent"
        else:
            child = root / name
            child.mkdir()
            (child / "config.json").write_bytes((parent / "config.json").read_bytes())
            save_file({k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in sd.items()}, child / "model.safetensors",
                      metadata={"format": "pt"})
            out["children"].append(child)
            out["hessians"].append(root / f"h-{name}")  # given without /hessian, as the original allowed
    return out


def test_original_flags_equal_the_original_formula(berts, tmp_path, capsys):
    out = tmp_path / "merged"
    rc = main(["merge", "--pretrained_model_name_or_path", str(berts["parent"]),
               "--pretrained_hessian_path", str(berts["parent_hessian"]),
               "--ft_model_name_or_paths", ",".join(map(str, berts["children"])),
               "--ft_hessian_paths", ",".join(map(str, berts["hessians"])),
               "--scaling_factor_pt", "25000", "--scaling_factors_ft", "112000,8530",
               "--delta_0", "1e-12", "--scaling_factor", "0.6", "--out_model_path", str(out), "--quiet"])
    assert rc == 0, capsys.readouterr().err
    merged = load_folder(out)
    p = load_folder(berts["parent"])
    cs = [load_folder(c) for c in berts["children"]]
    f0 = load_folder(berts["parent_hessian"] / "hessian")
    fs = [load_folder(h / "hessian") for h in berts["hessians"]]
    assert set(merged) == set(p)
    for name in p:
        expected = original_script_formula(p[name], [c[name] for c in cs], f0[name], [f[name] for f in fs], 0.6,
                                           25000, [112000, 8530], 1e-12)
        assert rel_err(merged[name], expected) <= 1e-6, name


def test_original_task_arithmetic_flags(berts, tmp_path):
    out = tmp_path / "ta"
    assert main(["merge", "--pretrained_model_name_or_path", str(berts["parent"]), "--ft_model_name_or_paths",
                 ",".join(map(str, berts["children"])), "--scaling_factor", "0.3", "--out_model_path", str(out), "--quiet"]) == 0
    merged, p = load_folder(out), load_folder(berts["parent"])
    cs = [load_folder(c) for c in berts["children"]]
    for name in p:
        expected = p[name].double() + 0.3 * sum(c[name].double() - p[name].double() for c in cs)
        assert rel_err(merged[name], expected) <= 1e-6
    assert json.loads((out / "merge.json").read_text())["method"] == "task_arithmetic"


def test_output_loads_with_transformers(berts, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    config = {"method": "gradient_matching", "base": str(berts["parent"]), "base_hessian": str(berts["parent_hessian"]),
              "base_hessian_scale": 100, "models": [{"model": str(c), "hessian": str(h), "hessian_scale": 50}
                                                    for c, h in zip(berts["children"], berts["hessians"])]}
    out = gradmatch.merge(config, tmp_path / "merged", max_shard_size="400KB", progress=False)
    assert (out / "model.safetensors.index.json").is_file()
    model = AutoModelForSequenceClassification.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    files = load_folder(out)
    state = model.state_dict()
    for name, tensor in files.items():
        assert torch.equal(state[name], tensor), name
    batch = tokenizer(["a merged model", "loads"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, 2) and torch.isfinite(logits).all()


# --------------------------------------------------------------------------- process-level promises


def _env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO / "src"))
    return env


def test_merge_does_not_import_transformers_datasets_matplotlib(fam, tmp_path):
    code = (
        "import sys\n"
        "from gradmatch.cli import main\n"
        f"rc = main(['merge', {str(tmp_path / 'merge.yaml')!r}, {str(tmp_path / 'out')!r}, '--quiet'])\n"
        "heavy = sorted(m for m in ('transformers', 'datasets', 'matplotlib') if m in sys.modules)\n"
        "print('RC', rc, 'HEAVY', heavy)\n"
    )
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(gm_config(fam)))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=120)
    assert "RC 0 HEAVY []" in done.stdout, done.stdout + done.stderr


def test_sigkill_while_writing_leaves_no_output(fam, tmp_path):
    """Kill the process after its first shard is on disk: no output folder; an old one stays intact."""
    marker = tmp_path / "first-shard-written"
    code = (
        "import time, gradmatch.checkpoints as c\n"
        "close = c._ShardFile.close\n"
        "def slow_close(self):\n"
        "    close(self)\n"
        f"    open({str(marker)!r}, 'w').close()\n"
        "    time.sleep(60)\n"
        "c._ShardFile.close = slow_close\n"
        "from gradmatch.cli import main\n"
        "import sys\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(gm_config(fam)))
    for out, args in ((tmp_path / "fresh", []), (tmp_path / "existing", ["--overwrite"])):
        if args:
            out.mkdir()
            (out / "keep.txt").write_text("old result")
        marker.unlink(missing_ok=True)
        proc = subprocess.Popen([sys.executable, "-c", code, "merge", str(tmp_path / "merge.yaml"), str(out),
                                 "--max-shard-size", "2KB", "--quiet", *args], env=_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.time() + 90
        while not marker.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert marker.exists(), proc.communicate()[1]
        assert list(tmp_path.glob(f".gradmatch-tmp-{out.name}-*/.shard-00001.safetensors"))  # a shard was written
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        if args:
            assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
        else:
            assert not out.exists()
    # a later run is not disturbed by the leftovers
    assert main(["merge", str(tmp_path / "merge.yaml"), str(tmp_path / "fresh"), "--quiet"]) == 0
    assert (tmp_path / "fresh" / "model.safetensors").is_file()


def test_overwrite_replaces_the_output(fam, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    gradmatch.merge(gm_config(fam), out, overwrite=True, progress=False)
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()


# --------------------------------------------------------------------------- bad input through the CLI


def _corrupt(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[: len(data) - 100])
    elif how == "garbage":
        path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!" + data[24:])
    elif how == "huge":
        header = {"emb.weight": {"dtype": "F32", "shape": [10**7, 10**6], "data_offsets": [0, 4 * 10**13]}}
        body = json.dumps(header).encode()
        path.write_bytes(len(body).to_bytes(8, "little") + body + b"\0" * 64)


def _replace_tensor(folder: Path, name: str, value) -> None:
    sd = load_file(folder / "model.safetensors")
    if value is None:
        del sd[name]
    else:
        sd[name] = value
    save_file(sd, folder / "model.safetensors")


def _set_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


# Each case: (id, how to break a fresh family, extra YAML changes or flag form, substrings the one stderr line must hold)
BAD_INPUTS = [
    ("missing base", lambda f: None, {"base": "/nonexistent/parent"}, ["base model", "/nonexistent/parent", "does not exist"]),
    ("missing child", lambda f: None, {"models.1.model": "./no/such/child"}, ["models[1]", "no/such/child", "does not exist"]),
    ("missing hessian", lambda f: None, {"models.0.hessian": "/no/hessian"}, ["hessian of models[0]", "/no/hessian", "does not exist"]),
    ("not a model folder", lambda f: (f["root"] / "empty").mkdir(), {"models.0.model": "{root}/empty"},
     ["{root}/empty", "no config.json"]),
    ("config but no weights", lambda f: (f["children"][0] / "model.safetensors").unlink(), {},
     ["models[0]", "child0", "not a model folder", "model.safetensors"]),
    ("different architecture", lambda f: _set_config(f["children"][1], model_type="gpt2"), {},
     ["models[1]", "child1", "model_type gpt2", "toy"]),
    ("different architectures list", lambda f: _set_config(f["children"][2], architectures=["ToyModel"]), {},
     ["models[2]", "architectures", "ToyModel"]),
    ("child lacks a tensor", lambda f: _replace_tensor(f["children"][0], "layer.bias", None), {},
     ["models[0]", "child0", "lacks tensor 'layer.bias'"]),
    ("child has an extra tensor", lambda f: _replace_tensor(f["children"][0], "extra.weight", torch.ones(2)), {},
     ["models[0]", "has tensor 'extra.weight'", "lacks"]),
    ("different shapes", lambda f: _replace_tensor(f["children"][1], "layer.weight", torch.ones(8, 9)), {},
     ["'layer.weight'", "[8, 9]", "child1", "[8, 8]"]),
    ("hessian lacks a tensor", lambda f: _replace_tensor(f["hessians"][2], "layer.weight", None), {},
     ["hessian of models[2]", "hessian2", "lacks tensor 'layer.weight'"]),
    ("NaN in weights", lambda f: _replace_tensor(f["children"][1], "layer.weight", torch.full((8, 8), float("nan"))), {},
     ["'layer.weight'", "child1/model.safetensors", "NaN or Inf"]),
    ("Inf in a hessian", lambda f: _replace_tensor(f["hessians"][0], "emb.weight", torch.full((300, 8), float("inf"))), {},
     ["'emb.weight'", "hessian0/model.safetensors", "NaN or Inf"]),
    ("negative hessian", lambda f: _replace_tensor(f["parent_hessian"] / "hessian", "layer.bias", -torch.ones(8)), {},
     ["'layer.bias'", "fisher-parent/hessian/model.safetensors", "negative"]),
    ("zero denominator", lambda f: [_replace_tensor(h, "layer.bias", torch.zeros(8)) for h in [f["parent_hessian"] / "hessian", *f["hessians"]]],
     {"parameters": {"delta_0": 0.0}}, ["gradient_matching", "'layer.bias'", "is zero", "delta_0"]),
    ("truncated safetensors", lambda f: _corrupt(f["children"][0] / "model.safetensors", "truncate"), {},
     ["child0/model.safetensors", "truncated"]),
    ("corrupt safetensors", lambda f: _corrupt(f["hessians"][1] / "model.safetensors", "garbage"), {},
     ["hessian1/model.safetensors", "corrupt", "not valid JSON"]),
    ("huge tensor header", lambda f: _corrupt(f["parent"] / "model.safetensors", "huge"), {},
     ["parent/model.safetensors", "'emb.weight'", "truncated or corrupt"]),
    ("no scale and no metadata", lambda f: (f["children"][2] / "training_metadata.json").unlink(), {},
     ["child2", "models[2].hessian_scale"]),
    ("unknown method", lambda f: None, {"method": "slerp"}, ["method", "gradient_matching"]),
    ("unknown parameter", lambda f: None, {"parameters": {"delta": 1.0}}, ["parameters.delta", "not a parameter of gradient_matching"]),
    ("negative scale", lambda f: None, {"base_hessian_scale": -3}, ["base_hessian_scale", "greater than or equal to 0"]),
    ("hessian missing for gradient matching", lambda f: None, {"models.1.hessian": None}, ["models[1]", "needs a hessian"]),
]

FLAG_CASES = [
    ("wrong number of scales", ["--scaling_factors_ft", "1,2"], ["--scaling_factors_ft has 2 values", "3 models"]),
    ("wrong number of weights", ["--scaling_factors", "1,2,3,4"], ["--scaling_factors has 4 values", "3 models"]),
    ("wrong number of hessians", ["--ft_hessian_paths", "{h0}"], ["--ft_hessian_paths has 1 paths", "3 models"]),
    ("scale that is no number", ["--scaling_factors_ft", "1,x,2"], ["--scaling_factors_ft", "'x' is not a number"]),
    ("no output", ["--out_model_path", ""], ["--out_model_path is required"]),
    ("cuda missing", ["--device", "cuda"], ["cuda", "no CUDA GPU"]),
    ("unknown flag", ["--frobnicate"], ["unrecognized arguments: --frobnicate"]),
]


def _apply(config: dict, changes: dict, root: Path) -> dict:
    for key, value in changes.items():
        if isinstance(value, str):
            value = value.replace("{root}", str(root))
        parts = key.split(".")
        target = config
        for part in parts[:-1]:
            target = target[int(part)] if part.isdigit() else target[part]
        target[int(parts[-1]) if parts[-1].isdigit() else parts[-1]] = value
    return config


def _assert_one_line_error(rc, err, must_contain, root):
    assert rc == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("gradmatch: error: "), err
    assert "Traceback" not in err
    for part in must_contain:
        assert part.replace("{root}", str(root)) in lines[0], (part, lines[0])


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_gives_one_line_exit_2_and_writes_nothing(tmp_path, capsys, case):
    _, breaker, changes, must_contain = case
    fam = build_family(tmp_path / "fam")
    breaker(fam)
    config = _apply(gm_config(fam), changes, fam["root"])
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    rc = main(["merge", str(tmp_path / "merge.yaml"), str(out), "--quiet"])
    _assert_one_line_error(rc, capsys.readouterr().err, must_contain, fam["root"])
    assert not out.exists()
    assert not list(tmp_path.glob(".gradmatch-*"))


@pytest.mark.parametrize("case", FLAG_CASES, ids=[c[0] for c in FLAG_CASES])
def test_bad_original_flags(fam, tmp_path, capsys, case):
    _, changes, must_contain = case
    flags = {"--pretrained_model_name_or_path": str(fam["parent"]), "--pretrained_hessian_path": str(fam["parent_hessian"]),
             "--ft_model_name_or_paths": ",".join(map(str, fam["children"])),
             "--ft_hessian_paths": ",".join(map(str, fam["hessians"])), "--scaling_factors_ft": "500,120,60",
             "--delta_0": "1e-12", "--out_model_path": str(tmp_path / "out")}
    extra = []
    for flag, value in zip(changes[::2], changes[1::2] + [None] * len(changes)):
        if value is None:
            extra.append(flag)
        else:
            flags[flag] = value.replace("{h0}", str(fam["hessians"][0]))
    argv = ["merge", "--quiet"] + [x for kv in flags.items() for x in kv] + extra
    if "--device" in changes and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    rc = main(argv)
    _assert_one_line_error(rc, capsys.readouterr().err, must_contain, tmp_path)
    assert not (tmp_path / "out").exists()


def test_existing_output_is_left_untouched(fam, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(gm_config(fam)))
    rc = main(["merge", str(tmp_path / "merge.yaml"), str(out), "--quiet"])
    _assert_one_line_error(rc, capsys.readouterr().err, [str(out), "already exists", "--overwrite"], tmp_path)
    assert [p.name for p in out.iterdir()] == ["precious.txt"]


def test_failure_mid_merge_with_overwrite_keeps_the_old_output(tmp_path, capsys):
    fam = build_family(tmp_path / "fam")
    _replace_tensor(fam["hessians"][0], "scale", torch.tensor(float("nan")))  # found only while streaming
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(gm_config(fam)))
    rc = main(["merge", str(tmp_path / "merge.yaml"), str(out), "--quiet", "--overwrite"])
    _assert_one_line_error(rc, capsys.readouterr().err, ["'scale'", "NaN or Inf"], tmp_path)
    assert [p.name for p in out.iterdir()] == ["precious.txt"]
    assert not list(tmp_path.glob(".gradmatch-*"))


def test_an_output_that_is_contains_or_lies_inside_an_input_is_refused(fam, tmp_path, capsys):
    with pytest.raises(UserError, match="contains the input base model .*would delete the input base model"):
        gradmatch.merge(gm_config(fam), fam["root"], overwrite=True, progress=False)
    with pytest.raises(UserError, match="is the input base model .*would replace the input base model"):
        gradmatch.merge(gm_config(fam), fam["parent"], overwrite=True, progress=False)
    before = sorted(p.name for p in Path(fam["children"][0]).iterdir())
    with pytest.raises(UserError, match="lies inside the input .*would change the input"):
        gradmatch.merge(gm_config(fam), Path(fam["children"][0]) / "merged", progress=False)
    assert sorted(p.name for p in Path(fam["children"][0]).iterdir()) == before


def test_yaml_and_flags_together_are_refused(fam, tmp_path, capsys):
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(gm_config(fam)))
    rc = main(["merge", str(tmp_path / "m.yaml"), str(tmp_path / "out"), "--delta_0", "1e-12"])
    _assert_one_line_error(rc, capsys.readouterr().err, ["not both", "--delta_0"], tmp_path)


def test_a_real_process_prints_one_line_and_exits_2(tmp_path):
    done = subprocess.run([sys.executable, "-m", "gradmatch", "merge", "--pretrained_model_name_or_path", str(tmp_path / "nope"),
                           "--ft_model_name_or_paths", "a,b", "--out_model_path", str(tmp_path / "out")],
                          capture_output=True, text=True, env=_env(), timeout=120)
    _assert_one_line_error(done.returncode, done.stderr, ["base model", "does not exist"], tmp_path)
    assert not (tmp_path / "out").exists()


def test_unknown_hub_id_offline_is_one_line(fam, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = gm_config(fam, base="some-org/no-such-model")
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(config))
    rc = main(["merge", str(tmp_path / "m.yaml"), str(tmp_path / "out"), "--quiet"])
    _assert_one_line_error(rc, capsys.readouterr().err, ["base model some-org/no-such-model", "Hugging Face hub"], tmp_path)
