"""TIES merging (Yadav et al., NeurIPS 2023): trim, elect sign, disjoint mean of task vectors."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import Field

from gradmatch.methods.base import MergeMethod, MethodError, Parameters

if TYPE_CHECKING:  # pragma: no cover
    import torch

Density = Annotated[float, Field(gt=0, le=1)]
DisjointMean = Literal["count", "weights", "sum"]
EdgeRules = Literal["gradmatch", "mergekit"]


class TiesParameters(Parameters):
    density: Density | list[Density] = Field(
        0.2, description="fraction k of each task vector's entries kept (top-k magnitudes); a list: one per child")
    scale: float = Field(1.0, allow_inf_nan=False, description="λ, multiplies the merged task vector (mergekit's lambda)")
    disjoint_mean: DisjointMean = Field(
        "count", description="divide the agreeing entries' sum by their count (the paper), by the sum of their "
                             "weights α_t (mergekit's normalize: true) or not at all (sum: mergekit's normalize: false)")
    rescale: bool = Field(False, description="rescale each trimmed task vector to the L1 norm it had (mergekit's rescale)")
    edge_rules: EdgeRules = Field(
        "gradmatch", description="gradmatch: keep every entry tied with the k-th magnitude, a zero sum elects no sign; "
                                 "mergekit: exactly k = max(1, ⌊density·n⌋) entries (the first in index order among "
                                 "ties), a zero sum elects +")


def per_child(value: float | Sequence[float], n: int, what: str) -> list[float]:
    """One value per child: a number for all, or a list with one per child."""
    if isinstance(value, (int, float)):
        return [float(value)] * n
    if len(value) != n:
        raise MethodError(f"{what} has {len(value)} values for {n} children")
    return [float(v) for v in value]


def trim(tau: torch.Tensor, density: float, exact: bool = False) -> torch.Tensor:
    """Keep the k = ⌊density·n⌋ largest magnitudes of a task vector (ties at the threshold are kept), zero the rest.

    ``exact`` (mergekit's rule): exactly k = max(1, ⌊density·n⌋) entries, the first k of
    ``argsort(|τ| in float32, descending)``. Which of the entries tied with the k-th magnitude are kept
    is then the order of torch's (unstable) sort, as in mergekit: the only way to equal its result on
    bf16 task vectors, whose magnitudes tie by the thousand. It costs 8 bytes of indices per entry.
    """
    import torch

    n = tau.numel()
    k = max(1, int(density * n)) if exact else int(density * n)
    if k >= n:
        return tau
    if k == 0:
        return tau.new_zeros(tau.shape)
    if exact:
        keep = torch.zeros(n, dtype=torch.bool, device=tau.device)
        keep[torch.argsort(tau.abs().reshape(-1).float(), descending=True)[:k]] = True
        return tau.where(keep.reshape(tau.shape), 0.0)
    magnitude = tau.abs()
    threshold = magnitude.reshape(-1).kthvalue(n - k + 1).values
    return tau.where(magnitude >= threshold, 0.0)


def rescale_l1(kept: torch.Tensor, tau: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """``kept`` scaled to the L1 norm of ``tau`` (mergekit's rescale; unchanged when either norm is below eps)."""
    before, after = float(tau.abs().sum()), float(kept.abs().sum())
    return kept if before < eps or after < eps else kept * (before / after)


def elect_and_mean(weighted_taus: Sequence[torch.Tensor], *, alphas: Sequence[float] | None = None,
                   disjoint_mean: DisjointMean = "count", edge_rules: EdgeRules = "gradmatch") -> torch.Tensor:
    """Elect each entry's sign by its summed mass Σ_t α_t τ̂_t, then combine the entries that agree with it:
    their mean (``count``), their sum over the sum of their weights α_t (``weights``), or their sum (``sum``)."""
    mass = sum(weighted_taus)
    gamma = mass.sign() if edge_rules == "gradmatch" else (mass >= 0).to(mass.dtype) * 2 - 1
    agreeing = [(tau.sign() == gamma) & (tau != 0) for tau in weighted_taus]
    total = sum(tau.where(a, 0.0) for a, tau in zip(agreeing, weighted_taus))
    if disjoint_mean == "sum":
        return total
    if disjoint_mean == "weights":
        divisor = sum(a.to(mass.dtype) * alpha_t for a, alpha_t in zip(agreeing, alphas))
        return total / divisor.masked_fill(divisor == 0, 1.0)
    count = sum(a.to(gamma.dtype) for a in agreeing)
    return total / count.clamp(min=1)


def ties(
    parent: torch.Tensor,
    children: Sequence[torch.Tensor],
    *,
    alphas: Sequence[float],
    density: float | Sequence[float] = 0.2,
    scale: float = 1.0,
    disjoint_mean: DisjointMean = "count",
    rescale: bool = False,
    edge_rules: EdgeRules = "gradmatch",
) -> torch.Tensor:
    """θ = θ_0 + λ · disjoint_mean_t(α_t · trim_k(θ_t − θ_0)); with every α_t = λ this is the paper's TIES with scale λ.

    λ = ``scale`` (1 by default). The top-k trim is per tensor (the paper trims the whole model's task
    vector at once).
    """
    densities = per_child(density, len(children), "density")
    taus = []
    for theta_t, d_t in zip(children, densities):
        tau = theta_t - parent
        kept = trim(tau, d_t, exact=edge_rules == "mergekit")
        taus.append(rescale_l1(kept, tau) if rescale and kept is not tau else kept)
    merged = elect_and_mean([alpha_t * tau for alpha_t, tau in zip(alphas, taus)], alphas=alphas,
                            disjoint_mean=disjoint_mean, edge_rules=edge_rules)
    return parent + (merged if scale == 1 else scale * merged)


METHOD = MergeMethod(ties, TiesParameters, elementwise=False)
