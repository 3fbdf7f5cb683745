"""Weighted parameter averaging of the children (optionally with the parent)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from gradmatch.methods.base import MethodError


def average(
    parent: torch.Tensor,
    children: Sequence[torch.Tensor],
    *,
    weights: Sequence[float],
    include_base: bool = False,
    base_weight: float = 1.0,
) -> torch.Tensor:
    """θ = Σ_t w_t θ_t / Σ_t w_t, with the parent as one more term (weight ``base_weight``) if ``include_base``."""
    terms = list(zip(weights, children))
    if include_base:
        terms.append((base_weight, parent))
    total = sum(w for w, _ in terms)
    if total == 0:
        raise MethodError("the averaging weights sum to zero")
    return sum(w * theta for w, theta in terms) / total
