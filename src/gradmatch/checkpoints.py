"""Hugging Face model folders, tensor by tensor: validated lazy reading (safetensors, sharded, .bin)
and sharded safetensors writing with an index, plus copying a folder's non-weight files."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from gradmatch.errors import UserError

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_WEIGHTS = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
#: Where a Hessian folder keeps its weights, in the order looked for.
WEIGHT_LAYOUTS = (SAFE_INDEX, SAFE_WEIGHTS, BIN_INDEX, BIN_WEIGHTS)

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
    """The weight file (or index) of a Hugging Face folder, or None when it has none."""
    for name in WEIGHT_LAYOUTS:
        if (folder / name).is_file():
            return name
    return None


class Checkpoint:
    """The tensors of one Hugging Face folder, read one tensor (or one block of rows) at a time.

    Opening validates every weight file's header and the shard index; nothing stays open or mapped
    between reads, so reading many checkpoints keeps only the tensors asked for in memory.
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

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def info(self, name: str) -> TensorInfo:
        return self.tensors[name]

    def read(self, name: str, rows: slice | None = None) -> torch.Tensor:
        """Tensor ``name`` (only rows ``rows`` of its first dimension, if given), in its stored dtype."""
        info = self.tensors[name]
        if info.offset is None:  # .bin: memory-mapped; keep only the tensor being read (its blocks share one load)
            if self._bin_tensor is None or self._bin_tensor[0] != name:
                self._bin_tensor = None  # unmap the previous file before mapping the next
                self._bin_tensor = (name, _load_bin(info.file)[name])
            tensor = self._bin_tensor[1]
            return (tensor if rows is None else tensor[rows]).clone()
        shape, offset = info.shape, info.offset
        if rows is not None:
            start, stop, _ = rows.indices(shape[0])
            row_bytes = math.prod(shape[1:]) * info.dtype.itemsize
            shape, offset = (max(0, stop - start), *shape[1:]), offset + start * row_bytes
        tensor = torch.empty(shape, dtype=info.dtype)
        _read_exactly(info.file, offset, tensor)
        return tensor


def _read_exactly(path: Path, offset: int, tensor: torch.Tensor) -> None:
    """Fill ``tensor`` with the bytes of ``path`` from ``offset`` (safetensors data is little-endian, C order).

    One plain read into the tensor's memory, at offsets validated by :func:`read_safetensors_header`:
    unlike a memory map (safe_open), nothing stays mapped, so resident memory holds only the tensors
    asked for, and there are no per-page faults (which made a MiniLM merge 4-6x slower here).
    """
    buffer = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
    try:
        with open(path, "rb", buffering=0) as fh:
            fh.seek(offset)
            done = 0
            while done < len(buffer):
                got = fh.readinto(buffer[done:])
                if not got:
                    raise UserError(f"{path} ended early while reading (was it truncated after it was opened?)")
                done += got
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from exc


def find_hessian_folder(path: str | os.PathLike) -> Path:
    """A Hessian as written by `gradmatch fisher` or the original code: ``<out>/hessian`` if present, else ``<out>``."""
    path = Path(path)
    inner = path / "hessian"
    if inner.is_dir() and weight_layout(inner) is not None:
        return inner
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


class ShardedWriter:
    """Write tensors in the order given into safetensors shards of at most ``max_shard_bytes`` each.

    A tensor larger than the limit gets a shard of its own. ``finish`` names the shards as
    transformers does: ``model.safetensors`` when there is one, else ``model-00001-of-0000N.safetensors``
    and ``model.safetensors.index.json``. Only the current shard is held in memory.
    """

    def __init__(self, folder: str | os.PathLike, max_shard_bytes: int):
        self.folder = Path(folder)
        self.max_shard_bytes = max_shard_bytes
        self._current: dict[str, torch.Tensor] = {}
        self._current_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self._current and self._current_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._current[name] = tensor.detach().to("cpu").contiguous()
        self._current_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        path = self.folder / f".shard-{len(self._shards):05d}.safetensors"
        save_file(self._current, str(path), metadata={"format": "pt"})
        os.chmod(path, 0o644)
        self._shards.append((path, list(self._current)))
        self._current, self._current_bytes = {}, 0

    def finish(self) -> list[Path]:
        """Write the last shard, give the shards their final names, write the index; return the files."""
        if self._current or not self._shards:
            self._flush()
        if len(self._shards) == 1:
            final = self.folder / SAFE_WEIGHTS
            os.replace(self._shards[0][0], final)
            return [final]
        n = len(self._shards)
        weight_map: dict[str, str] = {}
        files = []
        for i, (path, names) in enumerate(self._shards, start=1):
            final = self.folder / f"model-{i:05d}-of-{n:05d}.safetensors"
            os.replace(path, final)
            files.append(final)
            weight_map.update((name, final.name) for name in names)
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.folder / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        return files + [self.folder / SAFE_INDEX]


#: Files and folders of a model folder that are weights or training artefacts, never copied to a merge.
_WEIGHT_FILE = re.compile(
    r"(.*\.safetensors|.*\.safetensors\.index\.json|pytorch_model.*\.bin|.*\.bin\.index\.json|tf_model.*\.h5"
    r"|flax_model.*\.msgpack|model\.ckpt.*|training_metadata\.json|fisher\.json|merge\.json|\.gradmatch-.*"
    r"|.*\.pt|.*\.pth|training_args\.bin|trainer_state\.json|adapter_model\..*)"
)
_SKIPPED_DIRS = re.compile(r"(hessian|checkpoint-.*|runs|\..*)")


def copy_non_weight_files(src: str | os.PathLike, dst: str | os.PathLike) -> list[Path]:
    """Copy every file of model folder ``src`` except weights byte for byte into ``dst`` (config,
    tokenizer, image processor, generation config, sentence-transformers modules ...)."""
    src, dst = Path(src), Path(dst)
    copied = []
    for entry in sorted(src.iterdir()):
        if entry.is_dir():
            if not _SKIPPED_DIRS.fullmatch(entry.name):
                (dst / entry.name).mkdir(exist_ok=True)
                copied += copy_non_weight_files(entry, dst / entry.name)
        elif entry.is_file() and not _WEIGHT_FILE.fullmatch(entry.name):
            shutil.copyfile(entry, dst / entry.name)
            copied.append(dst / entry.name)
    return copied
