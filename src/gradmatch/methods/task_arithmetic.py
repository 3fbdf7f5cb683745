"""Task arithmetic (Ilharco et al., ICLR 2023): add weighted task vectors to the parent."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from pydantic import Field

from gradmatch.methods.base import MergeMethod, Parameters

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch

#: mergekit's rule: a weight sum this close to zero is not divided by.
NORMALIZE_FLOOR = 1e-8


class TaskArithmeticParameters(Parameters):
    scale: float = Field(1.0, allow_inf_nan=False, description="λ, multiplies the summed task vectors (mergekit's lambda)")
    normalize: bool = Field(False, description="divide the sum by Σ_t α_t (mergekit's normalize; a sum of magnitude "
                                               "below 1e-8 is not divided by)")


def normalizer(alphas: Sequence[float], normalize: bool) -> float:
    """Z = Σ_t α_t under ``normalize`` (1 where that is below 1e-8 in magnitude, as in mergekit), else 1."""
    total = sum(alphas)
    return total if normalize and abs(total) >= NORMALIZE_FLOOR else 1.0


def task_arithmetic(parent: torch.Tensor, children: Sequence[torch.Tensor], *, alphas: Sequence[float],
                    scale: float = 1.0, normalize: bool = False) -> torch.Tensor:
    """θ = θ_0 + λ · Σ_t α_t (θ_t − θ_0) / Z; a negative α_t removes task t.

    λ = ``scale`` (1 by default); Z = Σ_t α_t with ``normalize``, else 1.
    """
    Z = normalizer(alphas, normalize)
    merged = parent.clone()
    for alpha_t, theta_t in zip(alphas, children):
        merged.add_(theta_t - parent, alpha=scale * alpha_t / Z)  # + λ α_t τ_t / Z
    return merged


def fused(out: np.ndarray, parent: np.ndarray, children: Sequence[np.ndarray], *, alphas: Sequence[float],
          scale: float = 1.0, normalize: bool = False, threads: int = 1) -> bool:
    """:func:`task_arithmetic` into ``out`` in one pass over the inputs as stored (flat arrays of their
    bits: gradmatch.kernels)."""
    from gradmatch import kernels

    Z = normalizer(alphas, normalize)
    return kernels.task_arithmetic(out, parent, children, weights=[scale * a / Z for a in alphas], threads=threads)


METHOD = MergeMethod(task_arithmetic, TaskArithmeticParameters, elementwise=True, propagates_nan=True, fused=fused)
