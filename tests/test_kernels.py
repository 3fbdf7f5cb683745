"""The fused CPU kernels (gradmatch.kernels) against float64 references written the simple way, their
rounding against torch's conversions, their flags, threads, and the engine's fused path against its
reference path."""

from __future__ import annotations

import importlib
import json

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import gradmatch
from gradmatch import kernels
from gradmatch.errors import UserError
from gradmatch.methods.base import MergeMethod
from gradmatch.methods.gradient_matching import gradient_matching as reference_gm

from test_llm_merge import ALPHAS, gm, llama, load_dir  # noqa: F401 - llama is a fixture
from test_methods import ref_gradient_matching

DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64]
OUT_DTYPES = [torch.bfloat16, torch.float16, torch.float32]
EPS32 = torch.finfo(torch.float32).eps


def family(seed: int, n: int, T: int, dtype: torch.dtype, fisher_dtype: torch.dtype, zero_fraction: float = 0.0):
    """θ_0 ~ N(0, 1), θ_t = θ_0 + N(0, 0.05²), Fishers ≥ 0 (some exactly zero), stored in the dtypes given."""
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(n, generator=g, dtype=torch.float64)
    cs = [p + 0.05 * torch.randn(n, generator=g, dtype=torch.float64) for _ in range(T)]

    def fisher():
        f = torch.rand(n, generator=g, dtype=torch.float64) ** 2
        return torch.where(torch.rand(n, generator=g, dtype=torch.float64) < zero_fraction, 0.0, f).to(fisher_dtype)

    return p.to(dtype), [c.to(dtype) for c in cs], fisher(), [fisher() for _ in range(T)]


def run_gm(out_dtype, p, cs, f0, fs, alphas, N0, Ns, delta, R=10.0, threads=1):
    out = torch.empty(p.shape, dtype=out_dtype)
    stats: dict = {}
    ok = kernels.gradient_matching(kernels.bits(out), kernels.bits(p), [kernels.bits(c) for c in cs], kernels.bits(f0),
                                   [kernels.bits(f) for f in fs], alphas=alphas, parent_scale=N0, scales=Ns,
                                   delta_0=delta, max_update_ratio=R, stats=stats, threads=threads)
    return ok, out, stats


def tolerance(out_dtype, exact, scale):
    """Computed in float32 (error a few float32 steps of ``scale``, the size of the terms), then rounded once to
    the output dtype (half a step of the result, and of the smallest subnormal)."""
    info = torch.finfo(out_dtype)
    return 0.5 * info.eps * exact.abs() + 32 * EPS32 * scale + info.smallest_normal * info.eps


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(0, 3 * kernels.CHUNK + 5), T=st.integers(1, 4),
       dtype=st.sampled_from(DTYPES), fisher_dtype=st.sampled_from(DTYPES), out_dtype=st.sampled_from(OUT_DTYPES),
       alphas=st.lists(st.floats(0.05, 2.0), min_size=4, max_size=4), N0=st.floats(0.0, 1e4),
       Ns=st.lists(st.floats(0.0, 1e4), min_size=4, max_size=4), delta=st.sampled_from([1e-12, 1e-6, 1.0]))
def test_gradient_matching_kernel_equals_the_float64_formula(seed, n, T, dtype, fisher_dtype, out_dtype, alphas, N0,
                                                             Ns, delta):
    p, cs, f0, fs = family(seed, n, T, dtype, fisher_dtype, zero_fraction=0.2)
    alphas, Ns = alphas[:T], Ns[:T]
    ok, out, stats = run_gm(out_dtype, p, cs, f0, fs, alphas, N0, Ns, delta)
    assert ok and stats == {}
    exact = ref_gradient_matching(p, cs, f0, fs, alphas, N0, Ns, delta)
    # |θ − θ_0| ≤ Σ_t max(1, 1/α_t)|τ_t| (each factor (H_0 + H_t)/D is at most max(1, 1/α_t))
    scale = p.double().abs() + sum(max(1.0, 1 / a) * (c.double() - p.double()).abs() for a, c in zip(alphas, cs))
    assert bool(((out.double() - exact).abs() <= tolerance(out_dtype, exact, scale)).all())


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 2 * kernels.CHUNK + 3),
       dtype=st.sampled_from([torch.bfloat16, torch.float32]), out_dtype=st.sampled_from(OUT_DTYPES),
       alphas=st.lists(st.floats(-3.0, 2.0), min_size=3, max_size=3), N0=st.floats(0.0, 1e3),
       Ns=st.lists(st.floats(0.0, 1e3), min_size=3, max_size=3), R=st.sampled_from([1.0, 3.0, 10.0, 100.0]))
@example(seed=0, n=2049, dtype=torch.bfloat16, out_dtype=torch.float32, alphas=[0.0, 1.0, -2.0], N0=0.0,
         Ns=[0.0, 1.5, 16.0], R=100.0)  # D = 0.002 from terms of 0.72: found by CI's draw
def test_gradient_matching_kernel_with_the_removal_guard(seed, n, dtype, out_dtype, alphas, N0, Ns, R):
    """With some α_t < 0: the guarded minimiser of docs/merge.md (float64, entry by entry), every update
    within R·Σ|α_t τ_t|, and the count of guarded entries that the float64 formula gives."""
    p, cs, f0, fs = family(seed, n, 3, dtype, dtype, zero_fraction=0.2)
    alphas = [a if abs(a) > 1e-3 else 0.0 for a in alphas]
    if min(alphas) >= 0:
        alphas = [alphas[0] - 3.0, *alphas[1:]]
    delta = 1e-6
    ok, out, stats = run_gm(out_dtype, p, cs, f0, fs, alphas, N0, Ns, delta, R)
    assert ok
    assert torch.isfinite(out).all()
    pd, cd, f0d, fd = p.double(), [c.double() for c in cs], f0.double(), [f.double() for f in fs]
    H0 = N0 * f0d + delta
    D = H0 + sum(a * N * f for a, N, f in zip(alphas, Ns, fd))
    num = sum(a * (H0 + N * f) * (c - pd) for a, N, f, c in zip(alphas, Ns, fd, cd))
    bound = R * sum(abs(a) * (c - pd).abs() for a, c in zip(alphas, cd))
    curvature = H0 + sum(abs(a) * N * f for a, N, f in zip(alphas, Ns, fd))
    settled = D.abs() > 1e-4 * curvature  # where float32 and float64 agree on the sign of D
    exact = ref_gradient_matching(p, cs, f0, fs, alphas, N0, Ns, delta, R)
    err = (out.double() - exact).abs()
    plain = (num / D).abs()
    # D is a float32 sum whose terms cancel (|D| ≪ curvature where α_t < 0): its rounding, a few float32 steps of
    # the curvature, is a relative error curvature/|D| times larger in the update num/D
    conditioning = 32 * EPS32 * plain * curvature / D.abs().clamp_min(1e-300)
    assert bool((err <= tolerance(out_dtype, exact, pd.abs() + bound) + conditioning)[settled].all())
    assert bool(((out.double() - pd).abs() <= bound * (1 + 1e-5) + tolerance(out_dtype, exact, pd.abs())).all())
    clearly = int(((D <= 0) | (plain > bound * (1 + 1e-3)))[settled].sum())
    maybe = int(((D <= 0) | (plain > bound * (1 - 1e-3)) | ~settled).sum())
    assert clearly <= stats["guarded_entries"] <= maybe


@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernels_read_and_round_exactly_as_torch_converts(dtype, out_dtype):
    """Task arithmetic with τ = 0 is θ_0 + 0 (θ_0 itself but for −0, which becomes +0): what the kernel reads and
    writes is torch's own conversion (round to nearest even; subnormals, the largest values)."""
    g = torch.Generator().manual_seed(3)
    values = torch.cat([torch.randn(3000, generator=g, dtype=torch.float64) * 10.0 ** torch.randint(-45, 39, (3000,), generator=g),
                        torch.tensor([0.0, -0.0, 1.0, 65504.0, 65520.0, 3.3895e38, 1e-40, -1e-45, 5.96e-8, 2.98e-8])])
    values = values.to(dtype)
    if dtype == torch.float64:  # inf once in float32: only ±inf of float64 beyond float32's range
        values = values.clamp(-3.4e38, 3.4e38)
    out = torch.empty(values.shape, dtype=out_dtype)
    ok = kernels.task_arithmetic(kernels.bits(out), kernels.bits(values), [kernels.bits(values)], weights=[0.7])
    theta = values.float()
    expected = (theta + 0.7 * (theta - theta)).to(out_dtype)
    assert ok == bool(torch.isfinite(expected).all())
    nan = expected.isnan()  # inf − inf: NaN (its payload is not ours to match)
    assert torch.equal(out.isnan(), nan)
    bits = {2: torch.int16, 4: torch.int32}[out.element_size()]
    assert torch.equal(out.view(bits)[~nan], expected.view(bits)[~nan])


def test_kernels_flag_what_the_reference_refuses():
    n = 5000
    p, cs, f0, fs = family(0, n, 2, torch.bfloat16, torch.bfloat16)
    args = dict(alphas=[1.0, 0.5], N0=100.0, Ns=[10.0, 20.0], delta=1e-6)
    assert run_gm(torch.bfloat16, p, cs, f0, fs, **args)[0]
    negative = fs[1].clone()
    negative[4321] = -1e-3
    assert not run_gm(torch.bfloat16, p, cs, f0, [fs[0], negative], **args)[0]
    nan = cs[0].clone()
    nan[17] = float("nan")
    assert not run_gm(torch.bfloat16, p, [nan, cs[1]], f0, fs, **args)[0]
    zero = torch.zeros(n, dtype=torch.bfloat16)  # every Hessian 0 and δ = 0: D = 0 (the reference raises)
    assert not run_gm(torch.bfloat16, p, cs, zero, [zero, zero], args["alphas"], 1.0, [1.0, 1.0], 0.0)[0]
    # with the guard (α < 0) D ≤ 0 is the guard's case, not a failure: every entry is guarded, and with no
    # curvature anywhere the objective is flat (numerator 0), so nothing moves
    ok, out, stats = run_gm(torch.bfloat16, p, cs, zero, [zero, zero], [1.0, -0.5], 1.0, [1.0, 1.0], 0.0)
    assert ok and stats["guarded_entries"] == n and torch.equal(out, p)
    # finite in float32 but beyond bf16's range after rounding: flagged
    big = torch.full((n,), 3.39e38, dtype=torch.float32)
    out = torch.empty(n, dtype=torch.bfloat16)
    assert not kernels.task_arithmetic(kernels.bits(out), kernels.bits(big), [kernels.bits(big * 0.5)], weights=[-0.01])


def test_threads_split_the_block_and_give_the_same_bits():
    n = 40 * kernels.CHUNK + 17
    p, cs, f0, fs = family(5, n, 3, torch.bfloat16, torch.float32)
    for alphas in ([1.0, 0.5, 2.0], [1.0, -1.0, 0.5]):
        ok1, out1, stats1 = run_gm(torch.bfloat16, p, cs, f0, fs, alphas, 50.0, [40.0, 30.0, 20.0], 1e-3, threads=1)
        ok3, out3, stats3 = run_gm(torch.bfloat16, p, cs, f0, fs, alphas, 50.0, [40.0, 30.0, 20.0], 1e-3, threads=3)
        assert ok1 and ok3 and stats1 == stats3
        assert torch.equal(out1.view(torch.int16), out3.view(torch.int16))


def test_mixed_dtypes_among_the_children_are_read_as_float32():
    n = 3 * kernels.CHUNK
    p, cs, f0, fs = family(2, n, 3, torch.float32, torch.float32)
    mixed = [cs[0].to(torch.bfloat16), cs[1].to(torch.float16), cs[2]]
    ok, out, _ = run_gm(torch.float32, p, mixed, f0, [fs[0].half(), fs[1], fs[2].bfloat16()], [1.0, 0.5, 1.5],
                        10.0, [5.0, 6.0, 7.0], 1e-6)
    expected = reference_gm(p, [c.float() for c in mixed], parent_fisher=f0, fishers=[fs[0].half().float(), fs[1],
                            fs[2].bfloat16().float()], alphas=[1.0, 0.5, 1.5], parent_scale=10.0, scales=[5.0, 6.0, 7.0],
                            stats={}, delta_0=1e-6)
    assert ok and torch.allclose(out, expected, rtol=1e-6, atol=1e-6)


def test_a_fused_kernel_must_match_its_method():
    def formula(parent, children, *, alphas):
        return parent

    def fused(out, parent, children, *, alphas, threads=1):
        return True

    def wrong(out, parent, children, *, weights, threads=1):
        return True

    MergeMethod(formula, elementwise=True, propagates_nan=True, fused=fused, name="ok").check()
    with pytest.raises(TypeError, match="fused kernel must take"):
        MergeMethod(formula, elementwise=True, propagates_nan=True, fused=wrong, name="x").check()
    with pytest.raises(TypeError, match="propagates NaN"):
        MergeMethod(formula, elementwise=True, fused=fused, name="y").check()


# --------------------------------------------------------------------------- the engine's fused path


def merged_and_record(config, out, **options):
    folder = gradmatch.merge(config, out, progress=False, card=False, **options)
    return load_dir(folder), json.loads((folder / "merge.json").read_text())


def test_fused_and_reference_merges_agree(llama, tmp_path):
    """bf16 Llama, fp16/bf16 Hessians (mixed: read as float32), blocks across rows: the fused merge is within a
    bf16 step of the reference merge, mostly identical, and each is within half a step of the float64 formula."""
    fused, record = merged_and_record(gm(llama), tmp_path / "fused", kernel="fused", block_rows=5)
    reference, record_ref = merged_and_record(gm(llama), tmp_path / "ref", kernel="reference", block_rows=5)
    assert record["kernel"] == "fused" and record_ref["kernel"] == "reference"
    same = sum(int((fused[k] == reference[k]).sum()) for k in fused)
    assert same >= 0.97 * sum(v.numel() for v in fused.values())
    for k in fused:
        assert fused[k].dtype == torch.bfloat16
        assert bool(((fused[k].float() - reference[k].float()).abs() <= reference[k].float().abs() * 2.0**-7 + 1e-30).all()), k


def test_fused_merges_with_a_prior_a_removal_and_float32_outputs(llama, tmp_path):
    config = gm(llama, base_hessian="prior")
    config["models"][1]["weight"] = -0.5
    fused, record = merged_and_record(config, tmp_path / "f", kernel="fused", out_dtype="float32")
    reference, record_ref = merged_and_record(config, tmp_path / "r", kernel="reference", out_dtype="float32")
    assert record["statistics"] == record_ref["statistics"]
    for k in fused:
        assert torch.allclose(fused[k], reference[k], rtol=1e-5, atol=1e-6), k


def test_fused_task_arithmetic_reads_bin_checkpoints(llama, tmp_path):
    child = tmp_path / "bin-child"
    child.mkdir()
    torch.save(load_dir(llama["children"][0]), child / "pytorch_model.bin")
    (child / "config.json").write_text((llama["children"][0] / "config.json").read_text())
    config = {"method": "task_arithmetic", "base": str(llama["parent"]),
              "models": [{"model": str(child), "weight": 0.7}, {"model": str(llama["children"][1]), "weight": 0.4}]}
    fused, _ = merged_and_record(config, tmp_path / "f", kernel="fused", block_rows=3)
    reference, _ = merged_and_record(config, tmp_path / "r", kernel="reference", block_rows=3)
    for k in fused:
        assert bool(((fused[k].float() - reference[k].float()).abs() <= reference[k].float().abs() * 2.0**-7 + 1e-30).all()), k


def test_the_fused_path_names_bad_inputs_as_the_reference_does(llama, tmp_path):
    hessian = tmp_path / "bad-hessian"
    hessian.mkdir()
    tensors = load_dir(llama["hessians"][0])
    name = "model.layers.1.mlp.up_proj.weight"
    tensors[name][3, 5] = -0.25
    from safetensors.torch import save_file

    save_file(tensors, hessian / "model.safetensors", metadata={"format": "pt"})
    (hessian / "config.json").write_text((llama["hessians"][0] / "config.json").read_text())
    config = gm(llama)
    config["models"][0]["hessian"] = str(hessian)
    messages = []
    for kernel in ("fused", "reference"):
        with pytest.raises(UserError) as info:
            gradmatch.merge(config, tmp_path / kernel, progress=False, kernel=kernel)
        messages.append(str(info.value))
        assert not (tmp_path / kernel).exists()
    assert messages[0] == messages[1] and "negative values" in messages[0] and name in messages[0]


def test_kernel_choice(llama, tmp_path, monkeypatch):
    engine = importlib.import_module("gradmatch.merge")
    _, record = merged_and_record(gm(llama), tmp_path / "small")
    assert record["kernel"] == "reference"  # a small merge: loading the kernel would cost more than it saves
    monkeypatch.setattr(engine, "KERNEL_MIN_BYTES", 0)
    _, record = merged_and_record(gm(llama), tmp_path / "big")
    assert record["kernel"] == "fused"
    _, record = merged_and_record(gm(llama), tmp_path / "f64", precision="float64")
    assert record["kernel"] == "reference"
    ties = {"method": "ties", "base": str(llama["parent"]),
            "models": [{"model": str(c), "weight": w} for c, w in zip(llama["children"], ALPHAS)]}
    with pytest.raises(UserError, match="ties has no fused kernel .*gradient_matching, task_arithmetic"):
        gradmatch.merge(ties, tmp_path / "ties", kernel="fused", progress=False)
    with pytest.raises(UserError, match="float32 on a CPU"):
        gradmatch.merge(gm(llama), tmp_path / "x", kernel="fused", precision="float64", progress=False)
    with pytest.raises(UserError, match="kernel must be one of"):
        gradmatch.merge(gm(llama), tmp_path / "y", kernel="numba", progress=False)
    assert not any((tmp_path / n).exists() for n in ("ties", "x", "y"))


def test_bits_views_share_memory():
    t = torch.randn(4, 6).to(torch.bfloat16)
    b = kernels.bits(t)
    assert b.dtype == np.int16 and b.shape == (24,)
    b[0] = 0
    assert t[0, 0].item() == 0.0
    with pytest.raises(ValueError, match="contiguous"):
        kernels.bits(t.t())


def test_kernels_compile_without_a_place_to_cache_them():
    """Where numba can write no cache (here: code with no file), the kernel is compiled in the process."""
    namespace: dict = {}
    exec("def twice(a):\n    return 2 * a\n", namespace)  # noqa: S102 - a function without a source file
    compiled = kernels._compiled(namespace["twice"])
    assert compiled(np.arange(3.0)).tolist() == [0.0, 2.0, 4.0]
