"""DARE (Yu et al., ICML 2024): drop task-vector entries at random, rescale, then task arithmetic or TIES."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import Field

from gradmatch.methods.base import MergeMethod, Parameters
from gradmatch.methods.task_arithmetic import normalizer
from gradmatch.methods.ties import Density, DisjointMean, EdgeRules, elect_and_mean, per_child, rescale_l1, trim

if TYPE_CHECKING:  # pragma: no cover
    import torch

Probability = Annotated[float, Field(ge=0, lt=1)]


class DareParameters(Parameters):
    p: Probability | list[Probability] = Field(0.5, description="probability of dropping a task-vector entry; "
                                                                "a list: one per child (mergekit: 1 − density)")
    seed: int = Field(0, description="seed of the drop masks (with the tensor's name)")
    combine: Literal["task_arithmetic", "ties"] = "task_arithmetic"
    density: Density | list[Density] = Field(1.0, description="TIES trim after the drop (combine: ties only)")
    rescale: Literal["inverse", "l1", "none"] = Field(
        "inverse", description="survivors scaled by 1/(1 − p) (the paper), to the task vector's L1 norm "
                               "(mergekit's rescale: true), or not at all (mergekit's rescale: false)")
    scale: float = Field(1.0, allow_inf_nan=False, description="λ, multiplies the merged task vector (mergekit's lambda)")
    normalize: bool = Field(False, description="combine: task_arithmetic: divide the sum by Σ_t α_t (mergekit's normalize)")
    disjoint_mean: DisjointMean = Field("count", description="combine: ties: as ties' disjoint_mean")
    edge_rules: EdgeRules = Field("gradmatch", description="combine: ties: as ties' edge_rules")


def drop_and_rescale(tau: torch.Tensor, p: float, generator: torch.Generator, rescale: str = "inverse") -> torch.Tensor:
    """Zero each entry with probability p (the mask is drawn on the CPU), then rescale the survivors:
    by 1/(1 − p) (``inverse``), to the L1 norm of ``tau`` (``l1``), or not (``none``)."""
    import torch

    keep = (torch.rand(tau.shape, generator=generator, dtype=torch.float32) >= p).to(tau.device)
    if rescale == "inverse":
        return (tau / (1.0 - p)).where(keep, 0.0)
    kept = tau.where(keep, 0.0)
    return rescale_l1(kept, tau) if rescale == "l1" and p > 0 else kept


def dare(
    parent: torch.Tensor,
    children: Sequence[torch.Tensor],
    *,
    alphas: Sequence[float],
    generator: torch.Generator,
    p: float | Sequence[float] = 0.5,
    combine: Literal["task_arithmetic", "ties"] = "task_arithmetic",
    density: float | Sequence[float] = 1.0,
    rescale: Literal["inverse", "l1", "none"] = "inverse",
    scale: float = 1.0,
    normalize: bool = False,
    disjoint_mean: DisjointMean = "count",
    edge_rules: EdgeRules = "gradmatch",
) -> torch.Tensor:
    """τ̃_t = drop_p(θ_t − θ_0)/(1 − p), masks drawn from ``generator`` child by child in order; then
    θ_0 + λ · Σ_t α_t τ̃_t / Z (task_arithmetic) or θ_0 + λ · disjoint_mean_t(α_t · trim(τ̃_t, density)) (ties).

    λ = ``scale``; Z = Σ_t α_t with ``normalize``, else 1. The engine seeds ``generator`` from the
    parameter ``seed`` and the tensor's name.
    """
    drops = per_child(p, len(children), "p")
    taus = [drop_and_rescale(theta_t - parent, p_t, generator, rescale) for theta_t, p_t in zip(children, drops)]
    if combine == "ties":
        densities = per_child(density, len(children), "density")
        exact = edge_rules == "mergekit"
        merged = elect_and_mean([alpha_t * trim(tau, d_t, exact) for alpha_t, tau, d_t in zip(alphas, taus, densities)],
                                alphas=alphas, disjoint_mean=disjoint_mean, edge_rules=edge_rules)
    else:
        merged = sum(alpha_t * tau for alpha_t, tau in zip(alphas, taus)) / normalizer(alphas, normalize)
    return parent + (merged if scale == 1 else scale * merged)


METHOD = MergeMethod(dare, DareParameters, elementwise=False)
