"""Uncertainty-based gradient matching (Daheim et al., ICLR 2024, Eq. 11), one parameter tensor at a time."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from gradmatch.methods.base import MethodError, first_index


def gradient_matching(
    parent: torch.Tensor,
    children: Sequence[torch.Tensor],
    *,
    parent_fisher: torch.Tensor,
    fishers: Sequence[torch.Tensor],
    alphas: Sequence[float],
    parent_scale: float,
    scales: Sequence[float],
    delta_0: float = 1e-12,
    clamp_denominator: float | None = None,
) -> torch.Tensor:
    """θ = θ_0 + Σ_t α_t · (H_0 + H_t) / (H_0 + Σ_s α_s H_s) · (θ_t − θ_0),

    with H_0 = N_0·F_0 + δ and H_t = N_t·F_t (F the stored mean squared gradients, N their scales).
    The denominator must be positive everywhere; where it is not (zero Hessians with δ = 0, or
    negative α_t outweighing the rest) this raises :class:`MethodError`, unless ``clamp_denominator``
    is given, in which case the denominator is replaced by max(denominator, clamp_denominator).
    """
    H_0 = parent_scale * parent_fisher + delta_0
    denominator = H_0.clone()
    for alpha_s, N_s, F_s in zip(alphas, scales, fishers):
        denominator.add_(F_s, alpha=alpha_s * N_s)  # + α_s H_s, in place: one pass per task
    if clamp_denominator is not None:
        denominator = denominator.clamp(min=clamp_denominator)
    if denominator.numel() and not float(denominator.min()) > 0:  # also catches NaN
        bad = ~(denominator > 0)
        raise MethodError(
            f"the gradient-matching denominator H_0 + Σ α_t H_t is zero or negative at {int(bad.sum())} "
            f"entr{'y' if int(bad.sum()) == 1 else 'ies'} (first at index {first_index(bad)}); "
            "set delta_0 > 0 (1e-12 works well) or clamp the denominator (--clamp-denominator EPS)"
        )
    update = torch.zeros_like(parent)
    for alpha_t, N_t, F_t, theta_t in zip(alphas, scales, fishers, children):
        update.addcmul_(torch.add(H_0, F_t, alpha=N_t), theta_t - parent, value=alpha_t)  # + α_t (H_0 + H_t) τ_t
    return parent + update / denominator
