"""`gradmatch fisher` over a data split: the Fisher as a :class:`~gradmatch.statistics.Statistic` of the shared
runner, written as ``OUT/hessian/`` with its ``fisher.json``."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

from gradmatch.fisher.accumulator import FisherAccumulator, check_checkpointable
from gradmatch.fisher.estimators import Source, get_estimator
from gradmatch.fisher.files import hessian_dtype, model_fingerprint, write_hessian
from gradmatch.statistics import (
    Loaded,
    SplitSpec,
    Statistic,
    check_arguments,
    load,
    run,
)

#: What to do instead of a Fisher of a pretrained model without a likelihood of its own (no classification or LM head).
NO_HEAD = ("as the H_0 of a merge from this pretrained base, set `base_hessian: prior` in the merge config (an "
           "isotropic prior, docs/merge.md \"Merging from a pretrained base\"), or fine-tune it first")


class FisherStatistic(Statistic):
    """Exact per-example squared gradients of the log-likelihood, summed per process, all-reduced, averaged."""

    desc = "fisher"

    shardable = True

    def __init__(self, estimator: str, seed: int, record: dict, *, out_dtype: str | None = None,
                 gradient_checkpointing: bool = False):
        self.estimator, self.seed, self.record = estimator, int(seed), record
        self.out_dtype, self.gradient_checkpointing = out_dtype, bool(gradient_checkpointing)
        self.fingerprint: str | None = None

    def before(self, loaded: Loaded, rank: int) -> None:
        if rank == 0:  # of the weights as loaded, before they move to a device
            self.fingerprint = model_fingerprint(loaded.model)
            self.record["weights_fingerprint"] = loaded.weights_fingerprint()

    def accumulator(self, loaded: Loaded) -> FisherAccumulator:
        return FisherAccumulator(loaded.model, kind=loaded.kind, estimator=self.estimator, seed=self.seed,
                                 gradient_checkpointing=self.gradient_checkpointing)

    def before_sharded(self, loaded: Loaded, rank: int, world: int, group) -> None:
        from gradmatch.fisher.sharded import sharded_fingerprint

        self.fingerprint = sharded_fingerprint(loaded.model, rank=rank, world=world, group=group)
        if rank == 0:
            self.record["weights_fingerprint"] = loaded.weights_fingerprint()

    def sharded_accumulator(self, loaded: Loaded, group):
        from gradmatch.fisher.sharded import ShardedFisherAccumulator

        return ShardedFisherAccumulator(loaded.model, group=group, kind=loaded.kind, estimator=self.estimator,
                                        seed=self.seed, gradient_checkpointing=self.gradient_checkpointing)

    def write_sharded(self, acc, loaded: Loaded, folder: Path | None, *, world: int) -> None:
        from gradmatch.fisher.sharded import write_sharded

        dtype = hessian_dtype(loaded.model, self.out_dtype)
        write_sharded(acc, loaded.model, folder, self._metadata(acc, loaded, world, dtype, sharded=True), dtype)

    def all_reduce(self, acc: FisherAccumulator) -> None:
        acc.all_reduce()

    def _metadata(self, acc, loaded: Loaded, world: int, dtype, *, sharded: bool) -> dict:
        from gradmatch import __version__

        kind = loaded.kind
        return {"estimator": self.estimator, "num_examples": acc.count, **self.record, "seed": self.seed,
                "max_length": loaded.max_length, "model": loaded.name, "kind": kind.name,
                "model_fingerprint": self.fingerprint,
                "weights_fingerprint": self.record.get("weights_fingerprint"), "num_processes": world,
                "sharded": sharded, "dtype": str(dtype).removeprefix("torch."),
                "gradient_checkpointing": self.gradient_checkpointing,
                "quantity": f"mean over {kind.unit}s of squared per-{kind.unit} gradients of {kind.likelihood}",
                "gradmatch_version": __version__}

    def write(self, acc: FisherAccumulator, loaded: Loaded, folder: Path, *, world: int) -> None:
        dtype = hessian_dtype(loaded.model, self.out_dtype)
        fisher = acc.mean(in_place=True)
        write_hessian(loaded.model, fisher, folder / "hessian", self._metadata(acc, loaded, world, dtype, sharded=False),
                      dtype)


def run_fisher(model: str, data: str, split: str, *, out: str | os.PathLike, estimator: str = "sampled",
               batch_size: int = 16, max_examples: int | None = None, max_length: int = 128, seed: int = 0,
               data_dir: str | os.PathLike | None = None, overwrite: bool = False, config_name: str | None = None,
               device: str | None = None, progress: bool = True, kind: str | None = None,
               filters: Mapping[str, object] | None = None, out_dtype: str | None = None, shard: bool = False,
               gradient_checkpointing: bool = False) -> Path:
    """Estimate the Fisher of ``model`` on ``data``/``split`` and write ``OUT/hessian/`` (atomically).

    ``kind`` overrides the kind of model read from its config; ``filters`` keeps only some rows
    (e.g. ``{"label": 0}``; see :func:`gradmatch.data.load_split`).

    Under torchrun the examples are shared out across processes (gloo on CPU, nccl on GPU), the sums
    all-reduced, and rank 0 writes; the result equals one process's. With ``shard`` (under torchrun only) each
    process holds 1/W of the model and of the sums instead (FSDP2, :mod:`gradmatch.fisher.sharded`).
    ``out_dtype`` is the stored dtype (float32, bfloat16, float16 or float64; default bfloat16 for a bfloat16
    model, else float32); ``gradient_checkpointing`` recomputes each repeated layer's activations in backward.
    Returns ``out``.
    """
    get_estimator(estimator, source=Source.SPLIT)
    hessian_dtype(torch.float32, out_dtype)  # a dtype it cannot store is refused before any work
    if shard:
        from gradmatch.fisher.sharded import check_sharded_run

        check_sharded_run()
    out = check_arguments(model, data, out, overwrite=overwrite, batch_size=batch_size, max_length=max_length,
                          max_examples=max_examples, device=device, seed=seed)
    spec = SplitSpec(data, split, config_name=config_name, data_dir=data_dir, filters=filters,
                     max_examples=max_examples)
    # Everything the user can get wrong is checked before the weights load (and before any output).
    checkpointable = (lambda config, model_kind: check_checkpointable(config, model_kind, str(model))) \
        if gradient_checkpointing else None
    loaded = load(model, spec, max_length=max_length, kind=kind, purpose="the Fisher", alternatives=NO_HEAD,
                  weights=not shard, check_model=checkpointable)
    statistic = FisherStatistic(estimator, seed, spec.record(), out_dtype=out_dtype,
                                gradient_checkpointing=gradient_checkpointing)
    return run(statistic, loaded, out=out, overwrite=overwrite, batch_size=batch_size, device=device,
               progress=progress, shard=shard)
