"""TIES merging (Yadav et al., NeurIPS 2023): trim, elect sign, disjoint mean of task vectors."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from pydantic import Field

from gradmatch.methods.base import MergeMethod, Parameters

if TYPE_CHECKING:  # pragma: no cover
    import torch


class TiesParameters(Parameters):
    density: float = Field(0.2, gt=0, le=1, description="fraction k of each task vector's entries kept (top-k magnitudes)")


def trim(tau: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the k = ⌊density·n⌋ largest magnitudes of a task vector (ties at the threshold are kept), zero the rest."""
    n = tau.numel()
    k = int(density * n)
    if k >= n:
        return tau
    if k == 0:
        return tau.new_zeros(tau.shape)
    threshold = tau.abs().reshape(-1).kthvalue(n - k + 1).values
    return tau.where(tau.abs() >= threshold, 0.0)


def elect_and_mean(weighted_taus: Sequence[torch.Tensor]) -> torch.Tensor:
    """Elect each entry's sign by its summed mass, then average the entries that agree with it (disjoint mean)."""
    gamma = sum(weighted_taus).sign()
    agreeing = [(tau.sign() == gamma) & (tau != 0) for tau in weighted_taus]
    count = sum(a.to(gamma.dtype) for a in agreeing)
    total = sum(tau.where(a, 0.0) for a, tau in zip(agreeing, weighted_taus))
    return total / count.clamp(min=1)


def ties(parent: torch.Tensor, children: Sequence[torch.Tensor], *, alphas: Sequence[float], density: float = 0.2) -> torch.Tensor:
    """θ = θ_0 + disjoint_mean_t(α_t · trim_k(θ_t − θ_0)); with every α_t = λ this is the paper's TIES with scale λ.

    The top-k trim is per tensor (the paper trims the whole model's task vector at once).
    """
    return parent + elect_and_mean([alpha_t * trim(theta_t - parent, density) for alpha_t, theta_t in zip(alphas, children)])


METHOD = MergeMethod(ties, TiesParameters, elementwise=False)
