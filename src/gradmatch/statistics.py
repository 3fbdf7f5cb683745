"""One runner for "a statistic over a split" — the Fisher, RegMean's Grams, the gradient mismatch: argument
checks, model and split loading, subset, encoding, sharding over torchrun processes, batching, the all-reduce
and the atomic write. Each statistic is a small :class:`Statistic` hook."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gradmatch.errors import UserError
from gradmatch.kinds.base import INDEX_KEY


def check_arguments(model, data, out, *, overwrite: bool, batch_size: int, max_length: int,
                    max_examples: int | None, device: str | None, seed: int | None = None) -> Path:
    """The checks made before reading anything: sizes at least 1, a seed numpy takes (0 <= seed < 2**32), a known
    device, an output folder that may be written and is none of the inputs. Returns the output folder."""
    from gradmatch.config import check_seed
    from gradmatch.fsutil import check_not_input, check_output_dir

    if seed is not None:
        check_seed(seed, "--seed")
    for flag, value in (("--batch-size", batch_size), ("--max-length", max_length)):
        if int(value) < 1:
            raise UserError(f"{flag} must be at least 1 (got {value})")
    if max_examples is not None and int(max_examples) < 1:
        raise UserError(f"--max-examples must be at least 1 (got {max_examples})")
    if device is not None:
        from gradmatch.devices import parse_device

        parse_device(device)
    out = check_output_dir(out, overwrite)
    check_not_input(out, {"the model": str(model), "the data": str(data)}, "--out")
    return out


@dataclass(frozen=True)
class SplitSpec:
    """Which examples: a data set (preset, hub id or local file), a split in `datasets` syntax, and the rest."""

    data: str
    split: str
    config_name: str | None = None
    data_dir: str | os.PathLike | None = None
    filters: Mapping[str, object] | None = None
    max_examples: int | None = None

    @property
    def label(self) -> str:
        return f"{self.data} ({self.split})"

    def record(self) -> dict[str, Any]:
        """What a statistic's record says of its data."""
        return {"dataset": str(self.data), "split": str(self.split), "config_name": self.config_name,
                "filters": dict(self.filters) if self.filters else None}


@dataclass
class Loaded:
    """A model and the split it is measured on, checked and loaded (the dataset not yet encoded)."""

    name: str
    kind: Any
    config: Any
    dataset: Any
    model: Any
    processor: Any
    max_length: int
    spec: SplitSpec | None = None
    _encoded: Any = field(default=None, repr=False)

    @property
    def source(self) -> Path | None:
        """The model's local folder (None for a built-in spec without files)."""
        from gradmatch.models import BUILTIN_SPECS, resolve_model

        if self.name in BUILTIN_SPECS:
            return None
        path = Path(resolve_model(self.name))
        return path if path.is_dir() else None

    def weights_fingerprint(self) -> str | None:
        from gradmatch.checkpoints import folder_fingerprint

        return folder_fingerprint(self.source) if self.source is not None else None

    def encoded(self):
        if self._encoded is None:
            self._encoded = self.kind.encode(self.dataset, self.processor, self.max_length)
        return self._encoded

    def batches(self, indices: list[int] | None = None, batch_size: int = 16):
        encoded = self.encoded()
        indices = list(range(len(encoded))) if indices is None else indices
        return batches(encoded, self.kind.collator(self.processor), indices, batch_size)


def load(model: str, spec: SplitSpec, *, max_length: int, kind: str | None = None, purpose: str,
         alternatives: str = "fine-tune it first", labels: bool = True, check_model=None,
         weights: bool = True) -> Loaded:
    """Check ``model`` and its split (kind, head for ``purpose``, columns, labels) before its weights load, take the
    first ``spec.max_examples`` examples, then load the model. ``check_model(config, kind)`` may refuse more, early.
    Without ``weights`` only the tokenizer loads (``model`` is None: a sharded run loads its own rows later)."""
    from types import SimpleNamespace

    from gradmatch.data import load_split
    from gradmatch.models import (
        BUILTIN_SPECS,
        is_lora_adapter,
        kind_of,
        load_config,
        load_model,
        load_processor,
        model_max_length,
    )

    name = str(model)
    config = load_config(name)
    model_kind = kind_of(name, kind)
    if name not in BUILTIN_SPECS:
        model_kind.check_head(name, config, purpose, alternatives)
    if check_model is not None:
        check_model(config, model_kind)
    dataset = load_split(spec.data, spec.split, config_name=spec.config_name, data_dir=spec.data_dir,
                         filters=spec.filters)
    model_kind.check_data(dataset, spec.label, name)
    if labels and model_kind.needs_labels:
        model_kind.check_labels(dataset, spec.label, int(config.num_labels))
    if spec.max_examples is not None and len(dataset) > int(spec.max_examples):
        dataset = dataset.select(range(int(spec.max_examples)))
    if not weights:
        if is_lora_adapter(name):
            raise UserError(f"model {name} is a LoRA adapter: sharded runs read full checkpoints (fold it into its "
                            "base first, or run without --shard)")
        return Loaded(name, model_kind, config, dataset, None, load_processor(name, kind=model_kind),
                      model_max_length(SimpleNamespace(config=config), max_length), spec)
    net, processor = load_model(name, kind=model_kind)
    from gradmatch.finite import check_model

    check_model(net, name, purpose)
    return Loaded(name, model_kind, config, dataset, net, processor, model_max_length(net, max_length), spec)


def batches(encoded, collate, indices: list[int], batch_size: int):
    """Padded batches of the encoded examples ``indices`` in turn, each with ``index`` (their positions)."""
    import torch

    columns = [c for c in encoded.column_names if c not in ("text", "image")]
    for start in range(0, len(indices), batch_size):
        chunk = indices[start:start + batch_size]
        rows = encoded[chunk]
        features = [{c: rows[c][j] for c in columns} for j in range(len(chunk))]
        batch = dict(collate(features))
        batch[INDEX_KEY] = torch.tensor(chunk, dtype=torch.long)
        yield batch


def _distributed(use_cuda: bool) -> tuple[int, int, bool]:
    """(rank, world size, whether we started the process group) under torchrun; (0, 1, False) otherwise."""
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, False
    started = False
    if not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
        started = True
    return dist.get_rank(), dist.get_world_size(), started


@contextlib.contextmanager
def distributed_run(device: str | None):
    """Under torchrun, join the process group (starting it if nobody has) and yield (rank, world size, this
    process's device: its GPU where the device is unset or plain ``cuda``); alone, (0, 1, device or the default).
    When the block succeeds every rank meets at a barrier (rank 0 has written the output); a group this started
    is destroyed however the block ends."""
    import torch

    use_cuda = torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda")
    rank, world, started = _distributed(use_cuda)
    try:
        if device is None or (world > 1 and device == "cuda"):
            device = f"cuda:{torch.cuda.current_device()}" if use_cuda else "cpu"
        yield rank, world, device
        if world > 1:
            import torch.distributed as dist

            dist.barrier()
    finally:
        if started:
            import torch.distributed as dist

            dist.destroy_process_group()


class Statistic:
    """The part of a statistic the runner does not do: its accumulator, how processes combine it, what is
    written. ``accumulator(loaded)`` returns an object with ``add(batch) -> examples`` that is also a context
    manager (hooks attached while it is open)."""

    desc: str = "statistic"

    def accumulator(self, loaded: Loaded):
        raise NotImplementedError

    def all_reduce(self, acc) -> None:
        raise NotImplementedError

    def write(self, acc, loaded: Loaded, folder: Path, *, world: int) -> None:
        """Write the result into ``folder`` (the temporary folder that becomes OUT)."""
        raise NotImplementedError

    def before(self, loaded: Loaded, rank: int) -> None:
        """Runs on every process before the model moves to its device (e.g. fingerprint the weights as loaded)."""

    #: Whether the statistic runs over a model FSDP sharded (`--shard`): then it implements the three below.
    shardable: bool = False

    def before_sharded(self, loaded: Loaded, rank: int, world: int, group) -> None:
        """As :meth:`before`, for the sharded model (every process takes part)."""

    def sharded_accumulator(self, loaded: Loaded, group):
        raise NotImplementedError

    def write_sharded(self, acc, loaded: Loaded, folder: Path | None, *, world: int) -> None:
        """Write the result; every process takes part, ``folder`` is None on all but rank 0."""
        raise NotImplementedError


def run(statistic: Statistic, loaded: Loaded, *, out: Path, overwrite: bool, batch_size: int,
        device: str | None, progress: bool, shard: bool = False) -> Path:
    """Accumulate ``statistic`` over ``loaded``'s examples — shared out over torchrun processes (rank r takes
    examples r, r+W, …), combined with the statistic's all-reduce — and let rank 0 write OUT atomically.
    With ``shard`` (``loaded`` without its weights) the model is FSDP-sharded over the processes instead of copied
    into each (:mod:`gradmatch.fisher.sharded`)."""
    from gradmatch.fisher.accumulator import progress_bar
    from gradmatch.fsutil import atomic_dir

    with distributed_run(device) as (rank, world, device):
        encoded = loaded.encoded()
        if shard:
            _run_sharded(statistic, loaded, out=out, overwrite=overwrite, batch_size=int(batch_size), device=device,
                         progress=progress, rank=rank, world=world)
            return Path(out)
        statistic.before(loaded, rank)
        loaded.model.to(device)
        indices = list(range(rank, len(encoded), world))
        acc = statistic.accumulator(loaded)
        with acc, progress_bar(len(indices), progress and rank == 0, statistic.desc) as bar:  # rank 0's share
            for batch in batches(encoded, loaded.kind.collator(loaded.processor), indices, int(batch_size)):
                bar.update(acc.add(batch))
        if world > 1:
            statistic.all_reduce(acc)
        if rank == 0:
            with atomic_dir(out, overwrite) as tmp:
                statistic.write(acc, loaded, tmp, world=world)
    return Path(out)


def _run_sharded(statistic: Statistic, loaded: Loaded, *, out: Path, overwrite: bool, batch_size: int, device: str,
                 progress: bool, rank: int, world: int) -> None:
    import math

    from gradmatch.fisher.accumulator import progress_bar
    from gradmatch.fisher.sharded import (check_sharded_model, load_sharded, lockstep_batches,
                                          map_large_allocations, reduction_group)
    from gradmatch.fsutil import atomic_dir

    encoded = loaded.encoded()
    map_large_allocations()
    with reduction_group() as group:
        loaded.model = load_sharded(loaded.name, loaded.config, loaded.kind, loaded.processor, device=device,
                                    rank=rank, world=world)
        check_sharded_model(loaded.model, loaded.name, statistic.desc)
        statistic.before_sharded(loaded, rank, world, group)
        indices = list(range(rank, len(encoded), world))
        collate = loaded.kind.collator(loaded.processor)
        total = math.ceil(math.ceil(len(encoded) / world) / batch_size)  # rank 0's share is the largest
        filler = next(batches(encoded, collate, indices[:1] or [0], 1))
        acc = statistic.sharded_accumulator(loaded, group)
        own = batches(encoded, collate, indices, batch_size)
        with acc, progress_bar(len(indices), progress and rank == 0, statistic.desc) as bar:
            for batch, live in lockstep_batches(own, filler, total):
                bar.update(acc.add(batch, live=live))
        acc.all_reduce()
        if rank == 0:
            with atomic_dir(out, overwrite) as tmp:
                statistic.write_sharded(acc, loaded, tmp, world=world)
        else:
            statistic.write_sharded(acc, loaded, None, world=world)
