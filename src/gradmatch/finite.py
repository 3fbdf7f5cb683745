"""Non-finite values: the one check that refuses a NaN or ±Inf statistic, trained model or gradient before it is
written, and the JSON form of non-finite numbers in the metrics and records gradmatch writes."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from typing import Any

from gradmatch.errors import UserError

#: How metrics and records hold a number that is not finite: JSON has no NaN or Infinity (Python's ``json`` writes
#: the bare words, which other readers reject), so they are written as these strings. ``float()`` reads each back.
NON_FINITE = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}


def _count(tensor) -> tuple[int, int]:
    """(NaN entries, ±Inf entries) of a floating-point tensor; (0, 0) for others. One aminmax pass when clean."""
    import torch

    if not tensor.is_floating_point() or not tensor.numel():
        return 0, 0
    lo, hi = torch.aminmax(tensor.detach())
    if math.isfinite(float(lo)) and math.isfinite(float(hi)):
        return 0, 0
    return int(torch.isnan(tensor).sum()), int(torch.isinf(tensor).sum())


def non_finite(tensors: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> list[tuple[str, int, int]]:
    """(name, NaN entries, ±Inf entries) of every tensor of ``tensors`` (a mapping or (name, tensor) pairs) that
    holds a value that is not finite, in their order."""
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    found = []
    for name, tensor in items:
        nan, inf = _count(tensor)
        if nan or inf:
            found.append((str(name), nan, inf))
    return found


def describe(found: list[tuple[str, int, int]]) -> str:
    """'NaN in 3 tensors (first: 'x.weight', 12 NaN)' from :func:`non_finite`'s list."""
    what = " and ".join(w for w, n in (("NaN", sum(f[1] for f in found)), ("±Inf", sum(f[2] for f in found))) if n)
    name, nan, inf = found[0]
    first = ", ".join(f"{n} {w}" for w, n in (("NaN", nan), ("±Inf", inf)) if n)
    return f"{what} in {len(found)} tensor{'s' if len(found) > 1 else ''} (first: {name!r}, {first})"


def check_finite(tensors: Mapping[str, Any] | Iterable[tuple[str, Any]], what: str, cause: str = "") -> None:
    """Refuse (one line, :class:`UserError`) when a tensor of ``tensors`` holds NaN or ±Inf: "``what`` holds NaN in 3
    tensors (first: …): ``cause``; nothing was written". Call it where a result is about to be written."""
    found = non_finite(tensors)
    if found:
        raise UserError(f"{what} holds {describe(found)}" + (f": {cause}" if cause else "") + "; nothing was written")


def check_model(model, name: str, purpose: str, found: list | None = None) -> None:
    """Refuse a loaded model whose parameters hold NaN or ±Inf before ``purpose`` (e.g. "the Fisher") is computed
    from it: the result would not be finite, or would describe a broken model. ``found``: :func:`non_finite` of its
    parameters when the caller has it (a sharded model's, gathered from every process)."""
    found = non_finite(model.named_parameters()) if found is None else found
    if found:
        raise UserError(f"model {name} holds {describe(found)}: {purpose} of a model with non-finite weights is "
                        "meaningless (was it trained or merged with a diverging setting?); nothing was written")


def model_cause(model, name: str = "the model", found: list | None = None) -> str:
    """Why a statistic of ``model`` is not finite, as far as its weights tell: they hold NaN/Inf themselves (named),
    or they are finite and the computation overflowed. ``found`` as for :func:`check_model`."""
    found = non_finite(model.named_parameters()) if found is None else found
    if found:
        return f"{name} itself holds {describe(found)}"
    return f"the weights of {name} are finite, so the computation overflowed (try float32, shorter inputs or fewer examples)"


def number(value: float) -> float | str:
    """``value`` as metrics and records hold it: itself when finite, else "NaN", "Infinity" or "-Infinity"."""
    value = float(value)
    if math.isfinite(value):
        return value
    return NON_FINITE["nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")]


def json_safe(value: Any) -> Any:
    """``value`` (dicts, lists, tuples, numbers, strings) with every non-finite float replaced by :func:`number`."""
    if isinstance(value, float):
        return value if math.isfinite(value) else number(value)
    if isinstance(value, Mapping):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def dumps(value: Any, **kwargs) -> str:
    """``json.dumps`` of :func:`json_safe` (``value``), refusing anything else that is not JSON (``allow_nan=False``)."""
    return json.dumps(json_safe(value), allow_nan=False, **kwargs)


def dump(value: Any, fh, **kwargs) -> None:
    """:func:`dumps` into an open file."""
    fh.write(dumps(value, **kwargs))
