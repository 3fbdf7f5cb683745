"""`gradmatch fisher --shard`: the exact per-example Fisher of a model sharded over torchrun processes with FSDP2.

Each process builds the model on the meta device, wraps every repeated layer and the root with
``torch.distributed.fsdp.fully_shard`` and reads only its own rows of each tensor from the checkpoint
(:func:`load_sharded`), so no process ever holds the whole model. FSDP gathers a layer's weights for its forward
and its backward; the layer rules of :mod:`gradmatch.fisher.layers` form the per-example squares while it is
gathered, summed over the process's examples of the batch, and a reduce-scatter adds each process's rows into its
float32 shard of the sums (:class:`ShardedFisherAccumulator`). Rank 0 writes ``OUT/hessian/`` one tensor at a
time, receiving each process's rows in turn (:func:`write_sharded`): the same files as one process writes.

Every tensor is sharded as FSDP2 shards it, by rows (``torch.chunk`` along dimension 0): process r holds rows
``r·c : (r+1)·c`` with ``c = ⌈rows / W⌉``.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from gradmatch.errors import UserError
from gradmatch.fisher.accumulator import FisherAccumulator, repeated_layers
from gradmatch.fisher.layers import sums_dtype

#: Weights of at least this many entries are formed and reduced by blocks of rows, one process's rows at a time.
ROW_BLOCK_ELEMENTS = 1 << 24

#: What to say when --shard is given outside torchrun.
NOT_UNDER_TORCHRUN = ("--shard shares the model out over the processes torchrun starts (torchrun --nproc_per_node N "
                      "-m gradmatch fisher --shard …); WORLD_SIZE is not set, so this is no torchrun process")


def check_sharded_run() -> None:
    """One line when ``--shard`` cannot run here: outside torchrun."""
    if "WORLD_SIZE" not in os.environ:
        raise UserError(NOT_UNDER_TORCHRUN)


@dataclass(frozen=True)
class Rows:
    """The rows of one tensor a process holds: ``start:stop`` of ``shape[0]``, each process ``chunk`` rows
    (the last ones fewer, or none)."""

    shape: tuple[int, ...]
    start: int
    stop: int
    chunk: int

    @classmethod
    def of(cls, shape: tuple[int, ...], rank: int, world: int) -> Rows:
        n = shape[0] if shape else 1
        chunk = math.ceil(n / world)
        start = min(n, rank * chunk)
        return cls(tuple(shape), start, min(n, start + chunk), chunk)

    @property
    def count(self) -> int:
        return self.stop - self.start

    def of_rank(self, rank: int, world: int) -> Rows:
        return Rows.of(self.shape, rank, world)


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's rows of a parameter FSDP sharded (a DTensor), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


# --------------------------------------------------------------------------- loading


#: glibc's mallopt parameter for the size from which an allocation is its own memory map (returned when freed).
_M_MMAP_THRESHOLD = -3


def map_large_allocations(threshold: int = 1 << 20) -> bool:
    """Make every allocation of ``threshold`` bytes or more its own memory map (glibc only; False elsewhere).

    FSDP gathers each layer's parameters into storages of their own and frees them after the layer; the rules'
    float32 blocks come and go between them. With glibc's default (a threshold that rises to 32 MB after the
    first large free) these land in the heap, which then fragments: on a 0.5B-parameter model a sharded
    process's peak grew by ~50 MB per layer during the backward pass (5.0 GB, against 3.2 GB with this)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, int(threshold)))
    except (OSError, AttributeError):
        return False


def _stored_dtype(config, checkpoint) -> torch.dtype:
    """The dtype transformers' ``from_pretrained`` gives the weights by default (``dtype="auto"``): the config's,
    else the first floating-point tensor's."""
    named = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(named, torch.dtype):
        return named
    if isinstance(named, str) and isinstance(getattr(torch, named, None), torch.dtype):
        return getattr(torch, named)
    return next((info.dtype for info in checkpoint.tensors.values() if info.dtype.is_floating_point), torch.float32)


def load_sharded(name: str, config, kind, processor, *, device: str, rank: int, world: int) -> nn.Module:
    """``name``'s model as FSDP2 shards over the default process group: built on the meta device, every repeated
    layer and the root wrapped with ``fully_shard``, and each parameter's rows for this process read from the
    checkpoint (buffers are computed when the model is built, as transformers does)."""
    from accelerate import init_empty_weights
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from gradmatch.checkpoints import Checkpoint
    from gradmatch.models import resolve_model

    checkpoint = Checkpoint(resolve_model(name), role="model")
    try:
        dtype = _stored_dtype(config, checkpoint)
        with init_empty_weights(include_buffers=False):
            try:
                model = kind.auto_class().from_config(config, dtype=dtype)
            except ValueError as exc:
                raise UserError(f"model {name}: {config.model_type} has no {kind.name} architecture") from exc
        # Tied weights, again: inside init_empty_weights each assignment of a parameter made a new meta copy of it.
        model.tie_weights()
        model.eval()
        layers = repeated_layers(model)
        if not layers:
            raise UserError(f"--shard wraps each repeated layer of the model with FSDP; {type(model).__name__} has "
                            "none that transformers marks (GradientCheckpointingLayer blocks): run without --shard")
        mesh = init_device_mesh(torch.device(device).type, (world,))
        for layer in layers:
            fully_shard(layer, mesh=mesh)
        # Untied input embeddings and output head are units of their own, gathered only while they run (FSDP keeps
        # the root's parameters gathered from forward to backward); a tied matrix stays with the root.
        inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
        if inputs is not None and outputs is not None and inputs.weight is not outputs.weight:
            fully_shard(inputs, mesh=mesh)
            fully_shard(outputs, mesh=mesh)
        fully_shard(model, mesh=mesh)
        buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
        model.to_empty(device=device)
        for full, value in buffers.items():  # to_empty left them uninitialised
            owner, _, attr = full.rpartition(".")
            model.get_submodule(owner)._buffers[attr] = value.to(device)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if pname not in checkpoint:
                    raise UserError(f"--shard reads each tensor of {name} by the model's own names, and its checkpoint "
                                    f"has no {pname!r} (stored under another name?): run without --shard")
                info = checkpoint.info(pname)
                if tuple(info.shape) != tuple(p.shape):
                    raise UserError(f"tensor {pname!r} of {name} has shape {list(info.shape)} in the checkpoint but "
                                    f"{list(p.shape)} in its config's architecture")
                rows, mine = Rows.of(tuple(p.shape), rank, world), local(p)
                if p.dim() == 0 or mine.shape[0] != rows.count:
                    raise RuntimeError(f"FSDP sharded {pname} as {list(mine.shape)}, not rows {rows.start}:{rows.stop}")
                if rows.count:
                    mine.copy_(checkpoint.read(pname, slice(rows.start, rows.stop)).to(mine.dtype))
    finally:
        checkpoint.close()
    return kind.prepare_model(model, processor)


def gathered_non_finite(tensors: dict[str, torch.Tensor], group=None) -> list[tuple[str, int, int]]:
    """:func:`gradmatch.finite.non_finite` of tensors every process holds some rows of (``tensors``: its rows, by
    name, in the same order everywhere): each tensor's NaN and ±Inf counts summed over the processes."""
    import torch.distributed as dist

    from gradmatch.finite import non_finite

    everyone: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, non_finite(tensors.items()), group=group)
    merged: dict[str, list[int]] = {}
    for part in everyone:
        for n, nan, inf in part:
            entry = merged.setdefault(n, [0, 0])
            entry[0], entry[1] = entry[0] + nan, entry[1] + inf
    return [(n, *merged[n]) for n in tensors if n in merged]


def _local_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: local(p) for n, p in model.named_parameters()}


def check_sharded_model(model: nn.Module, name: str, purpose: str) -> None:
    """:func:`gradmatch.finite.check_model` over the shards of every process: the same line on every rank."""
    from gradmatch.finite import check_model

    check_model(model, name, purpose, found=gathered_non_finite(_local_parameters(model)))


# --------------------------------------------------------------------------- accumulating


class ShardedFisherAccumulator(FisherAccumulator):
    """:class:`FisherAccumulator` over a model FSDP2 sharded: this process's float32 rows of every sum.

    Each layer's Σ_b g_b² over this process's examples of the batch is formed in a buffer of the whole parameter
    while FSDP holds it gathered, then reduce-scattered (over a process group of its own) into the processes'
    rows. Every process must run the same number of batches: :meth:`add` with ``live=False`` runs one that only
    keeps the collectives in step (it adds zeros). A module without a closed-form rule is refused: recomputing
    it alone would need its weights after FSDP has resharded them.
    """

    def __init__(self, model: nn.Module, *, group, **kwargs):
        import torch.distributed as dist

        self.group, self.rank, self.world = group, dist.get_rank(group), dist.get_world_size(group)
        self.rows: dict[str, Rows] = {}
        self._buffers: dict = {}  # reused blocks (see _buffer)
        self._padded: dict[str, torch.Tensor] = {}
        super().__init__(model, **kwargs)
        for module, rule in self._rule.items():
            if rule is None:
                self._no_rule(module)
        # The largest weights (an LM head, the embeddings) are formed and reduced one process's rows at a time,
        # never as a whole float32 buffer; so are tied ones (after the backward, as always).
        self.row_blocks = frozenset(
            full for module, owned in self._owner.items() for attr, full in owned
            if attr == "weight" and self._rule[module].shareable and self.sums[full].dim() == 2
            and math.prod(self.rows[full].shape) >= ROW_BLOCK_ELEMENTS)

    def _allocate(self, model):
        sums = {}
        for name, p in model.named_parameters():
            self.rows[name] = Rows.of(tuple(p.shape), self.rank, self.world)
            mine = local(p)
            sums[name] = torch.zeros(mine.shape, dtype=sums_dtype(p), device=mine.device)
        return sums

    def _buffer(self, key, numel: int, like: torch.Tensor) -> torch.Tensor:
        """A flat block of at least ``numel`` entries of ``like``'s dtype, kept under ``key`` and reused (grown when
        too small): allocating and freeing one per module and batch fragmented the heap by about 1 GB on a
        0.5B-parameter model."""
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < numel or buffer.dtype != like.dtype:
            self._buffers[key] = buffer = torch.empty(numel, dtype=like.dtype, device=like.device)
        return buffer[:numel]

    def _no_rule(self, module):
        raise UserError(f"module {self._name(module)} ({type(module).__name__}) has no closed-form rule for its "
                        "per-example squares; --shard needs one for every module that owns parameters (recomputing "
                        "it alone would need its weights after FSDP has resharded them): run without --shard")

    def _whole(self, full: str, slot: int = 0) -> torch.Tensor:
        """A zeroed block of the whole parameter ``full``, padded to W·chunk rows behind the view returned (what the
        reduce-scatter sends); one per slot (a module's weight and bias are formed at once)."""
        rows = self.rows[full]
        rest = math.prod(rows.shape[1:]) if rows.shape else 1
        padded = self._buffer(slot, rows.chunk * self.world * rest, self.sums[full]).zero_()
        padded = padded.view(rows.chunk * self.world, *rows.shape[1:])
        self._padded[full] = padded
        return padded[: rows.shape[0] if rows.shape else 1].view(rows.shape)

    def _targets_of(self, module):
        return {attr: None if full in self._shared or full in self.row_blocks else self._whole(full, slot)
                for slot, (attr, full) in enumerate(self._owner[module])}

    def _commit(self, module, targets):
        for attr, full in self._owner[module]:
            if targets.get(attr) is not None:
                self._scatter(full, targets[attr])

    def _add_rows(self, full, uses):
        """Each process's rows in turn: formed by every process from its examples, summed onto their owner."""
        import torch.distributed as dist

        rows = self.rows[full]
        rest = rows.shape[1:]
        for r in range(self.world):
            theirs = rows.of_rank(r, self.world)
            if not theirs.count:
                continue
            block = self._buffer("rows", theirs.count * math.prod(rest), self.sums[full])
            block = block.view(theirs.count, *rest).zero_()
            if self._live:
                self._rows_into(block, full, slice(theirs.start, theirs.stop), uses)
            dist.reduce(block, dst=r, group=self.group)
            if r == self.rank:
                self.sums[full].add_(block)

    def _scatter(self, full: str, whole: torch.Tensor) -> None:
        """Sum ``whole`` over the processes and add each process's rows to its sums."""
        import torch.distributed as dist

        rows = self.rows[full]
        rest = whole.shape[1:] if whole.dim() else ()
        padded = self._padded.pop(full)  # ``whole`` is its first rows; the padding rows stay zero
        if not self._live:
            padded.zero_()
        mine = self._buffer("mine", rows.chunk * math.prod(rest), whole).view(rows.chunk, *rest)
        dist.reduce_scatter_tensor(mine, padded, group=self.group)
        if rows.count:
            self.sums[full].view(rows.count, *rest).add_(mine[: rows.count])

    def add(self, batch, live: bool = True) -> int:
        self._live = live
        try:
            added = super().add(batch)
        finally:
            self._live = True
        if not live:
            self.count -= added
            return 0
        return added

    def all_reduce(self) -> None:
        """The sums are already combined (reduce-scattered per batch): only the example count is summed."""
        import torch.distributed as dist

        device = next(iter(self.sums.values())).device
        count = torch.tensor([self.count], dtype=torch.float64, device=device)
        dist.all_reduce(count, group=self.group)
        self.count = int(count.item())


def lockstep_batches(batches: Iterator, filler, total: int) -> Iterator[tuple[dict, bool]]:
    """(batch, live) for ``total`` batches: this process's own, then copies of ``filler`` (not live) until every
    process has run as many (FSDP's and the reduce-scatter's collectives need them in step)."""
    done = 0
    for batch in batches:
        yield batch, True
        done += 1
    for _ in range(total - done):
        yield filler, False


# --------------------------------------------------------------------------- writing


def _entries(model: nn.Module) -> list[tuple[str, torch.Tensor, bool]]:
    """(name, tensor, is a parameter) in the order of the state dict, each shared tensor once under its first name
    (what ``save_pretrained`` writes for tied weights)."""
    params = {id(p) for p in model.parameters()}
    seen: set[int] = set()
    entries = []
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen:
            continue
        seen.add(id(t))
        entries.append((name, t, id(t) in params))
    return entries


def _stream_rows(rows: Rows, mine: torch.Tensor, *, rank: int, world: int, group) -> Iterator[tuple[int, torch.Tensor]]:
    """On rank 0, (first row, block) of every process's rows of one tensor in order (received one process at a
    time); on the others, their rows sent to rank 0 and nothing yielded."""
    import torch.distributed as dist

    if rank != 0:
        if rows.count:
            dist.send(mine.contiguous(), dst=0, group=group)
        return
    for r in range(world):
        theirs = rows.of_rank(r, world)
        if not theirs.count:
            continue
        if r == 0:
            block = mine
        else:
            block = mine.new_empty((theirs.count, *rows.shape[1:]))
            dist.recv(block, src=r, group=group)
        yield theirs.start, block


def sharded_fingerprint(model: nn.Module, *, rank: int, world: int, group) -> str | None:
    """:func:`gradmatch.fisher.files.model_fingerprint` of the whole model, on rank 0, from every process's rows
    streamed to it one tensor at a time (None on the other ranks)."""
    import hashlib

    h = hashlib.sha256() if rank == 0 else None
    for name, t in sorted(model.state_dict().items()):
        mine = local(t).detach()
        sharded = hasattr(t, "to_local")
        if h is not None:
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        if not sharded:
            if h is not None and t.numel():
                h.update(mine.to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
            continue
        rows = Rows.of(tuple(t.shape), rank, world)
        for _, block in _stream_rows(rows, mine.reshape(rows.count, *t.shape[1:]), rank=rank, world=world,
                                     group=group):
            h.update(block.to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return "sha256:" + h.hexdigest() if h is not None else None


def write_sharded(acc: ShardedFisherAccumulator, model: nn.Module, folder: Path | None, metadata: dict,
                  dtype: torch.dtype) -> None:
    """Write the mean of ``acc`` as ``folder/hessian/`` (on rank 0; ``folder`` is None on the others, which send
    their rows): the layout :func:`gradmatch.fisher.files.write_hessian` writes, one tensor at a time."""
    import torch.distributed as dist

    from gradmatch.checkpoints.writing import SafetensorsWriter, TensorSpec, parse_size
    from gradmatch.finite import describe, dumps, model_cause
    from gradmatch.fisher.files import RECORD_FILE, check_storable, save_max_shard_size

    rank, world, group = acc.rank, acc.world, acc.group
    means = acc.mean(in_place=True)
    bad = gathered_non_finite(means, group)
    if bad:  # write_hessian's line (gradmatch.finite.check_finite), from every process's rows
        cause = model_cause(model, str(metadata.get("model")), gathered_non_finite(_local_parameters(model), group))
        raise UserError(f"the Hessian holds {describe(bad)}: {cause}; nothing was written")
    messages: list = [None] * world
    dist.all_gather_object(messages, check_storable(means.items(), dtype), group=group)
    too_large = next((message for message in messages if message), None)
    if too_large:
        raise UserError(too_large)
    entries = _entries(model)
    writer = None
    if rank == 0:
        target = folder / "hessian"
        target.mkdir(parents=True)
        specs = [TensorSpec(name, dtype if t.is_floating_point() or is_param else t.dtype, tuple(t.shape))
                 for name, t, is_param in entries]
        writer = SafetensorsWriter(target, specs, parse_size(save_max_shard_size()))
    try:
        for name, t, is_param in entries:
            if not is_param:  # a buffer in the state dict (e.g. BatchNorm statistics): zeros, as write_hessian
                if writer is not None:
                    writer.write(name, torch.zeros(tuple(t.shape), dtype=dtype if t.is_floating_point() else t.dtype))
                continue
            rows = acc.rows[name]
            mine = means[name].to(dtype).reshape(rows.count, *rows.shape[1:])
            for start, block in _stream_rows(rows, mine, rank=rank, world=world, group=group):
                writer.write(name, block, start)
        if writer is not None:
            writer.finish()
    finally:
        if writer is not None:
            writer.close()
    if rank == 0:
        config = model.config.__class__.from_dict(model.config.to_dict())
        config.dtype = dtype
        config.save_pretrained(folder / "hessian")
        generation = getattr(model, "generation_config", None)
        if generation is not None and model.can_generate():
            generation.save_pretrained(folder / "hessian")
        (folder / "hessian" / RECORD_FILE).write_text(dumps(metadata, indent=2) + "\n")


@contextlib.contextmanager
def reduction_group():
    """A gloo or NCCL group of every process, apart from the one FSDP uses (so that its asynchronous gathers and
    the accumulator's reduce-scatters never interleave on one group)."""
    import torch.distributed as dist

    group = dist.new_group(backend=dist.get_backend())
    try:
        yield group
    finally:
        dist.destroy_process_group(group)
