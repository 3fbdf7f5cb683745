"""The two removal forms of gradient matching on diagonal quadratic losses: each closed form equals the minimiser of
its own objective found by a numerical optimiser (scipy's L-BFGS on the objective written out, not the formula)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from gradmatch.methods.gradient_matching import gradient_matching


def task_model(theta, theta0, tau, H0, H):
    """ℓ̂_t: the quadratic model of task t that gradient matching assumes — the child θ_t = θ_0 + τ_t minimised
    ℓ_t + ½‖θ − θ_0‖²_{H_0}, so ∇ℓ_t(θ_t) = −H_0 τ_t, with curvature H_t (value and gradient)."""
    theta_t = theta0 + tau
    d = theta - theta_t
    return -(H0 * tau) @ d + 0.5 * (H * d) @ d, -H0 * tau + H * d


def objective(form, theta0, taus, H0, Hs, alphas):
    def f(theta):
        d0 = theta - theta0
        value, grad = 0.5 * (H0 * d0) @ d0, H0 * d0
        for tau, H, a in zip(taus, Hs, alphas):
            if a > 0 or form == "paper":
                v, g = task_model(theta, theta0, tau, H0, H)
                value, grad = value + a * v, grad + a * g
            else:  # (|α_r|/2)‖θ − (θ_0 − τ_r)‖²_{H_r}
                e = theta - (theta0 - tau)
                value, grad = value + 0.5 * abs(a) * (H * e) @ e, grad + abs(a) * H * e
        return value, grad
    return f


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("form", ["paper", "fisher_weighted"])
def test_each_removal_form_is_the_minimiser_of_its_objective(seed, form):
    rng = np.random.default_rng(seed)
    n, T = 40, 3
    theta0 = rng.normal(size=n)
    taus = [0.3 * rng.normal(size=n) for _ in range(T)]
    N0, Ns, delta = 50.0, [20.0, 35.0, 10.0], 1e-3
    F0 = rng.uniform(0.1, 1.0, n)
    Fs = [rng.uniform(0.0, 1.0, n) for _ in range(T)]
    alphas = [1.0, 0.6, -0.4 - 0.5 * rng.uniform()]  # a removal beside two additions
    H0 = N0 * F0 + delta
    Hs = [N * F for N, F in zip(Ns, Fs)]
    if form == "paper":  # its objective has a minimiser only where D = H_0 + Σ α_t H_t > 0: keep those entries
        D = H0 + sum(a * H for a, H in zip(alphas, Hs))
        keep = D > 0.2 * H0
        theta0, taus, F0, Fs = theta0[keep], [t[keep] for t in taus], F0[keep], [F[keep] for F in Fs]
        H0, Hs = H0[keep], [H[keep] for H in Hs]
    found = minimize(objective(form, theta0, taus, H0, Hs, alphas), theta0.copy(), jac=True, method="L-BFGS-B",
                     options={"gtol": 1e-12, "ftol": 1e-15, "maxiter": 10000})
    assert found.success, found.message
    t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    closed = gradient_matching(t(theta0), [t(theta0 + tau) for tau in taus], parent_fisher=t(F0),
                               fishers=[t(F) for F in Fs], alphas=alphas, parent_scale=N0, scales=Ns, stats={},
                               delta_0=delta, max_update_ratio=1000.0, removal=form)
    assert np.allclose(closed.numpy(), found.x, rtol=1e-6, atol=1e-8)


def test_one_removed_task_alone_moves_each_entry_between_the_parent_and_the_negated_child():
    g = torch.Generator().manual_seed(0)
    theta0, tau = torch.randn(1000, generator=g, dtype=torch.float64), torch.randn(1000, generator=g, dtype=torch.float64)
    F0, F1 = torch.rand(1000, generator=g, dtype=torch.float64), torch.rand(1000, generator=g, dtype=torch.float64)
    for a in (0.1, 0.5, 1.0, 2.0, 10.0):
        out = gradient_matching(theta0, [theta0 + tau], parent_fisher=F0, fishers=[F1], alphas=[-a], parent_scale=3.0,
                                scales=[2.0], stats={}, delta_0=1e-12, removal="fisher_weighted")
        H0, H1 = 3.0 * F0 + 1e-12, 2.0 * F1
        assert torch.allclose(out, theta0 - a * H1 / (H0 + a * H1) * tau, rtol=1e-12, atol=1e-14)
        fraction = (theta0 - out) / tau  # of the whole task vector removed: in [0, 1]
        assert bool(((fraction >= -1e-12) & (fraction <= 1 + 1e-12)).all())


def test_the_merge_engine_takes_the_form_and_says_which_path_computed_it(tmp_path):
    from test_merge import build_family, gm_config, load_folder
    from test_methods import ref_gradient_matching  # noqa: F401 - the paper form's reference, for contrast

    from gradmatch.merge import merge

    fam = build_family(tmp_path / "fam")
    config = gm_config(fam, parameters={"delta_0": 1e-12, "removal": "fisher_weighted"})
    config["models"][2]["weight"] = -0.8
    merge(config, tmp_path / "out", progress=False, kernel="fused")
    record = json.loads((tmp_path / "out" / "merge.json").read_text())
    assert record["parameters"]["removal"] == "fisher_weighted"
    assert record["kernel"] == "reference" and record["kernel_requested"] == "fused" and record["kernel_fallbacks"]
    out, p = load_folder(tmp_path / "out"), load_folder(fam["parent"])
    cs, fs = [load_folder(c) for c in fam["children"]], [load_folder(h) for h in fam["hessians"]]
    f0 = load_folder(fam["parent_hessian"] / "hessian")
    alphas, Ns = (1.0, 0.7, -0.8), (500.0, 120.0, 60.0)
    name = "layer.weight"
    H0 = 2000.0 * f0[name].double() + 1e-12
    Hs = [N * f[name].double() for N, f in zip(Ns, fs)]
    taus = [c[name].double() - p[name].double() for c in cs]
    D = H0 + sum(abs(a) * H for a, H in zip(alphas, Hs))
    num = sum(a * ((H0 + H) if a > 0 else H) * tau for a, H, tau in zip(alphas, Hs, taus))
    assert torch.allclose(out[name].double(), p[name].double() + num / D, rtol=1e-5, atol=1e-6)
