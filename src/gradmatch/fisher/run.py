"""`gradmatch fisher` over a data split: the Fisher as a :class:`~gradmatch.statistics.Statistic` of the shared
runner, written as ``OUT/hessian/`` with its ``fisher.json``."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from gradmatch.fisher.accumulator import FisherAccumulator
from gradmatch.fisher.estimators import Source, get_estimator
from gradmatch.fisher.files import model_fingerprint, write_hessian
from gradmatch.statistics import Loaded, SplitSpec, Statistic, check_arguments, load, run

#: What to do instead of a Fisher of a pretrained model without a likelihood of its own (no classification or LM head).
NO_HEAD = ("as the H_0 of a merge from this pretrained base, set `base_hessian: prior` in the merge config (an "
           "isotropic prior, docs/merge.md \"Merging from a pretrained base\"), or fine-tune it first")


class FisherStatistic(Statistic):
    """Exact per-example squared gradients of the log-likelihood, summed per process, all-reduced, averaged."""

    desc = "fisher"

    def __init__(self, estimator: str, seed: int, record: dict):
        self.estimator, self.seed, self.record = estimator, int(seed), record
        self.fingerprint: str | None = None

    def before(self, loaded: Loaded, rank: int) -> None:
        if rank == 0:  # of the weights as loaded, before they move to a device
            self.fingerprint = model_fingerprint(loaded.model)
            self.record["weights_fingerprint"] = loaded.weights_fingerprint()

    def accumulator(self, loaded: Loaded) -> FisherAccumulator:
        return FisherAccumulator(loaded.model, kind=loaded.kind, estimator=self.estimator, seed=self.seed)

    def all_reduce(self, acc: FisherAccumulator) -> None:
        acc.all_reduce()

    def write(self, acc: FisherAccumulator, loaded: Loaded, folder: Path, *, world: int) -> None:
        from gradmatch import __version__

        fisher = acc.mean()
        kind = loaded.kind
        metadata = {"estimator": self.estimator, "num_examples": acc.count, **self.record, "seed": self.seed,
                    "max_length": loaded.max_length, "model": loaded.name, "kind": kind.name,
                    "model_fingerprint": self.fingerprint,
                    "weights_fingerprint": self.record.get("weights_fingerprint"), "num_processes": world,
                    "quantity": f"mean over {kind.unit}s of squared per-{kind.unit} gradients of {kind.likelihood}",
                    "gradmatch_version": __version__}
        write_hessian(loaded.model, fisher, folder / "hessian", metadata)


def run_fisher(model: str, data: str, split: str, *, out: str | os.PathLike, estimator: str = "sampled",
               batch_size: int = 16, max_examples: int | None = None, max_length: int = 128, seed: int = 0,
               data_dir: str | os.PathLike | None = None, overwrite: bool = False, config_name: str | None = None,
               device: str | None = None, progress: bool = True, kind: str | None = None,
               filters: Mapping[str, object] | None = None) -> Path:
    """Estimate the Fisher of ``model`` on ``data``/``split`` and write ``OUT/hessian/`` (atomically).

    ``kind`` overrides the kind of model read from its config; ``filters`` keeps only some rows
    (e.g. ``{"label": 0}``; see :func:`gradmatch.data.load_split`).

    Under torchrun the examples are shared out across processes (gloo on CPU, nccl on GPU), the sums
    all-reduced, and rank 0 writes; the result equals one process's. Returns ``out``.
    """
    get_estimator(estimator, source=Source.SPLIT)
    out = check_arguments(model, data, out, overwrite=overwrite, batch_size=batch_size, max_length=max_length,
                          max_examples=max_examples, device=device, seed=seed)
    spec = SplitSpec(data, split, config_name=config_name, data_dir=data_dir, filters=filters,
                     max_examples=max_examples)
    # Everything the user can get wrong is checked before the weights load (and before any output).
    loaded = load(model, spec, max_length=max_length, kind=kind, purpose="the Fisher", alternatives=NO_HEAD)
    statistic = FisherStatistic(estimator, seed, spec.record())
    return run(statistic, loaded, out=out, overwrite=overwrite, batch_size=batch_size, device=device,
               progress=progress)
