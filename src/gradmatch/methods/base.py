"""What a merge method is: its formula, its parameter schema and what it needs, declared as data.

Every file of ``gradmatch/methods/`` (but this one and ``__init__``) holds one method: a pure function
of one parameter tensor's inputs, a pydantic schema of its parameters, and a :class:`MergeMethod`
named ``METHOD`` that ties them together. The method's name is the file's name. Method files import
torch inside their functions only, so that reading the registry (for config validation) stays light.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:  # pragma: no cover
    import torch


class MethodError(ValueError):
    """The formula has no value for these tensors (e.g. a zero denominator); the engine names the tensor."""


class Parameters(BaseModel):
    """Base of every method's parameter schema: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


class NoParameters(Parameters):
    """A method without parameters of its own."""


#: Inputs the engine can give a method, by the name of the function's argument.
ENGINE_INPUTS = {
    "parent": "θ_0, the parent's tensor",
    "children": "θ_t, one tensor per child",
    "alphas": "α_t, the per-child weights (may be negative: removal)",
    "weights": "w_t, the per-child weights (non-negative, positive sum)",
    "fishers": "F_t, the children's Hessians as stored",
    "scales": "N_t, the children's Hessian scales",
    "parent_fisher": "F_0, the parent's Hessian as stored",
    "parent_scale": "N_0, the parent's Hessian scale",
    "grams": "G_t, the children's Gram matrices of the layer's inputs (None for non-Linear tensors)",
    "generator": "a torch.Generator seeded by the method's `seed` parameter and the tensor's name",
    "stats": "a dict the method may add counts to (summed per tensor into merge.json)",
    "cache": "a dict kept across the blocks of one tensor (e.g. a factorisation the blocks share)",
}


@dataclass(frozen=True)
class MergeMethod:
    """A method and what the engine must feed it.

    ``function`` is the formula: it takes the engine inputs it names (see :data:`ENGINE_INPUTS`) and
    the parameters of ``parameters`` as keyword arguments and returns the merged tensor.
    ``elementwise``: each output entry depends only on the same entry of the inputs, so the engine may
    stream a large tensor in blocks of rows. ``rowwise``: each output row depends only on the same
    row of the inputs (plus whole-layer statistics such as Gram matrices), so blocks of rows work too.
    ``hessian_scale``: the default N_t / N_0 when a model entry gives none — ``training_size`` (the
    model's ``training_metadata.json``; an error when absent) or ``one`` (the Hessian as stored).
    ``propagates_nan``: every input enters every output entry arithmetically (0·NaN = NaN), so a NaN
    or Inf anywhere shows in the result: the engine checks only the result, and looks for the culprit then.
    ``fused``: the same formula as one pass over the inputs as stored (a kernel of ``gradmatch.kernels``),
    for the engine to use on a CPU in float32. It takes ``out`` (the output block), the function's
    arguments with the tensors as flat numpy arrays of their stored bits (``gradmatch.kernels.bits``:
    bf16 as int16, fp16 as uint16), and ``threads``; it fills ``out`` and returns True, or False
    when the block needs the reference ``function`` (a value it would refuse or flag: the reference then
    names the problem). Only for elementwise methods that propagate NaN.
    """

    function: Callable[..., torch.Tensor]
    parameters: type[Parameters] = NoParameters
    elementwise: bool = True
    rowwise: bool = False
    hessian_scale: Literal["training_size", "one"] = "one"
    propagates_nan: bool = False
    fused: Callable[..., bool] | None = None
    summary: str = ""
    name: str = ""  # set by the registry from the file name

    @property
    def inputs(self) -> frozenset[str]:
        """The engine inputs the function takes (its keyword arguments that are not parameters)."""
        return _engine_inputs(self.function)

    @property
    def parameter_names(self) -> frozenset[str]:
        return frozenset(self.parameters.model_fields)

    @property
    def uses_child_hessians(self) -> bool:
        return "fishers" in self.inputs

    @property
    def uses_parent_hessian(self) -> bool:
        return "parent_fisher" in self.inputs

    @property
    def uses_grams(self) -> bool:
        return "grams" in self.inputs

    @property
    def signed_weights(self) -> bool:
        """Weights are α_t (any sign; negative removes a task) rather than non-negative w_t."""
        return "weights" not in self.inputs

    @property
    def takes_alpha(self) -> bool:
        """The method scales task vectors by α (an experiment sweeps it); averages do not."""
        return "alphas" in self.inputs

    @property
    def random(self) -> bool:
        return "generator" in self.inputs

    def check(self) -> None:
        """The function's arguments are engine inputs or declared parameters, and nothing else."""
        signature = inspect.signature(self.function)
        unknown = [p for p in signature.parameters if p not in ENGINE_INPUTS and p not in self.parameter_names]
        if unknown:
            raise TypeError(f"merge method {self.name}: argument {unknown[0]!r} is neither an engine input "
                            f"({', '.join(ENGINE_INPUTS)}) nor a field of its parameter schema")
        if self.random and "seed" not in self.parameter_names:
            raise TypeError(f"merge method {self.name} takes a generator, so its parameters need a `seed`")
        if "alphas" in self.inputs and "weights" in self.inputs:
            raise TypeError(f"merge method {self.name}: take alphas or weights, not both")
        if self.fused is not None:
            if not (self.elementwise and self.propagates_nan):
                raise TypeError(f"merge method {self.name}: only an elementwise method that propagates NaN "
                                "can have a fused kernel (the engine checks only its results)")
            fused = set(inspect.signature(self.fused).parameters)
            if fused != set(signature.parameters) | {"out", "threads"}:
                raise TypeError(f"merge method {self.name}: its fused kernel must take the function's arguments "
                                "and `out` and `threads`, and nothing else")

    def call_parameters(self, parameters: dict) -> dict:
        """The parameters the function takes (a schema field such as ``seed`` may serve the engine only)."""
        names = set(inspect.signature(self.function).parameters)
        return {k: v for k, v in parameters.items() if k in names}


@functools.cache
def _engine_inputs(function: Callable) -> frozenset[str]:
    """Read once per function: the engine asks for every block (inspect.signature cost 5 % of a 0.5B merge)."""
    return frozenset(set(inspect.signature(function).parameters) & set(ENGINE_INPUTS))


def first_index(mask: torch.Tensor) -> tuple[int, ...]:
    """The index of the first True entry of ``mask`` (for error messages)."""
    flat = int(mask.reshape(-1).nonzero()[0])
    index = []
    for size in reversed(mask.shape):
        index.append(flat % size)
        flat //= size
    return tuple(reversed(index))
