"""DARE (Yu et al., ICML 2024): drop task-vector entries at random, rescale, then task arithmetic or TIES."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from gradmatch.methods.ties import elect_and_mean, trim


def drop_and_rescale(tau: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """Zero each entry with probability p and scale the survivors by 1/(1 − p) (the mask is drawn on the CPU)."""
    keep = torch.rand(tau.shape, generator=generator, dtype=torch.float32) >= p
    return torch.where(keep.to(tau.device), tau / (1.0 - p), torch.zeros_like(tau))


def dare(
    parent: torch.Tensor,
    children: Sequence[torch.Tensor],
    *,
    alphas: Sequence[float],
    generator: torch.Generator,
    p: float = 0.5,
    seed: int = 0,
    combine: Literal["task_arithmetic", "ties"] = "task_arithmetic",
    density: float = 1.0,
) -> torch.Tensor:
    """τ̃_t = drop_p(θ_t − θ_0)/(1 − p), masks drawn from ``generator`` child by child in order; then
    θ_0 + Σ_t α_t τ̃_t (task_arithmetic) or θ_0 + disjoint_mean_t(α_t · trim(τ̃_t, density)) (ties).

    ``seed`` is the user's seed; the engine has already used it to seed ``generator`` for this tensor.
    """
    taus = [drop_and_rescale(theta_t - parent, p, generator) for theta_t in children]
    if combine == "ties":
        return parent + elect_and_mean([alpha_t * trim(tau, density) for alpha_t, tau in zip(alphas, taus)])
    return parent + sum(alpha_t * tau for alpha_t, tau in zip(alphas, taus))
