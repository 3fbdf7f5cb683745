"""DARE (Yu et al., ICML 2024): drop task-vector entries at random, rescale, then task arithmetic or TIES."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from gradmatch.methods.base import MergeMethod, Parameters
from gradmatch.methods.ties import elect_and_mean, trim

if TYPE_CHECKING:  # pragma: no cover
    import torch


class DareParameters(Parameters):
    p: float = Field(0.5, ge=0, lt=1, description="probability of dropping a task-vector entry")
    seed: int = Field(0, description="seed of the drop masks (with the tensor's name)")
    combine: Literal["task_arithmetic", "ties"] = "task_arithmetic"
    density: float = Field(1.0, gt=0, le=1, description="TIES trim after the drop (combine: ties only)")


def drop_and_rescale(tau: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """Zero each entry with probability p and scale the survivors by 1/(1 − p) (the mask is drawn on the CPU)."""
    import torch

    keep = torch.rand(tau.shape, generator=generator, dtype=torch.float32) >= p
    return (tau / (1.0 - p)).where(keep.to(tau.device), 0.0)


def dare(
    parent: torch.Tensor,
    children: Sequence[torch.Tensor],
    *,
    alphas: Sequence[float],
    generator: torch.Generator,
    p: float = 0.5,
    combine: Literal["task_arithmetic", "ties"] = "task_arithmetic",
    density: float = 1.0,
) -> torch.Tensor:
    """τ̃_t = drop_p(θ_t − θ_0)/(1 − p), masks drawn from ``generator`` child by child in order; then
    θ_0 + Σ_t α_t τ̃_t (task_arithmetic) or θ_0 + disjoint_mean_t(α_t · trim(τ̃_t, density)) (ties).

    The engine seeds ``generator`` from the parameter ``seed`` and the tensor's name.
    """
    taus = [drop_and_rescale(theta_t - parent, p, generator) for theta_t in children]
    if combine == "ties":
        return parent + elect_and_mean([alpha_t * trim(tau, density) for alpha_t, tau in zip(alphas, taus)])
    return parent + sum(alpha_t * tau for alpha_t, tau in zip(alphas, taus))


METHOD = MergeMethod(dare, DareParameters, elementwise=False)
