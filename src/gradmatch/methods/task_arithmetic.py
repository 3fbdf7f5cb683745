"""Task arithmetic (Ilharco et al., ICLR 2023): add weighted task vectors to the parent."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from gradmatch.methods.base import MergeMethod

if TYPE_CHECKING:  # pragma: no cover
    import torch


def task_arithmetic(parent: torch.Tensor, children: Sequence[torch.Tensor], *, alphas: Sequence[float]) -> torch.Tensor:
    """θ = θ_0 + Σ_t α_t (θ_t − θ_0); a negative α_t removes task t."""
    merged = parent.clone()
    for alpha_t, theta_t in zip(alphas, children):
        merged.add_(theta_t - parent, alpha=alpha_t)  # + α_t τ_t
    return merged


METHOD = MergeMethod(task_arithmetic, elementwise=True, propagates_nan=True)
