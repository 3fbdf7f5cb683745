"""mergekit's YAML run unchanged, with mergekit's semantics: every shared method against a float64 reference written
the simple way, against mergekit's own stored outputs (computed once with mergekit 0.1.5 by
benchmarks/mergekit_expectations.py; mergekit is not needed here), and the refusals, one line each."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import gradmatch
from gradmatch.cli import main
from gradmatch.engine.execute import _tensor_seed

# --------------------------------------------------------------------------- tiny Llama-shaped families

CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 16, "hidden_size": 8,
          "intermediate_size": 12, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
          "max_position_embeddings": 16, "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "torch_dtype": "float32",
          "hidden_act": "silu", "rope_theta": 10000.0}
SHAPES = {"model.embed_tokens.weight": (16, 8), "model.layers.0.self_attn.q_proj.weight": (8, 8),
          "model.layers.0.self_attn.k_proj.weight": (4, 8), "model.layers.0.self_attn.v_proj.weight": (4, 8),
          "model.layers.0.self_attn.o_proj.weight": (8, 8), "model.layers.0.mlp.gate_proj.weight": (12, 8),
          "model.layers.0.mlp.up_proj.weight": (12, 8), "model.layers.0.mlp.down_proj.weight": (8, 12),
          "model.layers.0.input_layernorm.weight": (8,), "model.layers.0.post_attention_layernorm.weight": (8,),
          "model.norm.weight": (8,), "lm_head.weight": (16, 8)}
MODELS = ("parent", "child1", "child2", "child3")


def tied_values(shape, model: int, salt: int) -> torch.Tensor:
    """Exact, platform-independent values: integers over 1000, children plus noise in steps of 1/400, so that
    task-vector magnitudes tie by the dozen (as bf16 ones do) and mergekit's tie-breaking shows."""
    i = torch.arange(math.prod(shape), dtype=torch.int64)
    base = ((i * 7919 + salt * 104729) % 2001 - 1000).to(torch.float32) / 1000
    if model:
        base = base + ((i * (31 + 17 * model) + model * 613 + salt) % 41 - 20).to(torch.float32) / 400
    return base.reshape(shape)


def random_values(shape, model: int, salt: int) -> torch.Tensor:
    """Random values, no two magnitudes equal: TIES' top-k is then unambiguous."""
    g = torch.Generator().manual_seed(1000 * salt + 17)
    base = torch.randn(shape, generator=g)
    if model:
        base = base + 0.05 * torch.randn(shape, generator=torch.Generator().manual_seed(1000 * salt + model))
    return base


def build(root: Path, values) -> Path:
    for m, name in enumerate(MODELS):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: values(s, m, j) for j, (k, s) in enumerate(SHAPES.items())}, folder / "model.safetensors",
                  metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps(CONFIG))
    return root


@pytest.fixture(scope="module")
def tied(tmp_path_factory) -> Path:
    return build(tmp_path_factory.mktemp("tied"), tied_values)


@pytest.fixture(scope="module")
def rand(tmp_path_factory) -> Path:
    return build(tmp_path_factory.mktemp("random"), random_values)


#: mergekit YAMLs (paths relative to the family's folder), each run unchanged.
CASES = {
    "linear": {"merge_method": "linear", "dtype": "float32", "models": [
        {"model": "child1", "parameters": {"weight": 0.6}}, {"model": "child2", "parameters": {"weight": 0.4}},
        {"model": "child3", "parameters": {"weight": 1.0}}]},
    "linear_base_no_normalize": {"merge_method": "linear", "base_model": "parent", "dtype": "float32",
                                 "parameters": {"weight": 0.25, "normalize": False}, "models": [
        {"model": "child1", "parameters": {"weight": 0.6}}, {"model": "child2", "parameters": {"weight": 0.4}}]},
    "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": "parent", "dtype": "float32", "models": [
        {"model": "child1", "parameters": {"weight": 0.7}}, {"model": "child2", "parameters": {"weight": 0.3}},
        {"model": "child3", "parameters": {"weight": -0.2}}]},
    "task_arithmetic_normalize_lambda": {"merge_method": "task_arithmetic", "base_model": "parent", "dtype": "float32",
                                         "parameters": {"normalize": True, "lambda": 1.3}, "models": [
        {"model": "parent"}, {"model": "child1", "parameters": {"weight": 0.7}},
        {"model": "child2", "parameters": {"weight": 0.5}}]},
    "ties": {"merge_method": "ties", "base_model": "parent", "dtype": "float32",
             "parameters": {"density": 0.7, "lambda": 0.9}, "models": [
        {"model": "child1", "parameters": {"weight": 1.0, "density": 0.5}},
        {"model": "child2", "parameters": {"weight": 0.4, "density": 0.3}},
        {"model": "child3", "parameters": {"weight": 0.8}}]},
    "ties_no_normalize_rescale": {"merge_method": "ties", "base_model": "parent", "dtype": "float32",
                                  "parameters": {"normalize": False, "rescale": True}, "models": [
        {"model": "child1", "parameters": {"weight": 1.0, "density": 0.5}},
        {"model": "child2", "parameters": {"weight": 0.4, "density": 0.3}}]},
    "dare_linear": {"merge_method": "dare_linear", "base_model": "parent", "dtype": "float32",
                    "parameters": {"density": 1.0}, "models": [
        {"model": "child1", "parameters": {"weight": 0.6}}, {"model": "child2", "parameters": {"weight": 0.4}}]},
    "dare_ties": {"merge_method": "dare_ties", "base_model": "parent", "dtype": "float32",
                  "parameters": {"density": 1.0, "normalize": True}, "models": [
        {"model": "child1", "parameters": {"weight": 0.6}}, {"model": "child2", "parameters": {"weight": -0.4}},
        {"model": "child3", "parameters": {"weight": 0.5}}]},
}


def materialise(case: dict, root: Path) -> dict:
    """The case with its model names turned into folders under ``root``."""
    out = json.loads(json.dumps(case))
    if "base_model" in out:
        out["base_model"] = str(root / out["base_model"])
    for entry in out["models"]:
        entry["model"] = str(root / entry["model"])
    return out


def load(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def run(case: dict, root: Path, out: Path) -> dict[str, torch.Tensor]:
    out.parent.mkdir(parents=True, exist_ok=True)
    (out.parent / f"{out.name}.yaml").write_text(yaml.safe_dump(materialise(case, root)))
    assert main(["merge", str(out.parent / f"{out.name}.yaml"), str(out), "--quiet", "--no-card"]) == 0
    return load(out)


# --------------------------------------------------------------------------- mergekit's semantics, the simple way


def ref_mergekit(case: dict, root: Path, name: str, seed: int = 0) -> torch.Tensor:
    """mergekit 0.1.5's result for tensor ``name``, in float64, written out entry by entry where it matters."""
    m = case["merge_method"]
    g = case.get("parameters", {})
    tensors = {folder: load(root / folder)[name].double() for folder in MODELS}

    def param(entry, key, default=None):
        return entry.get("parameters", {}).get(key, g.get(key, default))

    if m == "linear":
        inputs = [(e["model"], param(e, "weight")) for e in case["models"]]
        if "base_model" in case and all(e["model"] != case["base_model"] for e in case["models"]):
            inputs.append((case["base_model"], g["weight"]))
        total = sum(w * tensors[model] for model, w in inputs)
        return total / sum(w for _, w in inputs) if g.get("normalize", True) else total
    base = tensors[case["base_model"]]
    kids = [e for e in case["models"] if e["model"] != case["base_model"]]
    weights = [param(e, "weight") for e in kids]
    lam = g.get("lambda", 1.0)
    deltas = [tensors[e["model"]] - base for e in kids]
    if m == "task_arithmetic":
        total = sum(w * d for w, d in zip(weights, deltas))
        z = sum(weights) if g.get("normalize", False) and abs(sum(weights)) >= 1e-8 else 1.0
        return base + lam * total / z
    if m == "ties":  # top k = max(1, int(density·n)) magnitudes by a simple sort
        kept = []
        for e, d in zip(kids, deltas):
            flat = d.reshape(-1)
            k = max(1, int(param(e, "density", 1.0) * flat.numel()))
            keep = torch.zeros_like(flat)
            if param(e, "density", 1.0) >= 1:
                keep += 1
            else:
                for i in sorted(range(flat.numel()), key=lambda i: -abs(flat[i].item()))[:k]:
                    keep[i] = 1
            t = (flat * keep).reshape(d.shape)
            if g.get("rescale", False) and t.abs().sum() >= 1e-7 and param(e, "density", 1.0) < 1:
                t = t * d.abs().sum() / t.abs().sum()
            kept.append(t)
        deltas = kept
    elif m in ("dare_linear", "dare_ties"):  # gradmatch draws the keep mask: U ≥ 1 − density, U ~ its generator
        gen = torch.Generator().manual_seed(_tensor_seed(seed, name))
        dropped = []
        for e, d in zip(kids, deltas):
            density = param(e, "density", 1.0)
            keep = torch.rand(d.shape, generator=gen, dtype=torch.float32) >= 1 - density
            t = d * keep
            if g.get("rescale", True) and density < 1 and t.abs().sum() >= 1e-7:
                t = t * d.abs().sum() / t.abs().sum()
            dropped.append(t)
        deltas = dropped
        if m == "dare_linear":
            total = sum(w * d for w, d in zip(weights, deltas))
            z = sum(weights) if g.get("normalize", False) and abs(sum(weights)) >= 1e-8 else 1.0
            return base + lam * total / z
    # sign consensus (ties, dare_ties), entry by entry
    weighted = [w * d for w, d in zip(weights, deltas)]
    out = torch.zeros_like(base).reshape(-1)
    for i in range(out.numel()):
        values = [wd.reshape(-1)[i].item() for wd in weighted]
        sign = 1.0 if sum(values) >= 0 else -1.0
        agree = [(v, w) for v, w in zip(values, weights) if v != 0 and math.copysign(1.0, v) == sign]
        total = sum(v for v, _ in agree)
        divisor = sum(w for _, w in agree) or 1.0
        out[i] = total / divisor if g.get("normalize", m == "ties") else total
    return base + lam * out.reshape(base.shape)


@pytest.mark.parametrize("case", list(CASES))
def test_mergekit_yaml_equals_the_float64_reference(rand, tmp_path, case):
    merged = run(CASES[case], rand, tmp_path / case)
    assert set(merged) == set(SHAPES)
    for name in SHAPES:
        ref = ref_mergekit(CASES[case], rand, name)
        assert merged[name].dtype == torch.float32
        assert float((merged[name].double() - ref).abs().max() / ref.abs().max()) <= 1e-5, name


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_keeps_entries_with_probability_density_and_rescales_to_the_l1_norm(rand, tmp_path, method):
    case = {"merge_method": method, "base_model": "parent", "dtype": "float32", "parameters": {"density": 0.4},
            "models": [{"model": "child1", "parameters": {"weight": 0.7}},
                       {"model": "child2", "parameters": {"weight": 0.5, "density": 0.8}}]}
    merged = run(case, rand, tmp_path / method)
    for name in SHAPES:
        ref = ref_mergekit(case, rand, name)
        assert float((merged[name].double() - ref).abs().max() / ref.abs().max()) <= 1e-5, name
    # the masks keep about `density` of the entries (mergekit's Bernoulli(density); its own draws differ)
    parent, child1 = load(rand / "parent"), load(rand / "child1")
    only1 = run({**case, "models": case["models"][:1]}, rand, tmp_path / f"{method}-one")
    kept = sum(int((only1[k] != parent[k]).sum()) for k in SHAPES if child1[k].numel() > 64)
    total = sum(child1[k].numel() for k in SHAPES if child1[k].numel() > 64)
    assert abs(kept / total - 0.4) < 0.05


# mergekit-yaml 0.1.5 (torch 2.13.0+cpu) on the `tied` family: the sum and sum of squares of every merged entry,
# and model.norm.weight. Regenerate with `python benchmarks/mergekit_expectations.py` (needs mergekit).
MERGEKIT_OUTPUTS = {
    'linear': {'sum': 11.3432497915, 'sumsq': 256.261267723,
        'norm': [-0.268999994, -0.336749971, -0.425000012, -0.492749989, -0.58100003, -0.700000048, -0.767750025, -0.856000066],
        'q_proj_row0': [-0.279000014, -0.398000002, -0.486250013, -0.55400002, -0.642249942, -0.710000038, -0.828999996, -0.917250037]},
    'linear_base_no_normalize': {'sum': 12.2907499752, 'sumsq': 399.233549541,
        'norm': [-0.323249996, -0.394999981, -0.507750034, -0.57950002, -0.692250013, -0.86650002, -0.938250005, -1.051],
        'q_proj_row0': [-0.355750024, -0.529999971, -0.642750025, -0.71450007, -0.827250004, -0.899000049, -1.07325006, -1.18600011]},
    'task_arithmetic': {'sum': 9.17725028377, 'sumsq': 255.462018888,
        'norm': [-0.256499976, -0.311249971, -0.396750003, -0.451499999, -0.537, -0.694249988, -0.748999953, -0.834500015],
        'q_proj_row0': [-0.282499999, -0.439749986, -0.525250018, -0.580000043, -0.665499985, -0.72025001, -0.877499998, -0.963]},
    'task_arithmetic_normalize_lambda': {'sum': 9.67010363936, 'sumsq': 255.896572502,
        'norm': [-0.274708331, -0.313937485, -0.408687502, -0.447916687, -0.542666674, -0.715145826, -0.754374981, -0.849124968],
        'q_proj_row0': [-0.260708332, -0.433187485, -0.527937531, -0.567166686, -0.661916673, -0.701145828, -0.87362498, -0.968375027]},
    'ties': {'sum': 11.2043806893, 'sumsq': 255.507684109,
        'norm': [-0.263999999, -0.317999989, -0.402999997, -0.449750006, -0.537, -0.696454525, -0.77274996, -0.864000022],
        'q_proj_row0': [-0.279285729, -0.439499974, -0.528999984, -0.541999996, -0.626999974, -0.714454532, -0.878000021, -0.951107144]},
    'ties_no_normalize_rescale': {'sum': 9.55148891371, 'sumsq': 256.847953138,
        'norm': [-0.273526281, -0.317999989, -0.402999997, -0.447000027, -0.518964887, -0.759789467, -0.780149043, -0.828000009],
        'q_proj_row0': [-0.220645353, -0.454524368, -0.524903297, -0.578000009, -0.662999988, -0.671566248, -0.899463415, -0.99908644]},
    'dare_linear': {'sum': 9.76549996203, 'sumsq': 255.634579133,
        'norm': [-0.264999986, -0.315499991, -0.407000005, -0.457500011, -0.549000025, -0.702000022, -0.752499938, -0.843999982],
        'q_proj_row0': [-0.275000006, -0.428000003, -0.519500017, -0.569999993, -0.661499977, -0.712000012, -0.86500001, -0.956499994]},
    'dare_ties': {'sum': 16.7764554024, 'sumsq': 283.711679829,
        'norm': [-0.267545432, -0.371571422, -0.442999989, -0.857999921, -0.532999992, -0.700727284, -0.80514282, -0.85163635],
        'q_proj_row0': [-0.277545452, -0.517999947, -0.133000076, -0.537999988, -0.606571436, -0.710727274, -0.883000016, -0.527999759]},
}


@pytest.mark.parametrize("case", list(CASES))
def test_mergekit_yaml_equals_mergekit_itself(tied, tmp_path, case):
    """Ties at the TIES threshold are broken as mergekit breaks them (torch's argsort), so even task vectors
    whose magnitudes tie by the dozen give mergekit's result."""
    if case not in MERGEKIT_OUTPUTS:
        pytest.skip("no stored mergekit output for this case")
    merged = run(CASES[case], tied, tmp_path / case)
    got = fingerprint(merged)
    for key, want in MERGEKIT_OUTPUTS[case].items():
        assert got[key] == pytest.approx(want, rel=1e-5, abs=1e-6), key


def fingerprint(merged: dict[str, torch.Tensor]) -> dict:
    """What the stored mergekit outputs record of a merge."""
    values = torch.cat([merged[k].double().reshape(-1) for k in sorted(merged)])
    return {"sum": float(values.sum()), "sumsq": float((values**2).sum()),
            "norm": [float(x) for x in merged["model.norm.weight"]],
            "q_proj_row0": [float(x) for x in merged["model.layers.0.self_attn.q_proj.weight"][0]]}


# --------------------------------------------------------------------------- forms, dtypes, refusals


def test_gradient_matching_in_mergekit_form_equals_our_form(rand, tmp_path):
    for name in MODELS:  # Hessians: a model folder each, values F ≥ 0
        folder = rand / f"{name}-fisher"
        if not folder.exists():
            folder.mkdir()
            save_file({k: v.abs() * 1e-2 for k, v in load(rand / name).items()}, folder / "model.safetensors")
            (folder / "config.json").write_text(json.dumps(CONFIG))
    ours = {"method": "gradient_matching", "base": str(rand / "parent"), "base_hessian": str(rand / "parent-fisher"),
            "base_hessian_scale": 100.0, "parameters": {"delta_0": 1e-6},
            "models": [{"model": str(rand / "child1"), "hessian": str(rand / "child1-fisher"), "weight": 0.8,
                        "hessian_scale": 50.0},
                       {"model": str(rand / "child2"), "hessian": str(rand / "child2-fisher"), "weight": 1.2,
                        "hessian_scale": 20.0}]}
    theirs = {"merge_method": "gradient_matching", "base_model": str(rand / "parent"), "parameters": {"delta_0": 1e-6},
              "models": [{"model": str(rand / "parent"), "hessian": str(rand / "parent-fisher"),
                          "parameters": {"hessian_scale": 100.0}},
                         {"model": str(rand / "child1"), "hessian": str(rand / "child1-fisher"),
                          "parameters": {"weight": 0.8, "hessian_scale": 50.0}},
                         {"model": str(rand / "child2"), "hessian": str(rand / "child2-fisher"),
                          "parameters": {"weight": 1.2, "hessian_scale": 20.0}}]}
    a = gradmatch.merge(ours, tmp_path / "ours", progress=False, card=False)
    b = gradmatch.merge(theirs, tmp_path / "theirs", progress=False, card=False)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()


def test_dtype_and_out_dtype_as_mergekit_reads_them(rand, tmp_path):
    case = dict(CASES["task_arithmetic"])
    case["dtype"] = "bfloat16"  # mergekit writes in its dtype ...
    assert {v.dtype for v in run(case, rand, tmp_path / "bf16").values()} == {torch.bfloat16}
    case["out_dtype"] = "float16"  # ... unless out_dtype says otherwise
    assert {v.dtype for v in run(case, rand, tmp_path / "fp16").values()} == {torch.float16}
    del case["dtype"], case["out_dtype"]  # neither: the parent's stored dtype
    assert {v.dtype for v in run(case, rand, tmp_path / "stored").values()} == {torch.float32}


def test_the_card_of_a_mergekit_merge_holds_the_yaml_as_written(rand, tmp_path):
    (tmp_path / "ties.yml").write_text(yaml.safe_dump(materialise(CASES["ties"], rand)))
    assert main(["merge", str(tmp_path / "ties.yml"), str(tmp_path / "out"), "--quiet"]) == 0
    card = (tmp_path / "out" / "README.md").read_text()
    assert (tmp_path / "ties.yml").read_text().strip() in card
    assert "gradmatch merge ties.yml OUT" in card and "**ties**" in card
    assert "`edge_rules` = mergekit" in card


def test_unknown_parameters_are_ignored_with_a_warning_as_mergekit_ignores_them(rand, tmp_path, caplog):
    case = json.loads(json.dumps(CASES["task_arithmetic"]))
    case["parameters"] = {"foo": 1}
    case["models"][0]["parameters"]["t"] = 0.5
    from test_llm_merge import captured_warnings

    with captured_warnings(caplog, "gradmatch.config.mergekit"):
        merged = run(case, rand, tmp_path / "out")
    assert torch.equal(merged["model.norm.weight"], run(CASES["task_arithmetic"], rand, tmp_path / "plain")["model.norm.weight"])
    assert "parameters.foo is not a parameter of mergekit's task_arithmetic" in caplog.text
    assert "models[0].parameters.t is not a per-model parameter" in caplog.text


REFUSALS = {
    "slerp": ({"merge_method": "slerp", "base_model": "parent", "models": [{"model": "child1"}, {"model": "child2"}],
               "parameters": {"t": 0.5}}, ["merge_method", "'slerp' is a mergekit method that gradmatch does not have"]),
    "missing weight": ({"merge_method": "ties", "base_model": "parent", "models": [
        {"model": "child1", "parameters": {"weight": 1}}, {"model": "child2"}]}, ["models[1]", "has no weight"]),
    "gradient": ({"merge_method": "ties", "base_model": "parent", "models": [
        {"model": "child1", "parameters": {"weight": 1, "density": [1, 0.5]}}]},
        ["models[0].parameters.density", "per-layer values"]),
    "filter": ({"merge_method": "task_arithmetic", "base_model": "parent", "models": [
        {"model": "child1", "parameters": {"weight": [{"filter": "mlp", "value": 0.5}, {"value": 1}]}}]},
        ["models[0].parameters.weight", "per-layer values"]),
    "slices": ({"merge_method": "linear", "slices": [{"sources": [{"model": "child1", "layer_range": [0, 1]}]}]},
               ["slices", "not supported"]),
    "tokenizer": ({"merge_method": "linear", "tokenizer_source": "union",
                   "models": [{"model": "child1", "parameters": {"weight": 1}}]}, ["tokenizer_source", "union"]),
    "no base": ({"merge_method": "task_arithmetic", "models": [{"model": "child1", "parameters": {"weight": 1}}]},
                ["base_model", "needs base_model"]),
    "both forms": ({"merge_method": "ties", "method": "ties", "base_model": "parent",
                    "models": [{"model": "child1", "parameters": {"weight": 1}}]}, ["merge_method", "not both"]),
    "bad dtype": ({"merge_method": "linear", "dtype": "int8", "models": [{"model": "child1", "parameters": {"weight": 1}}]},
                  ["dtype", "'int8'"]),
    "method as a list": ({"merge_method": ["ties"], "base_model": "parent", "models": [{"model": "child1"}]},
                         ["merge_method", "must be the name of a merge method, not list"]),
    "method as a mapping": ({"merge_method": {"a": 1}, "base_model": "parent", "models": [{"model": "child1"}]},
                            ["merge_method", "not dict"]),
    "Hessian for ties": ({"merge_method": "ties", "base_model": "parent", "base_hessian": "parent",
                          "models": [{"model": "child1", "parameters": {"weight": 1}}]},
                         ["base_hessian", "mergekit's ties uses no Hessian"]),
    "own method without base": ({"merge_method": "gradient_matching",
                                 "models": [{"model": "child1"}, {"model": "child2"}]},
                                ["base_model", "gradient_matching needs base_model"]),
}


@pytest.mark.parametrize("what", list(REFUSALS))
def test_what_gradmatch_cannot_run_is_one_line(rand, tmp_path, capsys, what):
    case, words = REFUSALS[what]
    case = json.loads(json.dumps(case))
    if "base_model" in case:
        case["base_model"] = str(rand / case["base_model"])
    for entry in case.get("models", []):
        entry["model"] = str(rand / entry["model"])
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(case))
    assert main(["merge", str(tmp_path / "m.yaml"), str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("gradmatch: error: ") and "m.yaml" in err, err
    for word in words:
        assert word in err, err
    assert not (tmp_path / "out").exists()
