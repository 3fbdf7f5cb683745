"""Uncertainty-based gradient matching (Daheim et al., ICLR 2024, Eq. 11), with a guard for task removal."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from gradmatch.methods.base import MergeMethod, MethodError, Parameters, first_index

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch


class GradientMatchingParameters(Parameters):
    """H_0 = N_0·F_0 + delta_0; when a task is removed (some α_t < 0), ``removal`` chooses the form: the paper's,
    whose guard keeps every update within max_update_ratio × Σ_t |α_t τ_t| (a trust region), or uncertainty-weighted
    negation (Elastic Weight Removal's form), which needs no guard."""

    delta_0: float = Field(1e-12, ge=0, allow_inf_nan=False, description="prior precision δ added to N_0·F_0")
    removal: Literal["paper", "fisher_weighted"] = Field(
        "paper", description="how a negative α_r removes task r: paper — the paper's formula, with its guard; "
        "fisher_weighted — θ is pulled towards θ_0 − τ_r with precision |α_r| H_r: with one removed task alone "
        "θ_0 − a·H_r/(H_0 + a·H_r)·τ_r, each entry between θ_0 and θ_0 − τ_r (docs/merge.md)")
    max_update_ratio: float = Field(
        10.0, ge=1, le=1000, allow_inf_nan=False,
        description="the removal guard's bound R: with some α_t < 0, |θ − θ_0| ≤ R·Σ_t |α_t τ_t| in every entry "
                    "(at most 1000: R = 100 already wrecked a 135M LM in the removal experiment)")


def gradient_matching(
    parent: torch.Tensor,
    children: Sequence[torch.Tensor],
    *,
    parent_fisher: torch.Tensor,
    fishers: Sequence[torch.Tensor],
    alphas: Sequence[float],
    parent_scale: float,
    scales: Sequence[float],
    stats: dict,
    delta_0: float = 1e-12,
    max_update_ratio: float = 10.0,
    removal: str = "paper",
) -> torch.Tensor:
    """θ = θ_0 + Σ_t α_t · (H_0 + H_t) / D · τ_t with D = H_0 + Σ_s α_s H_s,

    H_0 = N_0·F_0 + δ, H_t = N_t·F_t, τ_t = θ_t − θ_0 (F the stored mean squared gradients, N their scales).

    With every α_t ≥ 0 this is the paper's formula as it stands: D ≥ H_0 + α_t H_t, so each factor
    (H_0 + H_t)/D is at most max(1, 1/α_t). A removal (some α_t < 0) can make D small or negative, where
    the paper's objective has no minimiser; then the guard (docs/merge.md, "Removal") takes, per entry,
    the minimiser of that objective within the trust region |θ − θ_0| ≤ ρ = R·Σ_t |α_t τ_t|
    (R = ``max_update_ratio``): the plain update clipped to ±ρ where D > 0, the end of the region the
    objective descends to (the sign of Σ_t α_t (H_0 + H_t) τ_t) where D ≤ 0. Every update is then finite
    and bounded by ρ; entries the guard touched are counted in ``stats["guarded_entries"]``.
    A zero denominator where every Hessian is zero and δ = 0 is an error.

    ``removal="fisher_weighted"`` (uncertainty-weighted negation) is the minimiser of
    ½‖θ − θ_0‖²_{H_0} + Σ_{α_t > 0} α_t ℓ̂_t(θ) + Σ_{α_r < 0} (|α_r|/2)‖θ − (θ_0 − τ_r)‖²_{H_r}, ℓ̂_t the quadratic
    model of task t behind the formula above (gradient −H_0 τ_t at θ_t, curvature H_t): D = H_0 + Σ_t |α_t| H_t and
    the numerator Σ_{α_t > 0} α_t (H_0 + H_t) τ_t + Σ_{α_r < 0} α_r H_r τ_r; D ≥ H_0 > 0, so no guard is needed.
    """
    import torch

    weighted = removal == "fisher_weighted"
    H_0 = parent_fisher * parent_scale + delta_0
    denominator = H_0.clone()
    for alpha_s, N_s, F_s in zip(alphas, scales, fishers):
        weight = abs(alpha_s) if weighted else alpha_s
        denominator.add_(F_s, alpha=weight * N_s)  # + α_s H_s (|α_s| H_s removing by fisher_weighted), in place
    numerator = parent.new_zeros(parent.shape)
    for alpha_t, N_t, F_t, theta_t in zip(alphas, scales, fishers, children):
        if weighted and alpha_t < 0:
            numerator.addcmul_(F_t * N_t, theta_t - parent, value=alpha_t)  # + α_r H_r τ_r
        else:
            numerator.addcmul_(H_0.add(F_t, alpha=N_t), theta_t - parent, value=alpha_t)  # + α_t (H_0 + H_t) τ_t
    if any(alpha_t < 0 for alpha_t in alphas) and not weighted:
        radius = parent.new_zeros(parent.shape)
        for alpha_t, theta_t in zip(alphas, children):
            radius.add_((theta_t - parent).abs_(), alpha=abs(alpha_t) * max_update_ratio)  # ρ = R Σ |α_t τ_t|
        positive = denominator > 0
        plain = numerator / denominator.where(positive, 1.0)
        guarded = ~positive | (plain.abs() > radius)
        stats["guarded_entries"] = stats.get("guarded_entries", 0) + int(guarded.sum())
        step = torch.where(positive, torch.minimum(torch.maximum(plain, -radius), radius), numerator.sign() * radius)
        return parent + step
    if denominator.numel() and not float(denominator.min()) > 0:  # also catches NaN
        bad = ~(denominator > 0)
        raise MethodError(
            f"the gradient-matching denominator H_0 + Σ α_t H_t is zero at {int(bad.sum())} "
            f"entr{'y' if int(bad.sum()) == 1 else 'ies'} (first at index {first_index(bad)}), where every "
            "Hessian is zero: set delta_0 > 0 (1e-12 works well)")
    return parent + numerator / denominator


def fused(out: np.ndarray, parent: np.ndarray, children: Sequence[np.ndarray], *, parent_fisher: np.ndarray,
          fishers: Sequence[np.ndarray], alphas: Sequence[float], parent_scale: float, scales: Sequence[float],
          stats: dict, delta_0: float = 1e-12, max_update_ratio: float = 10.0, removal: str = "paper",
          threads: int = 1) -> bool:
    """:func:`gradient_matching` into ``out`` in one pass over the inputs as stored (flat arrays of their
    bits: gradmatch.kernels). The kernel computes the paper's form; a removal by ``fisher_weighted`` is left to
    the reference formula (False: merge.json's kernel_fallbacks name the tensors)."""
    from gradmatch import kernels

    if removal == "fisher_weighted" and any(a < 0 for a in alphas):
        return False

    return kernels.gradient_matching(out, parent, children, parent_fisher, fishers, alphas=alphas,
                                     parent_scale=parent_scale, scales=scales, delta_0=delta_0,
                                     max_update_ratio=max_update_ratio, stats=stats, threads=threads)


METHOD = MergeMethod(gradient_matching, GradientMatchingParameters, elementwise=True, hessian_scale="training_size",
                    propagates_nan=True, fused=fused)
