"""Hessian (diagonal Fisher) estimates: the table of estimators (:mod:`.estimators`), one rule per layer type for
exact per-example squares (:mod:`.layers`), the batched accumulator (:mod:`.accumulator`), `gradmatch fisher`
over a split (:mod:`.run`), the files of ``OUT/hessian/`` (:mod:`.files`), and the Hessians that come from
training (:mod:`.optimizer` for AdamW's second moment, :mod:`.ivon`) or from the model's own samples
(:mod:`.generated`).

The names below load on first use, so that ``gradmatch.fisher.estimators`` (read by configs) stays cheap.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "FisherAccumulator": "accumulator", "estimate_fisher": "accumulator", "estimate_fisher_reference": "accumulator",
    "run_fisher": "run", "model_fingerprint": "files", "write_hessian": "files",
    "ESTIMATORS": "estimators", "Targets": "estimators", "get_estimator": "estimators",
}
#: Names kept from before the split, now owned elsewhere.
_ELSEWHERE = {
    "distributed_run": "gradmatch.statistics", "check_statistics_arguments": ("gradmatch.statistics", "check_arguments"),
    "example_uniform": "gradmatch.kinds._classifier", "sample_labels": "gradmatch.kinds._classifier",
}

__all__ = sorted({*_EXPORTS, *_ELSEWHERE})


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    if name in _ELSEWHERE:
        module, attr = _ELSEWHERE[name] if isinstance(_ELSEWHERE[name], tuple) else (_ELSEWHERE[name], name)
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
