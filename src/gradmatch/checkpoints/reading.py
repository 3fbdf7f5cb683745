"""Reading Hugging Face model folders tensor by tensor: weight layouts, validated safetensors headers, shard
indexes and .bin files, lazy checkpoints, renamed views and constant tensors."""

from __future__ import annotations

import json
import logging
import math
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from gradmatch.errors import UserError

log = logging.getLogger("gradmatch.checkpoints")

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


def weight_layouts(folder: Path) -> list[str]:
    """Every weight file (or index) of a Hugging Face folder, in transformers' order of preference (the first is
    the one :func:`weight_layout` reads)."""
    return [name for name in WEIGHT_LAYOUTS if (Path(folder) / name).is_file()]


def weight_layout(folder: Path) -> str | None:
    """The weight file (or index) of a Hugging Face folder, or None when it has none: of several, the one
    transformers' ``from_pretrained`` loads (``model.safetensors``, then its index, then ``pytorch_model.bin``,
    then its index), so that a merge reads the tensors that fisher, evaluate and train load."""
    found = weight_layouts(folder)
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
        if (self.folder / "adapter_config.json").is_file():  # transformers loads the weights with the adapter on
            adapter = sorted(p.name for p in self.folder.glob("adapter_model.*"))
            raise UserError(f"{role} {self.folder} holds a full model ({layout}) and a LoRA/PEFT adapter "
                            f"(adapter_config.json{''.join(', ' + name for name in adapter)}): transformers loads "
                            f"the weights with the adapter attached, a merge would read {layout} without it; fold "
                            "the adapter in (peft's merge_and_unload, then save_pretrained in a folder of its own), "
                            f"or move the adapter's files out of {self.folder} to merge the weights alone")
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
