"""Fisher-weighted averaging (Matena & Raffel, NeurIPS 2022) of the children."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from pydantic import Field

from gradmatch.methods.base import MergeMethod, Parameters

if TYPE_CHECKING:  # pragma: no cover
    import torch


class FisherAverageParameters(Parameters):
    epsilon: float = Field(0.0, ge=0, allow_inf_nan=False,
                           description="added to every scaled Fisher N_t·F_t (Matena & Raffel's floor)")


def fisher_average(
    parent: torch.Tensor,
    children: Sequence[torch.Tensor],
    *,
    fishers: Sequence[torch.Tensor],
    weights: Sequence[float],
    scales: Sequence[float],
    epsilon: float = 0.0,
) -> torch.Tensor:
    """θ = Σ_t λ_t (N_t F_t + ε) θ_t / Σ_t λ_t (N_t F_t + ε).

    Where every Fisher term is zero (the fraction is undefined), the result falls back to the
    λ-weighted average Σ_t λ_t θ_t / Σ_t λ_t. The parent is not used.
    """
    precisions = [lam * (N_t * F_t + epsilon) for lam, N_t, F_t in zip(weights, scales, fishers)]
    denominator = sum(precisions)
    numerator = sum(P_t * theta_t for P_t, theta_t in zip(precisions, children))
    fallback = sum(lam * theta_t for lam, theta_t in zip(weights, children)) / sum(weights)
    defined = denominator != 0
    return (numerator / denominator.masked_fill(~defined, 1.0)).where(defined, fallback)


METHOD = MergeMethod(fisher_average, FisherAverageParameters, elementwise=True, hessian_scale="one")
