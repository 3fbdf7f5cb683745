"""The merge methods as pure functions: float64 references, the paper's special cases, invariants."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradmatch.methods import MethodError, registry
from gradmatch.methods.average import average
from gradmatch.methods.dare import dare
from gradmatch.methods.fisher_average import fisher_average
from gradmatch.methods.gradient_matching import gradient_matching as _gradient_matching
from gradmatch.methods.task_arithmetic import task_arithmetic
from gradmatch.methods.ties import ties, trim


def gradient_matching(*args, stats=None, **kwargs):
    return _gradient_matching(*args, stats={} if stats is None else stats, **kwargs)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


def family(seed: int, T: int = 3, shape=(7, 5), zero_fraction: float = 0.0):
    """θ_0, children θ_t = θ_0 + τ_t, Fishers F_0, F_t ≥ 0 (float32), some entries exactly zero."""
    g = torch.Generator().manual_seed(seed)
    parent = torch.randn(shape, generator=g)
    children = [parent + 0.1 * torch.randn(shape, generator=g) for _ in range(T)]

    def fisher():
        f = torch.rand(shape, generator=g) ** 2
        return torch.where(torch.rand(shape, generator=g) < zero_fraction, torch.zeros_like(f), f)

    return parent, children, fisher(), [fisher() for _ in range(T)]


seeds = st.integers(0, 2**31 - 1)
alphas_st = st.lists(st.floats(0.05, 2.0), min_size=3, max_size=3)


def test_registry_holds_one_method_per_file():
    from pathlib import Path

    import gradmatch.methods

    files = sorted(p.stem for p in Path(gradmatch.methods.__file__).parent.glob("*.py") if p.stem not in ("__init__", "base"))
    METHODS = registry()
    assert list(METHODS) == files
    assert METHODS["gradient_matching"].uses_parent_hessian and METHODS["gradient_matching"].uses_child_hessians
    assert METHODS["fisher_average"].uses_child_hessians and not METHODS["fisher_average"].uses_parent_hessian
    assert not METHODS["task_arithmetic"].uses_child_hessians
    assert {n for n, m in METHODS.items() if m.elementwise} >= {"gradient_matching", "task_arithmetic", "average",
                                                                 "fisher_average"}
    assert not METHODS["ties"].elementwise and not METHODS["dare"].elementwise
    assert METHODS["dare"].random and "seed" not in METHODS["dare"].call_parameters({"seed": 3, "p": 0.1})


# --------------------------------------------------------------------------- float64 references


def ref_gradient_matching(p, cs, f0, fs, alphas, N0, Ns, delta, R=10.0):
    """The paper's Eq. 11 in float64, with the removal guard of docs/merge.md written entry by entry: when some
    α_t < 0, the minimiser of the per-entry objective (D/2)·u² − N·u within |u| ≤ ρ = R Σ_t |α_t τ_t|."""
    p, cs, f0, fs = p.double(), [c.double() for c in cs], f0.double(), [f.double() for f in fs]
    H0 = N0 * f0 + delta
    D = H0 + sum(a * N * f for a, N, f in zip(alphas, Ns, fs))
    if min(alphas) < 0:
        num = sum(a * (H0 + N * f) * (c - p) for a, N, f, c in zip(alphas, Ns, fs, cs))
        rho = R * sum(abs(a) * (c - p).abs() for a, c in zip(alphas, cs))
        out = p.clone().reshape(-1)
        for i, (d, n, r) in enumerate(zip(D.reshape(-1).tolist(), num.reshape(-1).tolist(), rho.reshape(-1).tolist())):
            if d > 0:  # a convex parabola: its minimiser n/d, clipped into the region
                u = min(max(n / d, -r), r)
            else:  # concave or linear: the end of the region where (d/2)u² − n·u is lowest
                u = min((-r, r), key=lambda v: 0.5 * d * v * v - n * v) if n != 0 else 0.0
            out[i] += u
        return out.reshape(p.shape)
    return p + sum(a * (H0 + N * f) / D * (c - p) for a, N, f, c in zip(alphas, Ns, fs, cs))


def original_script_formula(p, cs, f0, fs, alpha, N0, Ns, delta):
    """The original uncertainty_based_gradient_matching.py, written literally (float32, one α)."""
    preconditioner = 1.0 / (sum([float(alpha) * float(N) * f for f, N in zip(fs, Ns)]) + float(N0) * f0 + delta)
    summed = sum([(preconditioner * (float(N) * f + delta + float(N0) * f0)) * (c - p) for c, f, N in zip(cs, fs, Ns)])
    return p + float(alpha) * summed


@settings(max_examples=40, deadline=None)
@given(seed=seeds, alphas=alphas_st, N0=st.floats(0.0, 1e5), Ns=st.lists(st.floats(0.0, 1e5), min_size=3, max_size=3),
       delta=st.sampled_from([1e-12, 1e-6, 1.0]))
def test_gradient_matching_equals_float64_reference(seed, alphas, N0, Ns, delta):
    p, cs, f0, fs = family(seed)
    got = gradient_matching(p, cs, parent_fisher=f0, fishers=fs, alphas=alphas, parent_scale=N0, scales=Ns, delta_0=delta)
    assert got.dtype == torch.float32
    assert rel_err(got, ref_gradient_matching(p, cs, f0, fs, alphas, N0, Ns, delta)) <= 1e-6


@settings(max_examples=40, deadline=None)
@given(seed=seeds, alpha=st.floats(0.05, 2.0), N0=st.floats(1.0, 1e5), Ns=st.lists(st.floats(1.0, 1e5), min_size=3, max_size=3),
       delta=st.sampled_from([0.0, 1e-12, 1e-3]))
def test_gradient_matching_with_one_alpha_equals_the_original_script(seed, alpha, N0, Ns, delta):
    p, cs, f0, fs = family(seed)
    got = gradient_matching(p, cs, parent_fisher=f0, fishers=fs, alphas=[alpha] * 3, parent_scale=N0, scales=Ns, delta_0=delta)
    assert rel_err(got, original_script_formula(p, cs, f0, fs, alpha, N0, Ns, delta)) <= 1e-6


def test_gradient_matching_by_hand():
    # one entry: θ0 = 1, θ1 = 3, θ2 = -1; N0 F0 + δ = 2 + 0, N1 F1 = 1, N2 F2 = 3, α = (1, 0.5)
    p, c1, c2 = torch.tensor([1.0]), torch.tensor([3.0]), torch.tensor([-1.0])
    got = gradient_matching(p, [c1, c2], parent_fisher=torch.tensor([0.5]), fishers=[torch.tensor([0.1]), torch.tensor([1.5])],
                            alphas=[1.0, 0.5], parent_scale=4.0, scales=[10.0, 2.0], delta_0=0.0)
    # D = 2 + 1·1 + 0.5·3 = 4.5; θ = 1 + [1·(2+1)·2 + 0.5·(2+3)·(-2)] / 4.5 = 1 + (6 - 5)/4.5
    assert got.item() == pytest.approx(1 + 1 / 4.5, rel=1e-7)


def test_task_arithmetic_reference():
    p, cs, _, _ = family(1)
    alphas = [0.3, -0.7, 1.2]
    expected = p.double() + sum(a * (c.double() - p.double()) for a, c in zip(alphas, cs))
    assert rel_err(task_arithmetic(p, cs, alphas=alphas), expected) <= 1e-6


def test_average_reference():
    p, cs, _, _ = family(2)
    w = [1.0, 2.0, 0.5]
    expected = sum(wi * c.double() for wi, c in zip(w, cs)) / sum(w)
    assert rel_err(average(p, cs, weights=w), expected) <= 1e-6
    with_base = (sum(wi * c.double() for wi, c in zip(w, cs)) + 3.0 * p.double()) / (sum(w) + 3.0)
    assert rel_err(average(p, cs, weights=w, include_base=True, base_weight=3.0), with_base) <= 1e-6
    with pytest.raises(MethodError):
        average(p, cs, weights=[0.0, 0.0, 0.0])


def test_fisher_average_reference_and_fallback():
    p, cs, _, fs = family(3, zero_fraction=0.3)
    fs[0][0, 0] = fs[1][0, 0] = fs[2][0, 0] = 0.0  # every Fisher zero at (0, 0): fall back to the λ-average
    lam, Ns, eps = [1.0, 2.0, 0.5], [10.0, 20.0, 5.0], 0.0
    P = [l * (N * f.double() + eps) for l, N, f in zip(lam, Ns, fs)]
    expected = sum(Pt * c.double() for Pt, c in zip(P, cs)) / sum(P)
    plain = sum(l * c.double() for l, c in zip(lam, cs)) / sum(lam)
    expected = torch.where(sum(P) == 0, plain, expected)
    got = fisher_average(p, cs, fishers=fs, weights=lam, scales=Ns, epsilon=eps)
    assert torch.isfinite(got).all()
    assert rel_err(got, expected) <= 1e-6
    assert got[0, 0].item() == pytest.approx(plain[0, 0].item(), rel=1e-6)
    eps = 1e-2
    P = [l * (N * f.double() + eps) for l, N, f in zip(lam, Ns, fs)]
    expected = sum(Pt * c.double() for Pt, c in zip(P, cs)) / sum(P)
    assert rel_err(fisher_average(p, cs, fishers=fs, weights=lam, scales=Ns, epsilon=eps), expected) <= 1e-6


def ref_ties(p, cs, alphas, density):
    """TIES the simple way, entry by entry, in float64."""
    p = p.double()
    taus = []
    for c in cs:
        tau = (c.double() - p).reshape(-1)
        k = int(density * tau.numel())
        order = sorted(range(tau.numel()), key=lambda i: -abs(tau[i].item()))
        kept = torch.zeros_like(tau)
        for i in order[:k]:
            kept[i] = tau[i]
        taus.append(kept)
    merged = torch.zeros_like(taus[0])
    for i in range(merged.numel()):
        values = [a * tau[i].item() for a, tau in zip(alphas, taus)]
        total = sum(values)
        sign = (total > 0) - (total < 0)
        agree = [v for v in values if v != 0 and ((v > 0) - (v < 0)) == sign]
        merged[i] = sum(agree) / len(agree) if agree else 0.0
    return p + merged.reshape(p.shape)


@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
def test_ties_reference(density):
    p, cs, _, _ = family(4)
    alphas = [1.0, 0.5, 1.5]
    assert rel_err(ties(p, cs, alphas=alphas, density=density), ref_ties(p, cs, alphas, density)) <= 1e-6


def test_trim_keeps_the_top_k_magnitudes():
    tau = torch.tensor([0.1, -0.5, 0.3, -0.05, 0.2])
    assert trim(tau, 0.4).tolist() == pytest.approx([0.0, -0.5, 0.3, 0.0, 0.0])
    assert trim(tau, 0.1).tolist() == [0.0] * 5  # k = 0
    assert trim(tau, 1.0) is tau


def test_ties_sign_election_by_hand():
    p = torch.zeros(3)
    cs = [torch.tensor([1.0, -1.0, 2.0]), torch.tensor([3.0, 2.0, -1.0]), torch.tensor([-1.0, 0.5, -0.5])]
    # entry 0: mass +3 → agree {1, 3} → 2; entry 1: mass +1.5 → {2, 0.5} → 1.25; entry 2: mass +0.5 → {2} → 2
    assert ties(p, cs, alphas=[1.0, 1.0, 1.0], density=1.0).tolist() == pytest.approx([2.0, 1.25, 2.0])


def ref_dare(p, cs, alphas, pdrop, seed, combine, density=1.0):
    g = torch.Generator().manual_seed(seed)
    taus = []
    for c in cs:
        keep = torch.rand(p.shape, generator=g, dtype=torch.float32) >= pdrop
        taus.append(torch.where(keep, (c.double() - p.double()) / (1 - pdrop), torch.zeros((), dtype=torch.float64)))
    if combine == "ties":
        return ref_ties(torch.zeros_like(p), [t.float() for t in taus], alphas, density).double() + p.double()
    return p.double() + sum(a * t for a, t in zip(alphas, taus))


@pytest.mark.parametrize("combine", ["task_arithmetic", "ties"])
def test_dare_reference(combine):
    p, cs, _, _ = family(5)
    alphas, pdrop = [1.0, 0.5, 0.8], 0.3
    got = dare(p, cs, alphas=alphas, p=pdrop, combine=combine, generator=torch.Generator().manual_seed(7))
    assert rel_err(got, ref_dare(p, cs, alphas, pdrop, 7, combine)) <= 1e-6
    # roughly a fraction p of each task vector is dropped, and the seed decides which
    other = dare(p, cs, alphas=alphas, p=pdrop, combine=combine, generator=torch.Generator().manual_seed(8))
    assert not torch.equal(got, other)


def test_dare_without_dropping_is_task_arithmetic():
    p, cs, _, _ = family(6)
    alphas = [0.4, 0.3, 0.2]
    got = dare(p, cs, alphas=alphas, p=0.0, generator=torch.Generator().manual_seed(0))
    assert rel_err(got, task_arithmetic(p, cs, alphas=alphas)) <= 1e-6


# --------------------------------------------------------------------------- the paper's special cases


@settings(max_examples=30, deadline=None)
@given(seed=seeds, alphas=alphas_st, N0=st.floats(1.0, 1e4))
def test_zero_child_hessians_give_task_arithmetic(seed, alphas, N0):
    p, cs, f0, fs = family(seed)
    zeros = [torch.zeros_like(f) for f in fs]
    got = gradient_matching(p, cs, parent_fisher=f0, fishers=zeros, alphas=alphas, parent_scale=N0, scales=[5.0] * 3, delta_0=1e-3)
    assert rel_err(got, task_arithmetic(p, cs, alphas=alphas).double()) <= 1e-6


@settings(max_examples=30, deadline=None)
@given(seed=seeds, alphas=alphas_st, Ns=st.lists(st.floats(1.0, 1e4), min_size=3, max_size=3))
def test_zero_parent_hessian_gives_fisher_averaging(seed, alphas, Ns):
    p, cs, _, fs = family(seed)
    fs = [f + 1e-3 for f in fs]  # Fisher averaging is defined everywhere
    got = gradient_matching(p, cs, parent_fisher=torch.zeros_like(p), fishers=fs, alphas=alphas, parent_scale=0.0,
                            scales=Ns, delta_0=0.0)
    expected = fisher_average(p, [c.double() for c in cs], fishers=[f.double() for f in fs], weights=alphas, scales=Ns)
    assert rel_err(got, expected) <= 1e-5


@settings(max_examples=30, deadline=None)
@given(seed=seeds, N0=st.floats(0.0, 1e4), N1=st.floats(0.0, 1e4))
def test_one_child_with_alpha_one_gives_the_child(seed, N0, N1):
    p, cs, f0, fs = family(seed, T=1)
    got = gradient_matching(p, cs, parent_fisher=f0, fishers=fs, alphas=[1.0], parent_scale=N0, scales=[N1], delta_0=1e-8)
    assert rel_err(got, cs[0]) <= 1e-6


# --------------------------------------------------------------------------- invariants


@settings(max_examples=30, deadline=None)
@given(seed=seeds, alphas=alphas_st, c=st.floats(1e-3, 1e3), perm=st.permutations([0, 1, 2]))
def test_gradient_matching_invariances(seed, alphas, c, perm):
    p, cs, f0, fs = family(seed)
    Ns, N0, delta = [3.0, 50.0, 7.0], 20.0, 0.5
    base = gradient_matching(p, cs, parent_fisher=f0, fishers=fs, alphas=alphas, parent_scale=N0, scales=Ns, delta_0=delta)
    # scaling every Hessian and δ together by c changes nothing
    scaled = gradient_matching(p, cs, parent_fisher=f0, fishers=fs, alphas=alphas, parent_scale=c * N0,
                               scales=[c * N for N in Ns], delta_0=c * delta)
    assert rel_err(scaled, base) <= 1e-6
    # the order of the children does not matter
    permuted = gradient_matching(p, [cs[i] for i in perm], parent_fisher=f0, fishers=[fs[i] for i in perm],
                                 alphas=[alphas[i] for i in perm], parent_scale=N0, scales=[Ns[i] for i in perm], delta_0=delta)
    assert rel_err(permuted, base) <= 1e-6


@settings(max_examples=20, deadline=None)
@given(seed=seeds, alphas=alphas_st, perm=st.permutations([0, 1, 2]))
def test_baselines_do_not_depend_on_the_order_of_children(seed, alphas, perm):
    p, cs, _, fs = family(seed)
    Ns = [1.0, 2.0, 3.0]

    def order(xs):
        return [xs[i] for i in perm]

    assert rel_err(task_arithmetic(p, order(cs), alphas=order(alphas)), task_arithmetic(p, cs, alphas=alphas)) <= 1e-6
    assert rel_err(average(p, order(cs), weights=order(alphas)), average(p, cs, weights=alphas)) <= 1e-6
    assert rel_err(fisher_average(p, order(cs), fishers=order(fs), weights=order(alphas), scales=order(Ns)),
                   fisher_average(p, cs, fishers=fs, weights=alphas, scales=Ns)) <= 1e-6
    assert rel_err(ties(p, order(cs), alphas=order(alphas), density=0.5), ties(p, cs, alphas=alphas, density=0.5)) <= 1e-6


def test_negative_alpha_removes_a_task():
    p, cs, f0, fs = family(9, T=1)
    # adding then removing the same task vector gives the parent back
    both = task_arithmetic(p, [cs[0], cs[0]], alphas=[1.0, -1.0])
    assert rel_err(both, p) <= 1e-6
    f0 = f0 + 0.5  # a parent more certain than the removed task: the denominator stays positive
    got = gradient_matching(p, cs, parent_fisher=f0, fishers=fs, alphas=[-0.5], parent_scale=10.0, scales=[1.0], delta_0=1e-3)
    assert rel_err(got, ref_gradient_matching(p, cs, f0, fs, [-0.5], 10.0, [1.0], 1e-3)) <= 1e-6


# --------------------------------------------------------------------------- the denominator guard


def test_zero_denominator_fails_unless_delta_is_positive():
    p, cs, f0, fs = family(10, zero_fraction=0.0)
    f0 = f0.clone()
    f0[2, 3] = 0.0
    for f in fs:
        f[2, 3] = 0.0
    with pytest.raises(MethodError, match=r"zero at 1 entry \(first at index \(2, 3\)\).*delta_0"):
        gradient_matching(p, cs, parent_fisher=f0, fishers=fs, alphas=[1.0] * 3, parent_scale=1.0, scales=[1.0] * 3, delta_0=0.0)
    # with δ > 0 the same Hessians are fine and give task arithmetic on that entry
    got = gradient_matching(p, cs, parent_fisher=f0, fishers=fs, alphas=[1.0] * 3, parent_scale=1.0, scales=[1.0] * 3, delta_0=1e-12)
    assert got[2, 3].item() == pytest.approx(task_arithmetic(p, cs, alphas=[1.0] * 3)[2, 3].item(), rel=1e-6)


# --------------------------------------------------------------------------- the removal guard (docs/merge.md)


@settings(max_examples=60, deadline=None)
@given(seed=seeds, alphas=st.lists(st.floats(-3.0, 2.0), min_size=3, max_size=3),
       N0=st.floats(0.0, 1e3), Ns=st.lists(st.floats(0.0, 1e3), min_size=3, max_size=3),
       R=st.sampled_from([1.0, 2.0, 10.0, 50.0]))
def test_the_guard_bounds_every_update_by_R_times_the_task_arithmetic_magnitudes(seed, alphas, N0, Ns, R):
    """The documented bound: with some α_t < 0, |θ − θ_0| ≤ R·Σ_t |α_t τ_t| in every entry, and all finite."""
    p, cs, f0, fs = family(seed, zero_fraction=0.2)
    alphas = [a if abs(a) > 1e-3 else 0.0 for a in alphas]  # no weights that underflow float32
    if min(alphas) >= 0:
        alphas = [alphas[0] - 3.0, *alphas[1:]]
    stats = {}
    got = gradient_matching(p, cs, parent_fisher=f0, fishers=fs, alphas=alphas, parent_scale=N0, scales=Ns,
                            delta_0=1e-6, max_update_ratio=R, stats=stats)
    assert torch.isfinite(got).all()
    bound = R * sum(abs(a) * (c.double() - p.double()).abs() for a, c in zip(alphas, cs))
    assert bool(((got.double() - p.double()).abs() <= bound * (1 + 1e-5) + 1e-6).all())
    # The count: entries whose plain update leaves the region or whose curvature is not positive (float64 here;
    # entries within rounding of the boundary may fall either way, their value is the same).
    H0 = N0 * f0.double() + 1e-6
    D = H0 + sum(a * N * f.double() for a, N, f in zip(alphas, Ns, fs))
    num = sum(a * (H0 + N * f.double()) * (c.double() - p.double()) for a, N, f, c in zip(alphas, Ns, fs, cs))
    plain = (num / D).abs()
    clearly = int(((D <= 0) | (plain > bound * (1 + 1e-4))).sum())
    maybe = int(((D <= 1e-9 * H0.abs().max()) | (plain > bound * (1 - 1e-4))).sum())
    assert clearly <= stats.get("guarded_entries", 0) <= maybe
    assert rel_err(got, ref_gradient_matching(p, cs, f0, fs, alphas, N0, Ns, 1e-6, R)) <= 1e-5


def test_the_guard_leaves_merges_without_removal_alone():
    """Every α_t ≥ 0 (even tiny): the paper's formula exactly, no entry guarded (D ≥ H_0 + α_t H_t)."""
    p, cs, f0, fs = family(21)
    stats = {}
    got = gradient_matching(p, cs, parent_fisher=f0, fishers=fs, alphas=[0.01, 0.0, 2.0], parent_scale=3.0,
                            scales=[50.0, 1.0, 0.5], delta_0=1e-9, max_update_ratio=1.0, stats=stats)
    assert "guarded_entries" not in stats
    H0 = 3.0 * f0.double() + 1e-9
    D = H0 + 0.01 * 50.0 * fs[0].double() + 2.0 * 0.5 * fs[2].double()
    expected = p.double() + (0.01 * (H0 + 50.0 * fs[0].double()) * (cs[0].double() - p.double())
                             + 2.0 * (H0 + 0.5 * fs[2].double()) * (cs[2].double() - p.double())) / D
    assert rel_err(got, expected) <= 1e-6


def test_removal_with_a_nearly_vanishing_denominator():
    """α = −1, H_1 = 0.999·H_0: plainly each factor would be 1.999/0.001 ≈ 2,000; the guard caps it at R."""
    p, cs, f0, _ = family(22, T=1)
    f0 = f0 + 0.1
    stats = {}
    got = gradient_matching(p, cs, parent_fisher=f0, fishers=[0.999 * f0], alphas=[-1.0], parent_scale=1.0,
                            scales=[1.0], delta_0=0.0, max_update_ratio=10.0, stats=stats)
    tau = cs[0].double() - p.double()
    ratio = (got.double() - p.double()) / tau
    assert torch.allclose(ratio, torch.full_like(ratio, -10.0), rtol=1e-4)  # θ_0 − R·τ: removal, bounded
    assert stats["guarded_entries"] == p.numel()


def test_the_guard_bound_is_between_1_and_1000():
    """R beyond 1000 is refused (1e308 overflowed float32 in the guard; R = 100 already wrecked a 135M LM)."""
    import pydantic

    from gradmatch.methods.gradient_matching import GradientMatchingParameters

    assert GradientMatchingParameters(max_update_ratio=1000).max_update_ratio == 1000
    for bad in (0.5, 1001, 1e30, 1e308, float("inf"), float("nan")):
        with pytest.raises(pydantic.ValidationError):
            GradientMatchingParameters(max_update_ratio=bad)
