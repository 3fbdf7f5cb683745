"""The Fisher estimators a pass over a split accepts (`gradmatch fisher --estimator`, evaluate configs and
experiments), taken from the table in :mod:`gradmatch.fisher.estimators`."""

from __future__ import annotations

from typing import Literal

from gradmatch.fisher.estimators import SPLIT_ESTIMATORS

ESTIMATORS = SPLIT_ESTIMATORS
Estimator = Literal[SPLIT_ESTIMATORS]  # type: ignore[valid-type]  # Literal of the table's names
