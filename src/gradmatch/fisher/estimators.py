"""The table of Hessian estimators: one entry each, saying where its statistics come from (a pass over a split
with targets from the data or from the model, sequences the model generates, or the optimizer's state after
training) and what makes it. Adding an estimator is one entry here; an unknown name cannot fall through."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from gradmatch.errors import UserError


class Targets(enum.Enum):
    """Where the y of log p_θ(y | x) comes from in a pass over examples (what a kind's log-likelihood reads)."""

    DATA = "data"    # the example's own label / next tokens
    MODEL = "model"  # drawn from the model's predictive distribution, seeded per example


class Source(enum.Enum):
    """Where an estimator's statistics come from."""

    SPLIT = "a pass over a data split (`gradmatch fisher`)"
    GENERATED = "sequences sampled from the causal LM itself (`gradmatch fisher --data generated`)"
    TRAINING = "the optimizer's state, saved by `gradmatch train` (`save_hessian`) or SaveHessianCallback"


@dataclass(frozen=True)
class Estimator:
    name: str
    source: Source
    #: For the estimators that square per-example gradients in a pass: where y comes from.
    targets: Targets | None
    #: ``num_examples`` of its fisher.json is N (the training-set size), not only a sample size.
    records_n: bool
    description: str

    @property
    def needs_pass(self) -> bool:
        return self.source is not Source.TRAINING


ESTIMATORS: dict[str, Estimator] = {e.name: e for e in (
    Estimator("sampled", Source.SPLIT, Targets.MODEL, False,
              "y drawn from the model's predictive distribution (each next token, for a causal LM): a true Fisher"),
    Estimator("empirical", Source.SPLIT, Targets.DATA, False, "the data's own labels (next tokens): the empirical Fisher"),
    Estimator("generated", Source.GENERATED, Targets.DATA, False,
              "whole sequences sampled from the causal LM, scored on their own tokens: its Fisher without data"),
    Estimator("adam", Source.TRAINING, None, True,
              "AdamW's exp_avg_sq at the end of training, converted to the mean of squared per-example gradients"),
    Estimator("ivon", Source.TRAINING, None, True, "IVON's Hessian state (the variational posterior's precision / ess)"),
)}

#: The estimators `gradmatch fisher --estimator` (a pass over a split) accepts.
SPLIT_ESTIMATORS = tuple(name for name, e in ESTIMATORS.items() if e.source is Source.SPLIT)


def get_estimator(name: str, *, source: Source | None = None) -> Estimator:
    """The table's entry for ``name``; one line naming the choices when it is unknown (or not of ``source``)."""
    entry = ESTIMATORS.get(name)
    if entry is None or (source is not None and entry.source is not source):
        names = [n for n, e in ESTIMATORS.items() if source is None or e.source is source]
        where = "" if entry is None else f" here ({name}'s statistics come from {entry.source.value})"
        raise UserError(f"{'unknown' if entry is None else 'cannot use'} Hessian estimator {name!r}{where} "
                        f"(choose {' or '.join(names)})")
    return entry
