"""Weighted parameter averaging of the children (optionally with the parent)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from pydantic import Field

from gradmatch.methods.base import MergeMethod, MethodError, Parameters

if TYPE_CHECKING:  # pragma: no cover
    import torch


class AverageParameters(Parameters):
    include_base: bool = Field(False, description="also average the parent, with weight base_weight")
    base_weight: float = Field(1.0, ge=0, allow_inf_nan=False)
    normalize: bool = Field(True, description="divide by the sum of the weights (false: the weighted sum, as "
                                              "mergekit's linear with normalize: false)")


def average(
    parent: torch.Tensor,
    children: Sequence[torch.Tensor],
    *,
    weights: Sequence[float],
    include_base: bool = False,
    base_weight: float = 1.0,
    normalize: bool = True,
) -> torch.Tensor:
    """θ = Σ_t w_t θ_t / Σ_t w_t, with the parent as one more term (weight ``base_weight``) if ``include_base``.

    Without ``normalize`` the weighted sum Σ_t w_t θ_t is not divided.
    """
    terms = list(zip(weights, children))
    if include_base:
        terms.append((base_weight, parent))
    total = sum(w for w, _ in terms)
    if normalize and total == 0:
        raise MethodError("the averaging weights sum to zero")
    merged = sum(w * theta for w, theta in terms)
    return merged / total if normalize else merged


METHOD = MergeMethod(average, AverageParameters, elementwise=True)
