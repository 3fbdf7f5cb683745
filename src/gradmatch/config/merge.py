"""The merge YAML (`gradmatch merge CONFIG OUT`): method, base model, its Hessian, the children, parameters.

The method names, their parameter schemas and what each needs come from the method registry
(:mod:`gradmatch.methods`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gradmatch.config.mergekit import from_mergekit, is_mergekit
from gradmatch.errors import UserError
from gradmatch.methods import get_method, method_names

#: Floating dtypes a merge can write.
OUT_DTYPES = ("float32", "float16", "bfloat16", "float64")
#: ``base_hessian: prior``: H_0 = N_0·c·I, an isotropic prior whose level c is the mean of the children's Hessian
#: entries (for a pretrained base without a Fisher of its own; a folder named so is ``./prior``).
PRIOR = "prior"
#: Largest magnitude accepted for a weight α_t or a Hessian scale N (beyond it float32 overflows).
MAX_FACTOR = 1e30


def parameter_error(method: str, parameters: Mapping[str, Any]) -> str | None:
    """Why ``parameters`` are not valid for ``method`` (one line), or None when they are."""
    try:
        get_method(method).parameters.model_validate(dict(parameters or {}))
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(p) for p in first.get("loc", ())) or "(top level)"
        msg = f"not a parameter of {method}" if first.get("type") == "extra_forbidden" else first.get("msg")
        return f"parameters.{key}: {msg}"
    return None


class _MergeSchema(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _finite_factor(value: float | None, what: str) -> float | None:
    if value is not None and not abs(value) <= MAX_FACTOR:  # NaN fails too
        raise ValueError(f"{what} must be a finite number of magnitude at most {MAX_FACTOR:g}, not {value}")
    return value


class ModelParameters(_MergeSchema):
    """Per-model ``parameters`` (mergekit's spelling of the per-model keys)."""

    weight: float | None = None
    hessian_scale: float | None = Field(None, ge=0)


class MergeModelEntry(_MergeSchema):
    """One child: its folder, its Hessian, its weight α_t (λ_t, w_t) and its Hessian scale N_t."""

    model: str
    hessian: str | None = None
    gram: str | None = Field(None, description="the Gram matrices of its Linear layers' inputs (gradmatch gram), for RegMean")
    weight: float | None = Field(None, description="α_t (default 1.0)")
    hessian_scale: float | None = Field(None, ge=0, description="N_t (default: training_metadata.json num_train_examples)")
    parameters: ModelParameters = Field(default_factory=ModelParameters)

    @field_validator("model", "hessian", "gram")
    @classmethod
    def _path(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must not be empty (an empty path would name the current folder)")
        return value

    @model_validator(mode="after")
    def _fold_parameters(self):
        for key in ("weight", "hessian_scale"):
            given = getattr(self.parameters, key)
            if given is not None:
                if getattr(self, key) is not None and getattr(self, key) != given:
                    raise ValueError(f"{key} is given twice with different values ({getattr(self, key)} and parameters.{key} {given})")
                setattr(self, key, given)
        _finite_factor(self.weight, "weight")
        _finite_factor(self.hessian_scale, "hessian_scale")
        return self


class MergeConfig(_MergeSchema):
    """A merge: the method, the parent (base), its Hessian and scale N_0, the children, the method's parameters."""

    method: str
    base: str
    base_hessian: str | None = Field(None, description=f"the parent's Hessian folder, or {PRIOR!r} (H_0 = N_0·c·I)")
    base_hessian_scale: float | None = Field(None, ge=0, description="N_0 (default: the parent's training_metadata.json)")
    models: list[MergeModelEntry] = Field(min_length=1)
    parameters: dict[str, Any] = Field(default_factory=dict)
    out_dtype: Literal[OUT_DTYPES] | None = None  # type: ignore[valid-type]

    @field_validator("method")
    @classmethod
    def _known(cls, value: str) -> str:
        if value not in method_names():
            raise ValueError(f"unknown merge method {value!r} (choose from {', '.join(method_names())})")
        return value

    @field_validator("base", "base_hessian")
    @classmethod
    def _path(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must not be empty (an empty path would name the current folder)")
        return value

    @model_validator(mode="after")
    def _check_method(self):
        method = get_method(self.method)
        problem = parameter_error(self.method, self.parameters)
        if problem:
            raise ValueError(problem)
        self.parameters = method.parameters.model_validate(self.parameters or {}).model_dump()
        for key, value in self.parameters.items():  # a list gives one value per child, in order
            if isinstance(value, list) and len(value) != len(self.models):
                raise ValueError(f"parameters.{key} has {len(value)} values but there are {len(self.models)} models")
        _finite_factor(self.base_hessian_scale, "base_hessian_scale")
        if method.uses_child_hessians:
            missing = [i for i, m in enumerate(self.models) if not m.hessian]
            if missing:
                raise ValueError(f"{self.method} needs a hessian for every model; models[{missing[0]}] "
                                 f"({self.models[missing[0]].model}) has none")
        if method.uses_grams:
            missing = [i for i, m in enumerate(self.models) if not m.gram]
            if missing:
                raise ValueError(f"{self.method} needs a gram for every model; models[{missing[0]}] "
                                 f"({self.models[missing[0]].model}) has none (write one with gradmatch gram)")
        if method.uses_parent_hessian and not self.base_hessian:
            raise ValueError(f"{self.method} needs base_hessian (the parent's Hessian folder, or {PRIOR})")
        normalized = self.parameters.get("normalize") is True or self.parameters.get("disjoint_mean") == "weights"
        if method.signed_weights and normalized and sum(self.weights()) < 0:
            raise ValueError(f"{self.method} with normalize (the sum divided by the weights' sum, mergekit's normalize: "
                             f"true, its default for ties) and weights summing to {sum(self.weights()):g} < 0: the negative "
                             "weights divide themselves out and add their tasks back instead of removing them "
                             "(mergekit computes the same); to remove a task set normalize: false")
        if not method.signed_weights:
            weights = self.weights()
            if any(w < 0 for w in weights):
                raise ValueError(f"{self.method} needs non-negative weights, got {weights}")
            total = sum(weights) + (self.parameters.get("base_weight", 0.0) if self.parameters.get("include_base") else 0.0)
            if total <= 0:
                raise ValueError(f"{self.method} needs weights with a positive sum, got {weights}")
        return self

    def weights(self) -> list[float]:
        """α_t of every child (1.0 where not given)."""
        return [1.0 if m.weight is None else float(m.weight) for m in self.models]


def load_merge_config(config: MergeConfig | Mapping[str, Any] | str | os.PathLike) -> MergeConfig:
    """A MergeConfig from itself, a dict of the YAML form, or the path of a YAML/JSON file."""
    from gradmatch.config import read_config_file, validate

    if isinstance(config, MergeConfig):
        return config
    if isinstance(config, Mapping):
        data, source = dict(config), "merge config"
    elif isinstance(config, (str, os.PathLike)):
        data, source = read_config_file(config), str(config)
    else:
        raise UserError(f"a merge config must be a file path or a mapping, not {type(config).__name__}")
    if isinstance(data, Mapping) and is_mergekit(data):  # mergekit's form, with mergekit's semantics
        data = from_mergekit(data, source)
    return validate(MergeConfig, data, source)
