"""The merge methods, one small pure function of one parameter's tensors each, and their registry."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch

from gradmatch.methods.average import average
from gradmatch.methods.base import MethodError
from gradmatch.methods.dare import dare
from gradmatch.methods.fisher_average import fisher_average
from gradmatch.methods.gradient_matching import gradient_matching
from gradmatch.methods.task_arithmetic import task_arithmetic
from gradmatch.methods.ties import ties

__all__ = ["MergeMethod", "METHODS", "MethodError", "get_method",
           "average", "dare", "fisher_average", "gradient_matching", "task_arithmetic", "ties"]


@dataclass(frozen=True)
class MergeMethod:
    """A method and what the engine must feed it.

    ``elementwise``: each output entry depends only on the same entry of the inputs, so the engine may
    stream a large tensor in blocks of rows. The inputs a method takes are read from its signature:
    ``parent``, ``children``, ``alphas`` or ``weights`` (the per-model weights), ``fishers`` and
    ``scales`` (children's Hessians), ``parent_fisher`` and ``parent_scale``, ``generator``.
    """

    name: str
    function: Callable[..., torch.Tensor]
    elementwise: bool

    @property
    def inputs(self) -> frozenset[str]:
        return frozenset(inspect.signature(self.function).parameters)

    @property
    def uses_child_hessians(self) -> bool:
        return "fishers" in self.inputs

    @property
    def uses_parent_hessian(self) -> bool:
        return "parent_fisher" in self.inputs


METHODS: dict[str, MergeMethod] = {
    m.name: m
    for m in (
        MergeMethod("gradient_matching", gradient_matching, elementwise=True),
        MergeMethod("task_arithmetic", task_arithmetic, elementwise=True),
        MergeMethod("average", average, elementwise=True),
        MergeMethod("fisher_average", fisher_average, elementwise=True),
        MergeMethod("ties", ties, elementwise=False),
        MergeMethod("dare", dare, elementwise=False),
    )
}


def get_method(name: str) -> MergeMethod:
    """The registered method called ``name``."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown merge method {name!r}; known: {', '.join(METHODS)}") from None
