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
