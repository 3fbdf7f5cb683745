"""TIES merging (Yadav et al., NeurIPS 2023): trim, elect sign, disjoint mean of task vectors."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def trim(tau: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the k = ⌊density·n⌋ largest magnitudes of a task vector (ties at the threshold are kept), zero the rest."""
    n = tau.numel()
    k = int(density * n)
    if k >= n:
        return tau
    if k == 0:
        return torch.zeros_like(tau)
    threshold = tau.abs().reshape(-1).kthvalue(n - k + 1).values
    return torch.where(tau.abs() >= threshold, tau, torch.zeros_like(tau))


def elect_and_mean(weighted_taus: Sequence[torch.Tensor]) -> torch.Tensor:
    """Elect each entry's sign by its summed mass, then average the entries that agree with it (disjoint mean)."""
    gamma = torch.sign(sum(weighted_taus))
    agreeing = [(torch.sign(tau) == gamma) & (tau != 0) for tau in weighted_taus]
    count = sum(a.to(gamma.dtype) for a in agreeing)
    total = sum(torch.where(a, tau, torch.zeros_like(tau)) for a, tau in zip(agreeing, weighted_taus))
    return total / count.clamp(min=1)


def ties(parent: torch.Tensor, children: Sequence[torch.Tensor], *, alphas: Sequence[float], density: float = 0.2) -> torch.Tensor:
    """θ = θ_0 + disjoint_mean_t(α_t · trim_k(θ_t − θ_0)); with every α_t = λ this is the paper's TIES with scale λ.

    The top-k trim is per tensor (the paper trims the whole model's task vector at once).
    """
    return parent + elect_and_mean([alpha_t * trim(theta_t - parent, density) for alpha_t, theta_t in zip(alphas, children)])
