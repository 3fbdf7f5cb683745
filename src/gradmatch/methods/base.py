"""What every merge method shares: the error a method raises when its formula is undefined for the inputs."""

from __future__ import annotations

import torch


class MethodError(ValueError):
    """The formula has no value for these tensors (e.g. a zero denominator); the engine names the tensor."""


def first_index(mask: torch.Tensor) -> tuple[int, ...]:
    """The index of the first True entry of ``mask`` (for error messages)."""
    flat = int(torch.nonzero(mask.reshape(-1))[0])
    return tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), mask.shape)) if mask.dim() else ()
