"""The Fisher estimators by name: what `gradmatch fisher --estimator`, evaluate configs and experiments accept."""

from __future__ import annotations

from typing import Literal

#: ``sampled``: labels (next tokens) drawn from the model's own predictive distribution (the original's
#: default); ``empirical``: the data's own labels (next tokens).
ESTIMATORS = ("sampled", "empirical")
Estimator = Literal["sampled", "empirical"]
