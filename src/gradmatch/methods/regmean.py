"""RegMean (Jin et al., ICLR 2023, "Dataless Knowledge Fusion by Merging Weights of Language Models")."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from pydantic import Field

from gradmatch.methods.base import MergeMethod, MethodError, Parameters

if TYPE_CHECKING:  # pragma: no cover
    import torch


class RegMeanParameters(Parameters):
    reduce_nondiagonal: float = Field(
        0.9, ge=0, le=1, description="r: G̃ = r·G + (1 − r)·diag(G) (RegMean's α); 1 is the exact regression, "
        "0 weighs each input feature alone")
    epsilon: float = Field(0.0, ge=0, allow_inf_nan=False,
                           description="adds epsilon × the mean diagonal of Σ w_t G̃_t to its diagonal (a singular sum "
                           "is an error without it)")


def regmean(
    parent: torch.Tensor,
    children: Sequence[torch.Tensor],
    *,
    weights: Sequence[float],
    grams: Sequence[torch.Tensor] | None,
    cache: dict,
    reduce_nondiagonal: float = 0.9,
    epsilon: float = 0.0,
) -> torch.Tensor:
    """A Linear weight W (rows of out × in): (Σ_t w_t W_t G̃_t)(Σ_t w_t G̃_t)⁻¹, the least-squares weight that
    best reproduces every child's outputs on its own inputs, with G̃_t = r·G_t + (1 − r)·diag(G_t) and
    G_t the Gram matrix of the layer's inputs on task t. Rows are independent, so a block of rows is
    merged at a time; the factorisation of Σ w_t G̃_t is kept in ``cache`` for the tensor's other blocks.
    Every other tensor (``grams`` None: biases, norms, embeddings, a Linear weight tied to the embeddings) is the
    weighted average Σ w_t θ_t / Σ w_t. The merge hands over Grams it has checked (finite, symmetric, with a
    non-negative diagonal: :meth:`gradmatch.gram.GramFile.read`).
    """
    import torch

    total = float(sum(weights))
    if grams is None:
        return sum(w_t * theta_t for w_t, theta_t in zip(weights, children)) / total
    if "cholesky" not in cache:
        reduced = []
        for w_t, G_t in zip(weights, grams):
            G_t = G_t.to(parent.dtype)
            diag = torch.diag_embed(torch.diagonal(G_t))
            reduced.append((reduce_nondiagonal * G_t + (1.0 - reduce_nondiagonal) * diag) * (w_t / total))
        A = sum(reduced)
        if epsilon > 0:
            A = A + epsilon * torch.diagonal(A).mean() * torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
        if A.numel() and not float(torch.diagonal(A).max()) > 0:  # a sum of PSD matrices with no diagonal is 0
            raise MethodError("Σ w_t G̃_t of this layer is zero (every child's Gram is zero or weighs 0: the layer's "
                              "inputs were zero on every task): RegMean has nothing to fit, and an epsilon cannot help "
                              "(it adds a multiple of that sum's diagonal, 0); compute the Grams on data that reaches "
                              "the layer")
        L, info = torch.linalg.cholesky_ex(A)
        if int(info) != 0:
            raise MethodError(f"the summed Gram matrix Σ w_t G̃_t ({A.shape[0]} × {A.shape[0]}) is singular (an input "
                              "feature that is always zero on every task?): set parameters.epsilon > 0, e.g. 1e-6")
        cache["cholesky"], cache["reduced"] = L, reduced
    L, reduced = cache["cholesky"], cache["reduced"]
    B = sum(W_t.to(parent.dtype) @ G_t for W_t, G_t in zip(children, reduced))  # (rows, in): Σ w_t W_t G̃_t
    return torch.cholesky_solve(B.t(), L).t()  # B A⁻¹ (A symmetric)


METHOD = MergeMethod(regmean, RegMeanParameters, elementwise=False, rowwise=True)
