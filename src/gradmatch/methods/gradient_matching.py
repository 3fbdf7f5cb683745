"""Uncertainty-based gradient matching (Daheim et al., ICLR 2024, Eq. 11), with a guard for task removal."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from pydantic import Field

from gradmatch.methods.base import MergeMethod, MethodError, Parameters, first_index

if TYPE_CHECKING:  # pragma: no cover
    import torch


class GradientMatchingParameters(Parameters):
    """H_0 = N_0·F_0 + delta_0; when a task is removed (some α_t < 0), the guard keeps every update within
    max_update_ratio × Σ_t |α_t τ_t|."""

    delta_0: float = Field(1e-12, ge=0, allow_inf_nan=False, description="prior precision δ added to N_0·F_0")
    max_update_ratio: float = Field(
        10.0, ge=1, allow_inf_nan=False,
        description="the removal guard's bound R: with some α_t < 0, |θ − θ_0| ≤ R·Σ_t |α_t τ_t| in every entry")


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
) -> torch.Tensor:
    """θ = θ_0 + Σ_t α_t · (H_0 + H_t) / D · τ_t with D = H_0 + Σ_s α_s H_s,

    H_0 = N_0·F_0 + δ, H_t = N_t·F_t, τ_t = θ_t − θ_0 (F the stored mean squared gradients, N their scales).

    With every α_t ≥ 0 this is the paper's formula as it stands: D ≥ H_0 + α_t H_t, so each factor
    (H_0 + H_t)/D is at most max(1, 1/α_t). A removal (some α_t < 0) can make D small or negative; then
    the guard (docs/merge.md, "Removal") floors D at max_{t: α_t ≠ 0} (H_0 + H_t) / R with
    R = ``max_update_ratio``: the smallest floor under which every factor stays ≤ R, so every entry's update
    is bounded by R·Σ_t |α_t τ_t| and finite. Guarded entries are counted in ``stats["guarded_entries"]``.
    A zero denominator where every Hessian is zero and δ = 0 is an error.
    """
    import torch

    R = float(max_update_ratio)
    H_0 = parent_fisher * parent_scale + delta_0
    denominator = H_0.clone()
    for alpha_s, N_s, F_s in zip(alphas, scales, fishers):
        denominator.add_(F_s, alpha=alpha_s * N_s)  # + α_s H_s, in place: one pass per task
    if any(alpha_t < 0 for alpha_t in alphas):
        floor = None
        for alpha_t, N_t, F_t in zip(alphas, scales, fishers):
            if alpha_t != 0:
                term = H_0.add(F_t, alpha=N_t)
                floor = term if floor is None else torch.maximum(floor, term, out=floor)
        if floor is not None:
            floor.div_(R)
            guarded = denominator < floor
            stats["guarded_entries"] = stats.get("guarded_entries", 0) + int(guarded.sum())
            denominator = torch.maximum(denominator, floor, out=denominator)
    if denominator.numel() and not float(denominator.min()) > 0:  # also catches NaN
        bad = ~(denominator > 0)
        raise MethodError(
            f"the gradient-matching denominator H_0 + Σ α_t H_t is zero at {int(bad.sum())} "
            f"entr{'y' if int(bad.sum()) == 1 else 'ies'} (first at index {first_index(bad)}), where every "
            "Hessian is zero: set delta_0 > 0 (1e-12 works well)")
    update = parent.new_zeros(parent.shape)
    for alpha_t, N_t, F_t, theta_t in zip(alphas, scales, fishers, children):
        update.addcmul_(H_0.add(F_t, alpha=N_t), theta_t - parent, value=alpha_t)  # + α_t (H_0 + H_t) τ_t
    return parent + update / denominator


METHOD = MergeMethod(gradient_matching, GradientMatchingParameters, elementwise=True, hessian_scale="training_size",
                    propagates_nan=True)
