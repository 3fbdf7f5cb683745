"""The violations the fresh hostile pass on the merge engine left (docs/reliability.md), each fixed at its root:
Hessians judged as stored and overflow reported as what it is; an all-zero Gram; Grams of GPT-2's Conv1D layers;
a folder holding a model and a LoRA adapter. (The fingerprint's: tests/test_fingerprint.py.) Expected values come
from float64 formulas written here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_merge import N_CHILDREN, N_PARENT, build_family, gm_config, load_folder
from test_methods import ref_gradient_matching

from gradmatch.errors import UserError
from gradmatch.merge import merge

ALPHAS = (1.0, 0.7, 1.3)


# --------------------------------------------------------------------------- Hessians judged as stored


def _parent_hessian(fam: dict, value: float, dtype=torch.float64, where=(5, 3)) -> Path:
    """The family's parent Hessian stored in ``dtype`` with one entry of emb.weight set to ``value``."""
    path = fam["parent_hessian"] / "hessian" / "model.safetensors"
    tensors = {k: v.to(dtype) for k, v in load_file(path).items()}
    tensors["emb.weight"][where] = value
    save_file(tensors, path, metadata={"format": "pt"})
    return path


def _expected(fam: dict, name: str) -> torch.Tensor:
    p, cs = load_folder(fam["parent"]), [load_folder(c) for c in fam["children"]]
    f0, fs = load_folder(fam["parent_hessian"] / "hessian"), [load_folder(h) for h in fam["hessians"]]
    return ref_gradient_matching(p[name], [c[name] for c in cs], f0[name], [f[name] for f in fs], ALPHAS, N_PARENT,
                                 N_CHILDREN, 1e-12)


@pytest.mark.parametrize("kernel", ["reference", "fused"])
def test_a_negative_float64_hessian_entry_below_float32s_range_is_refused(tmp_path, kernel):
    """−1e-300 is −0 in float32: judged after conversion it passed; a Hessian has no negative entry however small."""
    fam = build_family(tmp_path / "fam")
    path = _parent_hessian(fam, -1e-300)
    with pytest.raises(UserError, match=rf"tensor 'emb.weight' of {path} has negative values \(down to -1e-300\)"):
        merge(gm_config(fam), tmp_path / "out", progress=False, kernel=kernel)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kernel", ["reference", "fused"])
def test_a_finite_float64_hessian_beyond_float32_is_not_called_nan_and_float64_merges_it(tmp_path, kernel):
    fam = build_family(tmp_path / "fam")
    path = _parent_hessian(fam, 1e300)
    with pytest.raises(UserError) as err:
        merge(gm_config(fam), tmp_path / "out", progress=False, kernel=kernel)
    message = str(err.value)
    assert "NaN or Inf values" not in message
    for words in ("tensor 'emb.weight'", "overflows float32, the compute precision", f"{path} holds 1e+300",
                  "--precision float64 merges it"):
        assert words in message, (words, message)
    assert not (tmp_path / "out").exists()
    merge(gm_config(fam), tmp_path / "wide", progress=False, precision="float64")
    out = load_file(tmp_path / "wide" / "model.safetensors")["emb.weight"]
    assert torch.allclose(out.double(), _expected(fam, "emb.weight"), rtol=1e-6, atol=1e-7)


def test_a_float32_overflow_of_n0_f0_says_float64_merges_it(tmp_path):
    """F_0 = 1e36 (a float32 value) times N_0 = 2000 is beyond float32: 'the merged values overflow' was untrue."""
    fam = build_family(tmp_path / "fam")
    _parent_hessian(fam, 1e36, dtype=torch.float32)
    with pytest.raises(UserError) as err:
        merge(gm_config(fam), tmp_path / "out", progress=False)
    message = str(err.value)
    assert "overflows float32, the compute precision" in message and "--precision float64 merges it" in message
    assert "NaN or Inf values" not in message
    merge(gm_config(fam), tmp_path / "wide", progress=False, precision="float64")
    out = load_file(tmp_path / "wide" / "model.safetensors")["emb.weight"]
    expected = _expected(fam, "emb.weight")
    assert torch.isfinite(expected).all()
    assert torch.allclose(out.double(), expected, rtol=1e-6, atol=1e-7)


def test_an_overflow_in_float64_too_says_so(tmp_path):
    fam = build_family(tmp_path / "fam")
    _parent_hessian(fam, 1e306)  # N_0 · 1e306 = 2e309: beyond float64
    assert not torch.isfinite(_expected(fam, "emb.weight")).all()
    for precision in ("float32", "float64"):
        with pytest.raises(UserError, match="tensor 'emb.weight'.*overflow.*float64") as err:
            merge(gm_config(fam), tmp_path / "out", progress=False, precision=precision)
        assert "--precision float64 merges it" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_nan_stored_in_a_float64_hessian_is_still_named(tmp_path):
    fam = build_family(tmp_path / "fam")
    path = _parent_hessian(fam, float("nan"))
    with pytest.raises(UserError, match=rf"tensor 'emb.weight' of {path} holds NaN or Inf values"):
        merge(gm_config(fam), tmp_path / "out", progress=False)


# --------------------------------------------------------------------------- RegMean's Grams: zero, and Conv1D


def _gram_layers(folder: Path) -> dict[str, tuple[int, bool]]:
    """Every layer of the model in ``folder`` that RegMean merges by a Gram, as transformers builds it: {weight name:
    (input size, stored in × out)} — nn.Linear weights not tied to the embeddings, and GPT-2's Conv1D."""
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    model = AutoModelForCausalLM.from_pretrained(folder)
    tied = {id(model.get_input_embeddings().weight)}
    layers = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and id(m.weight) not in tied:
            layers[f"{name}.weight"] = (m.weight.shape[1], False)
        elif isinstance(m, Conv1D):
            layers[f"{name}.weight"] = (m.weight.shape[0], True)
    return layers


def _regmean_family(root: Path, family: str) -> dict:
    """A tiny causal LM parent, two children near it and a hand-made Gram file per child: for every layer a
    random positive definite (X^T X / n of 40 random inputs), with gram.json counting 40 positions."""
    from conftest import make_tiny_lm

    parent = make_tiny_lm(root / "parent", family=family, tie=True)
    layers = _gram_layers(parent)
    g = torch.Generator().manual_seed(7)
    children, grams = [], []
    for t in range(2):
        child = root / f"child{t}"
        child.mkdir()
        for f in parent.iterdir():
            if f.name != "model.safetensors":
                (child / f.name).write_bytes(f.read_bytes())
        weights = load_file(parent / "model.safetensors")
        save_file({k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
                   for k, v in weights.items()}, child / "model.safetensors", metadata={"format": "pt"})
        tensors = {}
        for name, (size, _) in layers.items():
            X = torch.randn(40, size, generator=g, dtype=torch.float64) * (1 + t)
            tensors[name] = ((X.t() @ X) / 40).float()
        folder = _write_grams(root / f"gram{t}", tensors, {name: 40 for name in layers})
        children.append(child)
        grams.append(folder)
    return {"parent": parent, "children": children, "grams": grams, "layers": layers}


def _write_grams(folder: Path, tensors: dict, positions: dict | None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "gram.safetensors", metadata={"format": "pt"})
    if positions is not None:
        (folder / "gram.json").write_text(json.dumps({"examples": 4, "positions": positions}))
    elif (folder / "gram.json").exists():
        (folder / "gram.json").unlink()
    return folder


def _regmean_config(fam: dict, grams=None, weights=(1.0, 1.0), **parameters) -> dict:
    return {"method": "regmean", "base": str(fam["parent"]), "parameters": {"reduce_nondiagonal": 0.9, **parameters},
            "models": [{"model": str(c), "gram": str(g), "weight": w}
                       for c, g, w in zip(fam["children"], grams or fam["grams"], weights)]}


@pytest.fixture(scope="module")
def llama_family(tmp_path_factory):
    return _regmean_family(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="module")
def gpt2_family(tmp_path_factory):
    return _regmean_family(tmp_path_factory.mktemp("gpt2"), "gpt2")


_LAYER = "model.layers.0.mlp.down_proj.weight"


def _zeroed(fam: dict, root: Path, child: int, positions: int | None, record: bool = True) -> list[Path]:
    """The family's Grams with child ``child``'s Gram of _LAYER all zero (gram.json: ``positions`` for it, or none)."""
    grams = list(fam["grams"])
    tensors = load_file(grams[child] / "gram.safetensors")
    tensors[_LAYER] = torch.zeros_like(tensors[_LAYER])
    counts = json.loads((grams[child] / "gram.json").read_text())["positions"]
    if positions is None:
        counts.pop(_LAYER)
    else:
        counts[_LAYER] = positions
    grams[child] = _write_grams(root / f"zeroed{child}", tensors, counts if record else None)
    return grams


def test_an_all_zero_gram_whose_inputs_were_zero_gets_a_note_and_no_say(llama_family, tmp_path, caplog):
    """gram.json counts 40 positions: the inputs were zero vectors, so child 1 puts no constraint on the layer and
    RegMean's least squares gives child 0's weight there — said in a note, no longer silently."""
    fam = llama_family
    grams = _zeroed(fam, tmp_path, child=1, positions=40)
    with caplog.at_level("WARNING", logger="gradmatch"):
        merge(_regmean_config(fam, grams), tmp_path / "out", progress=False)
    notes = [r.getMessage() for r in caplog.records if _LAYER in r.getMessage()]
    assert len(notes) == 1 and "gram of models[1]" in notes[0] and "is zero" in notes[0], notes
    assert "its 40 input positions were all zero vectors" in notes[0] and "other children" in notes[0]
    merged = load_file(tmp_path / "out" / "model.safetensors")[_LAYER].double()
    child0 = load_file(fam["children"][0] / "model.safetensors")[_LAYER].double()
    assert torch.allclose(merged, child0, rtol=1e-4, atol=1e-5)  # (W_0 G̃_0 + 0)(G̃_0 + 0)⁻¹ = W_0


@pytest.mark.parametrize("record", ["0 positions", "no positions for it", "no gram.json"])
def test_an_all_zero_gram_of_a_layer_that_saw_no_input_is_refused(llama_family, tmp_path, record):
    fam = llama_family
    grams = _zeroed(fam, tmp_path, child=1, positions=0 if record == "0 positions" else None,
                    record=record != "no gram.json")
    expected = {"0 positions": "gram.json records 0 input positions for it",
                "no positions for it": "gram.json records no positions for it",
                "no gram.json": "no gram.json counts its inputs"}[record]
    with pytest.raises(UserError) as err:
        merge(_regmean_config(fam, grams), tmp_path / "out", progress=False)
    message = str(err.value)
    for words in (f"gram of models[1] {grams[1]}", f"the Gram of {_LAYER} is all zero", expected, "saw no input"):
        assert words in message, (words, message)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("epsilon", [0.0, 1e-3])
def test_every_gram_of_a_layer_zero_does_not_suggest_an_epsilon(llama_family, tmp_path, epsilon):
    fam = llama_family
    grams = _zeroed(fam, tmp_path, child=1, positions=40)
    tensors = load_file(grams[0] / "gram.safetensors")
    tensors[_LAYER] = torch.zeros_like(tensors[_LAYER])
    grams[0] = _write_grams(tmp_path / "both0", tensors, json.loads((grams[0] / "gram.json").read_text())["positions"])
    with pytest.raises(UserError) as err:
        merge(_regmean_config(fam, grams, epsilon=epsilon), tmp_path / "out", progress=False)
    message = str(err.value)
    assert _LAYER in message and "is zero" in message and "an epsilon cannot help" in message, message
    assert "set parameters.epsilon" not in message
    assert not (tmp_path / "out").exists()


def _conv1d_reference(Ws, Gs, weights, r):
    """A Conv1D weight W (in × out: y = x W) merged by RegMean, in float64 numpy: the W minimising
    Σ_t w_t ‖X_t W − X_t W_t‖² with X_tᵀX_t → G̃_t is (Σ_t w_t G̃_t)⁻¹ Σ_t w_t G̃_t W_t."""
    import numpy as np

    reduced = [r * G + (1 - r) * np.diag(np.diag(G)) for G in Gs]
    A = sum(w * G for w, G in zip(weights, reduced))
    B = sum(w * G @ W for w, G, W in zip(weights, reduced, Ws))
    return np.linalg.inv(A) @ B


def _linear_reference(Ws, Gs, weights, r):
    """A Linear weight W (out × in: y = W x) merged by RegMean, in float64 numpy: (Σ_t w_t W_t G̃_t)(Σ_t w_t G̃_t)⁻¹."""
    import numpy as np

    reduced = [r * G + (1 - r) * np.diag(np.diag(G)) for G in Gs]
    return sum(w * W @ G for w, W, G in zip(weights, Ws, reduced)) @ np.linalg.inv(sum(w * G for w, G in zip(weights, reduced)))


@pytest.mark.parametrize("block_rows", [None, 3])
def test_grams_of_gpt2s_conv1d_layers_are_applied_in_their_orientation(gpt2_family, tmp_path, block_rows):
    import numpy as np

    fam = gpt2_family
    assert any(conv for _, conv in fam["layers"].values())
    weights = (1.0, 2.5)
    merge(_regmean_config(fam, weights=weights), tmp_path / "out", progress=False, block_rows=block_rows)
    merged = load_file(tmp_path / "out" / "model.safetensors")
    children = [load_file(c / "model.safetensors") for c in fam["children"]]
    grams = [load_file(g / "gram.safetensors") for g in fam["grams"]]
    for name, (_, conv) in fam["layers"].items():
        assert conv, name  # GPT-2: every Gram layer is a Conv1D (its lm_head is tied)
        expected = _conv1d_reference([c[name].double().numpy() for c in children],
                                     [g[name].double().numpy() for g in grams], weights, 0.9)
        assert merged[name].shape == children[0][name].shape
        np.testing.assert_allclose(merged[name].double().numpy(), expected, rtol=1e-4, atol=1e-5, err_msg=name)
        if merged[name].shape[0] == merged[name].shape[1]:  # square (attn.c_proj): the Linear formula on the
            as_linear = _linear_reference([c[name].double().numpy() for c in children],  # stored weight (what the
                                          [g[name].double().numpy() for g in grams], weights, 0.9)  # old code did)
            assert np.abs(as_linear - expected).max() > 1e-2, name  # is another matrix: orientation is tested
    mean = {k: (weights[0] * children[0][k].double() + weights[1] * children[1][k].double()) / sum(weights)
            for k in children[0] if k not in fam["layers"] and children[0][k].is_floating_point()}
    for name, value in mean.items():  # every tensor without a Gram: the weighted average
        assert torch.allclose(merged[name].double(), value, rtol=1e-5, atol=1e-6), name


def test_a_conv1d_gram_of_the_wrong_size_names_the_orientation(gpt2_family, tmp_path):
    fam = gpt2_family
    name = "transformer.h.0.mlp.c_proj.weight"  # in × out = 64 × 16: its Gram is 64 × 64
    grams = []
    for i, folder in enumerate(fam["grams"]):
        tensors = load_file(folder / "gram.safetensors")
        tensors[name] = torch.eye(16)
        grams.append(_write_grams(tmp_path / f"g{i}", tensors, json.loads((folder / "gram.json").read_text())["positions"]))
    with pytest.raises(UserError, match=rf"the Gram of {name} is 16 × 16 but the weight's input size is 64 "
                                        r"\(a Conv1D weight, stored in × out\)"):
        merge(_regmean_config(fam, grams), tmp_path / "out", progress=False)


# --------------------------------------------------------------------------- a model folder holding an adapter too


@pytest.mark.parametrize("role", ["models[0]", "base model"])
def test_a_folder_holding_a_model_and_a_lora_adapter_is_refused(tmp_path, role):
    """peft's save_pretrained into a model's own folder: transformers' from_pretrained then loads the folder's weights
    with the adapter attached (checked here), which the merge, reading model.safetensors, would leave out."""
    from conftest import make_tiny_lm
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    parent = make_tiny_lm(tmp_path / "parent", family="llama")
    child = make_tiny_lm(tmp_path / "child", family="llama", seed=1)
    adapted = get_peft_model(AutoModelForCausalLM.from_pretrained(child),
                             LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    adapted.save_pretrained(child)
    assert (child / "adapter_config.json").is_file() and (child / "model.safetensors").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(child)
    assert any("lora_A" in name for name in loaded.state_dict())  # transformers attached the adapter
    base, model = (child, parent) if role == "base model" else (parent, child)
    config = {"method": "task_arithmetic", "base": str(base), "models": [{"model": str(model), "weight": 0.5}]}
    with pytest.raises(UserError) as err:
        merge(config, tmp_path / "out", progress=False)
    message = str(err.value)
    for words in (f"{role} {child} holds a full model (model.safetensors) and a LoRA/PEFT adapter",
                  "adapter_config.json, adapter_model.safetensors",
                  "transformers loads the weights with the adapter attached", "merge_and_unload"):
        assert words in message, (words, message)
    assert "\n" not in message and not (tmp_path / "out").exists()
