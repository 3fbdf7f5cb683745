"""Hugging Face model folders, tensor by tensor: validated lazy reading (safetensors, sharded, .bin)
and sharded safetensors writing with an index, plus copying a folder's non-weight files."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from gradmatch.errors import UserError

log = logging.getLogger(__name__)

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_WEIGHTS = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
#: The folder of a trained model holding the initial values of the tensors training added to its pretrained
#: parent (a new head), written by `gradmatch train`; a merge from that parent starts the head from them.
HEAD_INIT = "head_init"
#: Where a Hessian folder keeps its weights, in the order looked for.
WEIGHT_LAYOUTS = (SAFE_WEIGHTS, SAFE_INDEX, BIN_WEIGHTS, BIN_INDEX)  # transformers' order of preference

#: safetensors dtype codes: bytes per entry and torch dtype.
SAFETENSORS_DTYPES: dict[str, tuple[int, torch.dtype]] = {
    "F64": (8, torch.float64), "F32": (4, torch.float32), "F16": (2, torch.float16), "BF16": (2, torch.bfloat16),
    "F8_E4M3": (1, torch.float8_e4m3fn), "F8_E5M2": (1, torch.float8_e5m2),
    "I64": (8, torch.int64), "I32": (4, torch.int32), "I16": (2, torch.int16), "I8": (1, torch.int8),
    "U64": (8, torch.uint64), "U32": (4, torch.uint32), "U16": (2, torch.uint16), "U8": (1, torch.uint8),
    "BOOL": (1, torch.bool),
}
#: safetensors' own limit on the JSON header.
MAX_HEADER_BYTES = 100_000_000


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what it is, known from the file header without reading the data."""

    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int | None = None  # safetensors: byte offset of the data in the file (validated)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def is_floating(self) -> bool:
        return self.dtype.is_floating_point


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Validate a safetensors file's header against its size and return its tensors, in file order.

    Checked before any tensor is allocated: the 8-byte length, a JSON header of that length, known
    dtypes, shapes whose byte size matches the data offsets, and offsets inside the file (so a
    truncated file or a header claiming a huge tensor is reported, not read).
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise UserError(f"{path} is not a safetensors file: it is only {size} bytes long (truncated?)")
            n = int.from_bytes(prefix, "little")
            if n > min(size - 8, MAX_HEADER_BYTES):
                raise UserError(f"{path} is corrupt or truncated: its header claims {n} bytes but the file has {size}")
            raw = fh.read(n)
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise UserError(f"{path} is corrupt: its header is not valid JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise UserError(f"{path} is corrupt: its header is not a JSON object")
    data_bytes = size - 8 - n
    tensors: list[tuple[int, TensorInfo]] = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            code, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            shape = tuple(int(d) for d in shape)
            begin, end = int(begin), int(end)
        except (KeyError, TypeError, ValueError, OverflowError):  # OverflowError: a dimension 1e400 (infinity)
            raise UserError(f"{path} is corrupt: the header entry of tensor {name!r} is malformed") from None
        if not isinstance(code, str) or code not in SAFETENSORS_DTYPES:
            raise UserError(f"{path}: tensor {name!r} has unknown dtype {code!r}")
        itemsize, dtype = SAFETENSORS_DTYPES[code]
        if any(d < 0 for d in shape) or not 0 <= begin <= end:
            raise UserError(f"{path} is corrupt: tensor {name!r} has shape {list(shape)} and offsets [{begin}, {end}]")
        if end - begin != math.prod(shape) * itemsize:
            raise UserError(f"{path} is corrupt: tensor {name!r} of shape {list(shape)} and dtype {code} "
                            f"needs {math.prod(shape) * itemsize} bytes but its offsets span {end - begin}")
        if end > data_bytes:
            raise UserError(f"{path} is truncated or corrupt: tensor {name!r} ends at byte {end} of the data "
                            f"but the file holds only {data_bytes} bytes of data")
        tensors.append((begin, TensorInfo(name, path, dtype, shape, 8 + n + begin)))
    try:  # the library's own checks (contiguous data, full coverage) as a second opinion
        with safe_open(path, framework="pt") as fh:
            fh.keys()
    except SafetensorError as exc:
        raise UserError(f"{path} is corrupt or truncated: {exc}") from exc
    except (RuntimeError, OSError) as exc:  # safe_open maps the whole file: a file larger than memory may not map
        if "mmap" not in str(exc):  # (the checks above passed, and reading uses plain reads, not a map)
            raise UserError(f"cannot open {path} with safetensors: {' '.join(str(exc).split())[:300]}") from exc
    return {info.name: info for _, info in sorted(tensors, key=lambda item: item[0])}


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    """A pytorch_model.bin as a dict of tensors, memory-mapped, never unpickling anything but tensors."""
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)  # legacy (pre-zip) format
    except Exception as exc:  # UnpicklingError for unsafe content, RuntimeError/EOFError for corrupt files
        detail = " ".join(str(exc).split())[:300]
        raise UserError(f"{path} is corrupt or not a plain tensor file (only tensors are unpickled): {detail}") from exc
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise UserError(f"{path} does not hold a state dict of named tensors")
    return state


def _read_index(path: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(path.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError, KeyError, TypeError) as exc:
        raise UserError(f"{path} is not a valid shard index (a JSON object with a weight_map): {exc}") from exc
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise UserError(f"{path}: weight_map must map tensor names to shard file names")
    for shard in set(weight_map.values()):
        if Path(shard).name != shard:
            raise UserError(f"{path}: shard {shard!r} is not a file name inside the folder")
        if not (path.parent / shard).is_file():
            raise UserError(f"{path} names shard {shard} which does not exist in {path.parent}")
    return weight_map


def weight_layout(folder: Path) -> str | None:
    """The weight file (or index) of a Hugging Face folder, or None when it has none: of several, the one
    transformers' ``from_pretrained`` loads (``model.safetensors``, then its index, then ``pytorch_model.bin``,
    then its index), so that a merge reads the tensors that fisher, evaluate and train load."""
    found = [name for name in WEIGHT_LAYOUTS if (folder / name).is_file()]
    if len(found) > 1:
        log.warning("note: %s holds %s; reading %s, as transformers does (the others are ignored)", folder,
                    " and ".join(found), found[0])
    return found[0] if found else None


class TensorSource:
    """Named tensors known by their :class:`TensorInfo` (``tensors``), read by name and block of rows (``read``):
    a checkpoint folder, a view of others under new names, or constant tensors. The merge reads them alike."""

    tensors: dict[str, TensorInfo]
    folder: Path | None
    role: str

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def info(self, name: str) -> TensorInfo:
        return self.tensors[name]

    def read(self, name: str, rows: slice | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def read_into(self, name: str, rows: slice | None, buffer: np.ndarray) -> int:
        """The stored bytes of tensor ``name`` (rows ``rows``) into the flat uint8 array ``buffer``, which
        must hold them; return their number. (A merge's fused path reads every block this way.)"""
        block = self.read(name, rows, out=torch.from_numpy(buffer))
        return block.numel() * block.element_size()

    def close(self) -> None:
        """Release what reading holds open."""


class Checkpoint(TensorSource):
    """The tensors of one Hugging Face folder, read one tensor (or one block of rows) at a time.

    Opening validates every weight file's header and the shard index; nothing stays mapped between
    reads (files stay open until :meth:`close`), so reading many checkpoints keeps only the tensors
    asked for in memory.
    """

    def __init__(self, folder: str | os.PathLike, role: str = "model"):
        self.folder = Path(folder)
        self.role = role
        if not self.folder.exists():
            raise UserError(f"{role} {self.folder} does not exist")
        if not self.folder.is_dir():
            raise UserError(f"{role} {self.folder} is a file, not a Hugging Face model folder")
        layout = weight_layout(self.folder)
        if layout is None and (self.folder / "adapter_config.json").is_file():
            raise UserError(f"{role} {self.folder} is a LoRA/PEFT adapter, not a full model: merge it into its "
                            "base first (peft's merge_and_unload, as gradmatch train does) and save that")
        if layout is None:
            raise UserError(f"{role} {self.folder} is not a model folder: it has none of {', '.join(WEIGHT_LAYOUTS)}")
        self.layout = layout
        self._bin_tensor: tuple[str, torch.Tensor] | None = None
        self._bin_lock = threading.Lock()
        self._fds: dict[Path, int] = {}
        self.tensors: dict[str, TensorInfo] = {}
        if layout in (SAFE_INDEX, BIN_INDEX):
            weight_map = _read_index(self.folder / layout)
            shards = list(dict.fromkeys(weight_map.values()))
        else:
            weight_map, shards = None, [layout]
        for shard in shards:
            path = self.folder / shard
            if shard.endswith(".safetensors"):
                found = read_safetensors_header(path)
            else:
                found = {k: TensorInfo(k, path, v.dtype, tuple(v.shape)) for k, v in _load_bin(path).items()}
            for name, info in found.items():
                if weight_map is not None and weight_map.get(name) != shard:
                    raise UserError(f"{path} holds tensor {name!r} which the index {self.folder / layout} "
                                    f"places {'in ' + weight_map[name] if name in weight_map else 'nowhere'}")
                self.tensors[name] = info
        if weight_map is not None:
            missing = [name for name in weight_map if name not in self.tensors]
            if missing:
                raise UserError(f"{self.folder / layout} lists tensor {missing[0]!r} but {weight_map[missing[0]]} does not hold it")
        config = self.folder / "config.json"
        self.config: dict | None = None
        if config.is_file():
            try:
                self.config = json.loads(config.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
                raise UserError(f"{config} is not valid JSON: {exc}") from exc

    def read(self, name: str, rows: slice | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """Tensor ``name`` (only rows ``rows`` of its first dimension, if given), in its stored dtype.

        ``out``: a flat uint8 buffer of at least the block's size (e.g. pinned host memory) to read
        into; the result is then a view of it.
        """
        info = self.tensors[name]
        shape = info.shape
        if rows is not None:
            start, stop, _ = rows.indices(shape[0])
            shape = (max(0, stop - start), *shape[1:])
        if out is not None:
            target = out[: math.prod(shape) * info.dtype.itemsize].view(info.dtype).view(shape)
        if info.offset is None:  # .bin: memory-mapped; keep only the tensor being read (its blocks share one load)
            with self._bin_lock:  # a prefetching reader thread and the writer may read the same checkpoint
                if self._bin_tensor is None or self._bin_tensor[0] != name:
                    self._bin_tensor = None  # unmap the previous file before mapping the next
                    self._bin_tensor = (name, _load_bin(info.file)[name])
                tensor = self._bin_tensor[1]
            block = tensor if rows is None else tensor[rows]
            return block.clone() if out is None else target.copy_(block)
        tensor = torch.empty(shape, dtype=info.dtype) if out is None else target
        self.read_into(name, rows, tensor.reshape(-1).view(torch.uint8).numpy())
        return tensor

    def read_into(self, name: str, rows: slice | None, buffer: np.ndarray) -> int:
        info = self.tensors[name]
        if info.offset is None:
            return super().read_into(name, rows, buffer)
        row_bytes = math.prod(info.shape[1:]) * info.dtype.itemsize
        if rows is None:
            start, nbytes = 0, info.numel * info.dtype.itemsize
        else:
            start, stop, _ = rows.indices(info.shape[0])
            nbytes = max(0, stop - start) * row_bytes
        _read_bytes(self._fd(info.file), info.file, info.offset + start * row_bytes, memoryview(buffer)[:nbytes])
        return nbytes

    def _fd(self, path: Path) -> int:
        """An open descriptor of weight file ``path``, kept for the next blocks: opening the file for each block
        of a 0.5B-parameter merge (70,000 blocks) cost 5 % of its time."""
        fd = self._fds.get(path)
        if fd is None:
            with self._bin_lock:
                fd = self._fds.get(path)
                if fd is None:
                    try:
                        fd = self._fds[path] = os.open(path, os.O_RDONLY)
                    except OSError as exc:
                        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from exc
        return fd

    def close(self) -> None:
        """Close the weight files kept open for reading (reading again reopens them)."""
        with self._bin_lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
            self._bin_tensor = None

    def __del__(self):
        try:
            for fd in self._fds.values():
                os.close(fd)
        except Exception:  # noqa: BLE001 - at interpreter exit os may already be gone; the fds close anyway
            pass


def _read_bytes(fd: int, path: Path, offset: int, buffer: memoryview) -> None:
    """Fill ``buffer`` with the bytes of file ``fd`` (``path``) from ``offset`` (safetensors data is little-endian,
    C order).

    Plain positional reads into the buffer, at offsets validated by :func:`read_safetensors_header`:
    unlike a memory map (safe_open), nothing stays mapped, so resident memory holds only the tensors
    asked for, and there are no per-page faults (which made a MiniLM merge 4-6x slower here).
    """
    try:
        while buffer:
            got = os.preadv(fd, [buffer], offset)
            if not got:
                raise UserError(f"{path} ended early while reading (was it truncated after it was opened?)")
            buffer, offset = buffer[got:], offset + got
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from exc


class ConstantTensors(TensorSource):
    """Tensors holding one value everywhere, of given names and shapes, with nothing on disk: an isotropic
    prior's Hessian (c·I), or a zero Hessian for tensors a model does not have. Reads like a :class:`Checkpoint`."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], value: float, role: str, dtype: torch.dtype = torch.float32):
        self.folder: Path | None = None
        self.config: dict | None = None
        self.role, self.value = role, float(value)
        self.tensors = {name: TensorInfo(name, Path(f"<{role}>"), dtype, tuple(shape)) for name, shape in shapes.items()}

    def read(self, name: str, rows: slice | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        info = self.tensors[name]
        shape = info.shape
        if rows is not None:
            start, stop, _ = rows.indices(shape[0])
            shape = (max(0, stop - start), *shape[1:])
        if out is None:
            return torch.full(shape, self.value, dtype=info.dtype)
        return out[: math.prod(shape) * info.dtype.itemsize].view(info.dtype).view(shape).fill_(self.value)


class TensorView(TensorSource):
    """Tensors of other checkpoints under new names, read like one :class:`Checkpoint`.

    ``sources`` pairs a checkpoint with a map {name here: name there}: a pretrained body under its
    fine-tuned children's names (BertModel's ``embeddings.x`` as ``bert.embeddings.x``), plus the
    tensors the body lacks from elsewhere (a recorded head initialisation, a child's head). ``folder``
    and ``config`` are the first source's.
    """

    def __init__(self, sources: list[tuple[TensorSource, dict[str, str]]], role: str | None = None):
        first = sources[0][0]
        self.folder, self.config = first.folder, first.config
        self.role = role or first.role
        self.sources = [source for source, _ in sources]
        self._where: dict[str, tuple[TensorSource, str]] = {}
        self.tensors: dict[str, TensorInfo] = {}
        for source, names in sources:
            for name, there in names.items():
                if name in self._where:
                    continue  # the first source holding a name gives it
                if there not in source:
                    raise UserError(f"{source.role} {source.folder} lacks tensor {there!r}"
                                    + (f" (wanted as {name!r})" if there != name else ""))
                self._where[name] = (source, there)
                info = source.info(there)
                self.tensors[name] = TensorInfo(name, info.file, info.dtype, info.shape, info.offset)

    def source_name(self, name: str) -> str:
        """The name tensor ``name`` has in the checkpoint it comes from."""
        return self._where[name][1]

    def read(self, name: str, rows: slice | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        source, there = self._where[name]
        return source.read(there, rows, out)

    def close(self) -> None:
        for source in self.sources:
            source.close()


def match_names(wanted: dict[str, TensorInfo], available: dict[str, TensorInfo]) -> dict[str, str]:
    """Which tensors of ``available`` (a pretrained body) the model ``wanted`` (that body with a head) holds, as
    {wanted name: available name}: the same names, or names one leading component apart (the body's prefix:
    BertModel's ``embeddings.x`` is ``bert.embeddings.x`` in BertForSequenceClassification; the reverse for a
    body saved with a prefix the children lack). Of these renamings, the one that pairs the most names."""
    def renamings():
        yield lambda n: n
        for prefix in sorted({n.split(".", 1)[0] + "." for n in wanted if "." in n}):
            yield lambda n, p=prefix: n[len(p):] if n.startswith(p) else None
        for prefix in sorted({n.split(".", 1)[0] + "." for n in available if "." in n}):
            yield lambda n, p=prefix: p + n

    best: dict[str, str] = {}
    for rename in renamings():
        pairs = {}
        for name in wanted:
            there = rename(name)
            if there is not None and there in available:
                pairs[name] = there
        if len(pairs) > len(best):
            best = pairs
    return best


def find_hessian_folder(path: str | os.PathLike) -> Path:
    """A Hessian as written by `gradmatch fisher` or the original code: ``<out>/hessian`` if present, else ``<out>``."""
    path = Path(path)
    inner = path / "hessian"
    if inner.is_dir() and weight_layout(inner) is not None:
        return inner
    if (path / "training_metadata.json").is_file() and not inner.exists():  # a model `gradmatch train` wrote
        try:
            optimizer = (json.loads((path / "training_metadata.json").read_text()).get("config") or {}).get(
                "optimizer_name")
        except (OSError, ValueError, AttributeError):
            optimizer = None
        source = "save_hessian: ivon saves IVON's" if optimizer == "IVON" else "save_hessian: adam saves AdamW's"
        raise UserError(f"{path} is a model trained by gradmatch train and holds no hessian/ folder: its optimizer's "
                        f"Hessian was not saved ({source} when it trains), and its weights are not a Hessian; "
                        f"run `gradmatch fisher --model {path}` for one")
    return path


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
        self._open: dict[int, _ShardFile] = {}
        self._done: set[int] = set()
        self.total_bytes = sum(spec.nbytes for shard in self.shards for spec in shard)

    def _temporary(self, i: int) -> Path:
        return self.folder / f".shard-{i + 1:05d}.safetensors"

    def write(self, name: str, tensor: torch.Tensor, first_row: int = 0) -> None:
        """Write ``tensor`` as rows ``first_row:first_row + len(tensor)`` of tensor ``name`` (all of it by default)."""
        i = self._shard_of[name]
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


#: Files and folders of a model folder that are weights or training artefacts, never copied to a merge.
_WEIGHT_FILE = re.compile(
    r"(.*\.safetensors|.*\.safetensors\.index\.json|pytorch_model.*\.bin|.*\.bin\.index\.json|tf_model.*\.h5"
    r"|flax_model.*\.msgpack|model\.ckpt.*|training_metadata\.json|fisher\.json|merge\.json|\.gradmatch-.*"
    r"|.*\.pt|.*\.pth|training_args\.bin|trainer_state\.json|adapter_model\..*)"
)
_SKIPPED_DIRS = re.compile(r"(hessian|head_init|checkpoint-.*|runs|\..*)")


def _link_roots(folder: Path) -> list[Path]:
    """Where the files that links in ``folder`` point to may lie: the folder itself, and for a snapshot of
    the Hugging Face hub cache (``models--org--name/snapshots/<rev>``, whose files are links into
    ``models--org--name/blobs``) that cache entry."""
    real = folder.resolve()
    roots = [real]
    if real.parent.name == "snapshots" and real.parent.parent.name.split("--")[0] in ("models", "datasets", "spaces"):
        roots.append(real.parent.parent)
    return roots


def copy_non_weight_files(src: str | os.PathLike, dst: str | os.PathLike) -> list[Path]:
    """Copy every file of model folder ``src`` except weights byte for byte into ``dst`` (config,
    tokenizer, image processor, generation config, sentence-transformers modules ...).

    Links are followed only to files inside ``src`` (or, for a hub-cache snapshot, inside its cache
    entry); a link to a file elsewhere is skipped with a warning, so a merge never carries a stray
    file into its output. Links to folders are never followed (a link to ``.`` would recurse forever).
    """
    src, dst = Path(src), Path(dst)
    return _copy_tree(src, dst, _link_roots(src))


def _copy_tree(src: Path, dst: Path, roots: list[Path]) -> list[Path]:
    copied = []
    for entry in sorted(src.iterdir()):
        if entry.is_symlink():
            target = entry.resolve()
            if target.is_dir():
                log.warning("not copying %s: it is a link to a folder (%s)", entry, target)
                continue
            if not any(root == target or root in target.parents for root in roots):
                log.warning("not copying %s: it is a link to %s, outside the model folder", entry, target)
                continue
        if entry.is_dir():
            if not _SKIPPED_DIRS.fullmatch(entry.name):
                (dst / entry.name).mkdir(exist_ok=True)
                copied += _copy_tree(entry, dst / entry.name, roots)
        elif entry.is_file() and not _WEIGHT_FILE.fullmatch(entry.name):
            shutil.copyfile(entry, dst / entry.name)
            copied.append(dst / entry.name)
    return copied


#: Bytes of each sample that the legacy (``sha256:``) fingerprint hashes per file.
_SAMPLE = 1 << 20
#: Bytes of each of the three samples :func:`folder_fingerprint` hashes per tensor.
_TENSOR_SAMPLE = 4096
#: The prefix of :func:`folder_fingerprint`'s values (the legacy per-file fingerprint's is ``sha256:``).
FINGERPRINT_PREFIX = "sha256-tensors:"


def _weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in (".safetensors", ".bin"))


def _safetensors_spans(path: Path) -> tuple[bytes, list[tuple[str, int, int]]] | None:
    """(the header's bytes, every tensor's (name, first byte, end byte) in the file), or None if it is no
    readable safetensors file (then the whole-file samples stand for it)."""
    import struct

    try:
        with open(path, "rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            if length > path.stat().st_size:
                return None
            header = fh.read(length)
        spans = []
        base = 8 + length
        for name, info in sorted(json.loads(header).items()):
            if name == "__metadata__":
                continue
            first, end = info["data_offsets"]
            spans.append((name, base + int(first), base + int(end)))
        return header, spans
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        return None


def _samples(fh, first: int, end: int, size: int) -> list[bytes]:
    starts = sorted({first, max(first, (first + end) // 2 - size // 2), max(first, end - size)})
    out = []
    for start in starts:
        fh.seek(start)
        out.append(fh.read(min(size, end - start)))
    return out


def folder_fingerprint(folder: str | os.PathLike) -> str:
    """A cheap fingerprint of a model folder's weights, to tell which model a Fisher or Gram belongs to: sha256
    over every weight file's name and size and, for a safetensors file, its header (every tensor's name, dtype,
    shape and place) and three 4 KB samples of *every tensor* (start, middle, end) — so a child that differs from
    its parent in a single tensor (a LoRA on a few projections, an added token row) has another fingerprint.
    A ``.bin`` file (not parsed: it is a pickle) stands by three 1 MB samples. About 12 KB per tensor are read."""
    import hashlib

    folder = Path(folder)
    h = hashlib.sha256()
    for path in _weight_files(folder):
        size = path.stat().st_size
        h.update(f"{path.name}|{size}\n".encode())
        parsed = _safetensors_spans(path) if path.suffix == ".safetensors" else None
        with open(path, "rb") as fh:
            if parsed is None:
                for sample in _samples(fh, 0, size, _SAMPLE):
                    h.update(sample)
                continue
            header, spans = parsed
            h.update(header)
            for name, first, end in spans:
                h.update(f"{name}|{first}|{end}\n".encode())
                for sample in _samples(fh, first, end, _TENSOR_SAMPLE):
                    h.update(sample)
    return FINGERPRINT_PREFIX + h.hexdigest()


def _legacy_fingerprint(folder: Path) -> str:
    """The per-file fingerprint that records written before the per-tensor one hold (``sha256:``): every weight
    file's name, size and three 1 MB samples."""
    import hashlib

    h = hashlib.sha256()
    for path in _weight_files(folder):
        size = path.stat().st_size
        h.update(f"{path.name}|{size}\n".encode())
        with open(path, "rb") as fh:
            for start in sorted({0, max(0, size // 2 - _SAMPLE // 2), max(0, size - _SAMPLE)}):
                fh.seek(start)
                h.update(fh.read(_SAMPLE))
    return "sha256:" + h.hexdigest()


def fingerprint_matches(folder: str | os.PathLike, recorded: str, cache: dict | None = None) -> bool:
    """Whether ``folder``'s weights are the ones a record's ``recorded`` fingerprint names, by the algorithm
    that wrote it (the per-tensor one, or the legacy per-file one of older records). ``cache`` (a dict) keeps
    computed fingerprints across calls."""
    folder = Path(folder)
    legacy = recorded.startswith("sha256:")
    key = (folder.resolve(), legacy)
    if cache is not None and key in cache:
        return cache[key] == recorded
    value = _legacy_fingerprint(folder) if legacy else folder_fingerprint(folder)
    if cache is not None:
        cache[key] = value
    return value == recorded
