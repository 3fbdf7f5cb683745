"""Writing sharded safetensors with an index, one tensor (or block of rows) at a time: shards planned from the
tensors' names, dtypes and shapes before any value is known, each block written to its place."""

from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from gradmatch.checkpoints.reading import SAFE_INDEX, SAFE_WEIGHTS, SAFETENSORS_DTYPES
from gradmatch.errors import UserError

log = logging.getLogger("gradmatch.checkpoints")


# --------------------------------------------------------------------------- writing

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)?\s*$", re.IGNORECASE)

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def parse_size(text: str | int) -> int:
    """Bytes from ``5GB``, ``500MB``, ``2GiB`` or a plain number (as transformers' max_shard_size)."""
    if isinstance(text, int):
        size = text
    else:
        match = _SIZE.match(str(text))
        unit = (match.group(2) or "").upper() if match else None
        if not match or unit not in _UNITS:
            raise UserError(f"cannot read the size {text!r} (use e.g. 5GB, 500MB, 2GiB)")
        size = int(float(match.group(1)) * _UNITS[unit])
    if size <= 0:
        raise UserError(f"a shard size must be positive, got {text!r}")
    return size


@dataclass(frozen=True)
class TensorSpec:
    """A tensor to be written, known before its values: name, dtype and shape."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def rows(self) -> int:
        """Rows along the first dimension (a scalar is one row)."""
        return self.shape[0] if self.shape else 1

    @property
    def row_bytes(self) -> int:
        return math.prod(self.shape[1:]) * self.dtype.itemsize if self.shape else self.nbytes


_DTYPE_CODES = {dtype: code for code, (_, dtype) in SAFETENSORS_DTYPES.items()}


def plan_shards(specs: list[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Split tensors, in order, into shards of at most ``max_shard_bytes`` (transformers' rule: a tensor
    larger than the limit gets a shard of its own); always at least one shard."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def shard_file_names(n: int) -> list[str]:
    """The weight file names transformers gives ``n`` shards."""
    return [SAFE_WEIGHTS] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


class _ShardFile:
    """One safetensors file whose header is written first; each tensor's bytes then go to their offset.

    Tensors are laid out by decreasing element size (then in the order given), as safetensors' own
    writer does, so every tensor's data is aligned to its element size. Each tensor's rows must arrive
    in order, each exactly once; ``close`` checks that every byte was written.
    """

    def __init__(self, path: Path, specs: list[TensorSpec]):
        self.path = path
        layout = sorted(specs, key=lambda s: -s.dtype.itemsize)  # stable: the given order within a size
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        begin = 0
        for spec in layout:
            header[spec.name] = {"dtype": _DTYPE_CODES[spec.dtype], "shape": list(spec.shape),
                                 "data_offsets": [begin, begin + spec.nbytes]}
            begin += spec.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned (safetensors pads with spaces)
        data_start = 8 + len(raw)
        self.specs = {s.name: s for s in specs}
        self.offsets = {name: data_start + entry["data_offsets"][0]
                        for name, entry in header.items() if name != "__metadata__"}
        self.next_row = dict.fromkeys(self.specs, 0)
        self._unfinished = {s.name for s in specs if s.nbytes}
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        _pwrite_all(self.fd, memoryview(len(raw).to_bytes(8, "little") + raw), 0, path)
        os.ftruncate(self.fd, data_start + begin)

    def write(self, name: str, tensor: torch.Tensor, first_row: int = 0) -> None:
        spec = self.specs[name]
        rows = tensor.shape[0] if tensor.dim() else 1
        if tensor.dtype != spec.dtype or tensor.dim() != len(spec.shape) or tuple(tensor.shape[1:]) != spec.shape[1:]:
            raise RuntimeError(f"{self.path}: tensor {name!r} was planned as {spec.dtype} {list(spec.shape)} "
                               f"but a block of {tensor.dtype} {list(tensor.shape)} arrived")
        if first_row != self.next_row[name] or first_row + rows > spec.rows:
            raise RuntimeError(f"{self.path}: rows {first_row}:{first_row + rows} of tensor {name!r} arrived "
                               f"out of order (next expected row {self.next_row[name]})")
        if tensor.numel():
            data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
            _pwrite_all(self.fd, memoryview(data.numpy()), self.offsets[name] + first_row * spec.row_bytes, self.path)
        self.next_row[name] = first_row + rows
        if self.next_row[name] == spec.rows:
            self._unfinished.discard(name)

    @property
    def complete(self) -> bool:
        return not self._unfinished

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _pwrite_all(fd: int, buffer: memoryview, offset: int, path: Path) -> None:
    try:
        while buffer:
            done = os.pwrite(fd, buffer, offset)
            buffer, offset = buffer[done:], offset + done
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror or exc}") from exc


class SafetensorsWriter:
    """Write planned tensors into sharded safetensors, block by block: memory holds only the block given.

    The shard layout comes from the specs (names, dtypes, shapes, in order) before any value exists;
    a shard's file is created with its header when its first tensor arrives, and each block of rows
    goes straight to its offset (``write(name, block, first_row)``). ``finish`` checks that every byte
    was written and names the files as transformers does: ``model.safetensors`` for one shard, else
    ``model-00001-of-0000N.safetensors`` and ``model.safetensors.index.json``. Until then the shards
    have hidden names (``.shard-00001.safetensors``), so a folder never shows a partial weight file
    under a weight file's name.
    """

    def __init__(self, folder: str | os.PathLike, specs: list[TensorSpec], max_shard_bytes: int):
        self.folder = Path(folder)
        self.shards = plan_shards(list(specs), max_shard_bytes)
        self.names = shard_file_names(len(self.shards))
        self._shard_of = {spec.name: i for i, shard in enumerate(self.shards) for spec in shard}
        self._empty = {spec.name for shard in self.shards for spec in shard if spec.nbytes == 0}
        self._open: dict[int, _ShardFile] = {}
        self._done: set[int] = set()
        self.total_bytes = sum(spec.nbytes for shard in self.shards for spec in shard)

    def _temporary(self, i: int) -> Path:
        return self.folder / f".shard-{i + 1:05d}.safetensors"

    def write(self, name: str, tensor: torch.Tensor, first_row: int = 0) -> None:
        """Write ``tensor`` as rows ``first_row:first_row + len(tensor)`` of tensor ``name`` (all of it by default)."""
        i = self._shard_of[name]
        if name in self._empty:  # a tensor of no entries has its header entry and no bytes: nothing to write
            return
        shard = self._open.get(i)
        if shard is None:
            if i in self._done:
                raise RuntimeError(f"tensor {name!r} written after its shard was complete")
            shard = self._open[i] = _ShardFile(self._temporary(i), self.shards[i])
        shard.write(name, tensor, first_row)
        if shard.complete:  # only the shards being written stay open
            shard.close()
            del self._open[i]
            self._done.add(i)

    def finish(self) -> list[Path]:
        """Give the complete shards their final names and write the index; return the files written."""
        for i, shard in enumerate(self.shards):
            if i in self._done:
                continue
            if i not in self._open and all(spec.nbytes == 0 for spec in shard):  # nothing to write in it
                _ShardFile(self._temporary(i), shard).close()
                continue
            written = self._open[i].next_row if i in self._open else {}
            name = next(s.name for s in shard if written.get(s.name, 0) < s.rows and s.nbytes)
            raise RuntimeError(f"tensor {name!r} was planned but not (completely) written")
        files = []
        for i, name in enumerate(self.names):
            os.replace(self._temporary(i), self.folder / name)
            files.append(self.folder / name)
        if len(self.shards) > 1:
            weight_map = {spec.name: self.names[i] for i, shard in enumerate(self.shards) for spec in shard}
            parameters = sum(math.prod(spec.shape) for shard in self.shards for spec in shard)
            index = {"metadata": {"total_parameters": parameters, "total_size": self.total_bytes}, "weight_map": weight_map}
            (self.folder / SAFE_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            files.append(self.folder / SAFE_INDEX)
        return files

    def close(self) -> None:
        """Close the files of unfinished shards (after an error); they stay in the (temporary) folder."""
        for shard in self._open.values():
            shard.close()
        self._open.clear()


def save_sharded(tensors: dict[str, torch.Tensor], folder: str | os.PathLike, max_shard_bytes: int) -> list[Path]:
    """Write a dict of tensors as sharded safetensors with an index (as transformers names them)."""
    writer = SafetensorsWriter(folder, [TensorSpec(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()], max_shard_bytes)
    try:
        for name, tensor in tensors.items():
            writer.write(name, tensor)
        return writer.finish()
    finally:
        writer.close()


class ShardedWriter:
    """Collect tensors one by one and write them with :func:`save_sharded` at ``finish`` (for small state
    dicts such as test fixtures: it holds every tensor; the merge streams with :class:`SafetensorsWriter`)."""

    def __init__(self, folder: str | os.PathLike, max_shard_bytes: int):
        self.folder = Path(folder)
        self.max_shard_bytes = max_shard_bytes
        self._tensors: dict[str, torch.Tensor] = {}

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self._tensors[name] = tensor.detach().to("cpu").contiguous()

    def finish(self) -> list[Path]:
        return save_sharded(self._tensors, self.folder, self.max_shard_bytes)
