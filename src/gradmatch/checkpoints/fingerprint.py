"""Which weights a folder holds: the fingerprint that Hessian, Gram and merge records carry, and the check of a
recorded one by the scheme that wrote it."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import time
from collections.abc import Iterable
from pathlib import Path

import torch
import xxhash

from gradmatch.checkpoints.reading import (
    BIN_INDEX,
    SAFE_INDEX,
    SAFETENSORS_DTYPES,
    _load_bin,
    _read_bytes,
    _read_index,
    read_safetensors_header,
    weight_layouts,
)

#: The prefix of :func:`folder_fingerprint`'s values: xxh3-128 over every tensor's name, dtype, shape and bytes.
FINGERPRINT_PREFIX = "xxh128-tensors:"

#: The prefixes of the schemes older records hold, each checked by its own algorithm (:func:`fingerprint_by`):
#: every weight-named file's header and three 4 KB samples of each tensor (``sha256-tensors:``, the scheme before
#: this one), and three 1 MB samples of each weight-named file (``sha256:``, the one before that).
SAMPLED_PREFIX = "sha256-tensors:"
LEGACY_PREFIX = "sha256:"

#: Bytes of each sample that the legacy (``sha256:``) fingerprint hashes per file.
_SAMPLE = 1 << 20

#: Bytes of each of the three samples the ``sha256-tensors:`` fingerprint hashes per tensor.
_TENSOR_SAMPLE = 4096

#: Bytes read at a time while hashing a tensor's content.
_CHUNK = 8 << 20

#: A peft adapter's weight files: the tensors of an adapter folder, which has no model layout.
_ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")

#: Fingerprints computed in this process, keyed by the identity and state of every file read (see _state).
_MEMO: dict[tuple, str] = {}
_MEMO_SIZE = 256
#: How long ago a file must have last changed for its fingerprint to be remembered (see _state).
_SETTLED_NS = 2_000_000_000


def _layout_files(folder: Path) -> tuple[list[Path], list[tuple[Path, set[str] | None]]]:
    """The files a merge reads from ``folder`` — the layout transformers loads, as checkpoints.weight_layout
    chooses it (an adapter folder: its adapter weights) — and of these the weight files, each with the names it
    contributes (None: all it holds; a shard: the names the index places in it)."""
    layouts = weight_layouts(folder)
    if not layouts:
        adapter = [folder / name for name in _ADAPTER_WEIGHTS if (folder / name).is_file()][:1]
        return adapter, [(path, None) for path in adapter]
    layout = folder / layouts[0]
    if layouts[0] not in (SAFE_INDEX, BIN_INDEX):
        return [layout], [(layout, None)]
    shards: dict[str, set[str]] = {}
    for name, shard in _read_index(layout).items():
        shards.setdefault(shard, set()).add(name)
    weights = [(folder / shard, names) for shard, names in sorted(shards.items())]
    return [layout] + [path for path, _ in weights], weights


def _state(paths: Iterable[Path]) -> tuple[tuple, bool]:
    """The identity and state of each file (device, inode, size, modification and change times): a file written
    again, replaced or touched has another (ctime cannot be set back); and whether every file is settled, its last
    change older than :data:`_SETTLED_NS` — file times advance in ticks of a few ms, so a file written twice within
    one tick keeps its times, and only settled files are remembered (git's "racily clean" entries, the same way)."""
    out, settled, now = [], True, time.time_ns()
    for path in paths:
        st = path.stat()
        out.append((str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
        settled = settled and now - max(st.st_mtime_ns, st.st_ctime_ns) > _SETTLED_NS
    return tuple(out), settled


_CODES = {torch_dtype: code for code, (_, torch_dtype) in SAFETENSORS_DTYPES.items()}


def _dtype_code(dtype) -> str:
    return _CODES.get(dtype, str(dtype).removeprefix("torch."))


def _tensor_digest(name: str, dtype, shape, chunks: Iterable) -> bytes:
    h = xxhash.xxh3_128()
    h.update(json.dumps([name, _dtype_code(dtype), list(shape)]).encode())
    for chunk in chunks:
        h.update(chunk)
    return h.digest()


def _file_chunks(fd: int, path: Path, first: int, nbytes: int, buffer: memoryview):
    end = first + nbytes
    while first < end:
        view = buffer[: min(len(buffer), end - first)]
        _read_bytes(fd, path, first, view)
        yield view
        first += len(view)


def _tensor_bytes(tensor):
    """A tensor's bytes as safetensors stores them (C order; little-endian, as torch holds them here)."""
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()


def folder_fingerprint(folder: str | os.PathLike) -> str:
    """The fingerprint of the weights a merge reads from ``folder``, to tell which model a Fisher or Gram belongs
    to: xxh3-128 over the tensors of the layout transformers loads (``model.safetensors``, its index,
    ``pytorch_model.bin``, its index: checkpoints.weight_layout), in the order of their names — each tensor's name,
    dtype, shape and every byte. The same tensors give the same fingerprint whatever their order in the files, their
    sharding, their file format and the other files in the folder (``training_args.bin``, a stale second layout);
    any other value of any entry gives another. It reads every tensor once (about the time of reading the files:
    docs/merge.md); a folder whose files have not changed since is not read again in the same process."""
    folder = Path(folder)
    read, weights = _layout_files(folder)
    state, settled = _state(read)
    key = (str(folder.resolve()), state)
    if key in _MEMO:
        return _MEMO[key]
    digests: dict[str, bytes] = {}
    buffer = memoryview(bytearray(_CHUNK))
    for path, names in weights:
        if path.suffix == ".safetensors":
            tensors = read_safetensors_header(path)
            fd = os.open(path, os.O_RDONLY)
            try:
                for info in tensors.values():  # in file order: the reads are sequential
                    if names is None or info.name in names:
                        nbytes = info.numel * info.dtype.itemsize
                        digests[info.name] = _tensor_digest(info.name, info.dtype, info.shape,
                                                            _file_chunks(fd, path, info.offset, nbytes, buffer))
            finally:
                os.close(fd)
        else:
            for name, tensor in _load_bin(path).items():
                if names is None or name in names:
                    digests[name] = _tensor_digest(name, tensor.dtype, tuple(tensor.shape), [_tensor_bytes(tensor)])
    h = xxhash.xxh3_128()
    for name in sorted(digests):
        h.update(digests[name])
    value = FINGERPRINT_PREFIX + h.hexdigest()
    if settled:
        if len(_MEMO) >= _MEMO_SIZE:
            _MEMO.pop(next(iter(_MEMO)))
        _MEMO[key] = value
    return value


def _weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in (".safetensors", ".bin"))


def _safetensors_spans(path: Path) -> tuple[bytes, list[tuple[str, int, int]]] | None:
    """(the header's bytes, every tensor's (name, first byte, end byte) in the file), or None if it is no
    readable safetensors file (then the whole-file samples stand for it)."""
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


def _sampled_fingerprint(folder: Path) -> str:
    """The fingerprint records held before this one (``sha256-tensors:``), kept to check them: sha256 over every
    weight-named file's name and size and, for a safetensors file, its header and three 4 KB samples of every
    tensor; a ``.bin`` file by three 1 MB samples. (It changes when identical tensors are saved in another order or
    sharding, or an unread ``.bin`` is added, and misses a change of a few rows: hence the scheme above.)"""
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
    return SAMPLED_PREFIX + h.hexdigest()


def _legacy_fingerprint(folder: Path) -> str:
    """The per-file fingerprint that records written before the per-tensor one hold (``sha256:``): every weight
    file's name, size and three 1 MB samples."""
    folder = Path(folder)
    h = hashlib.sha256()
    for path in _weight_files(folder):
        size = path.stat().st_size
        h.update(f"{path.name}|{size}\n".encode())
        with open(path, "rb") as fh:
            for sample in _samples(fh, 0, size, _SAMPLE):
                h.update(sample)
    return LEGACY_PREFIX + h.hexdigest()


def fingerprint_by(folder: str | os.PathLike, recorded: str) -> str:
    """``folder``'s fingerprint by the scheme that wrote ``recorded`` (its prefix): the current one, or the sampled
    ones of older records."""
    folder = Path(folder)
    if recorded.startswith(SAMPLED_PREFIX):
        return _sampled_fingerprint(folder)
    if recorded.startswith(LEGACY_PREFIX):
        return _legacy_fingerprint(folder)
    return folder_fingerprint(folder)


def fingerprint_matches(folder: str | os.PathLike, recorded: str, cache: dict | None = None) -> bool:
    """Whether ``folder``'s weights are the ones a record's ``recorded`` fingerprint names, by the algorithm
    that wrote it (:func:`fingerprint_by`). ``cache`` (a dict) keeps computed fingerprints across calls."""
    folder = Path(folder)
    scheme = recorded.split(":", 1)[0]
    key = (folder.resolve(), scheme)
    if cache is not None and key in cache:
        return cache[key] == recorded
    value = fingerprint_by(folder, recorded)
    if cache is not None:
        cache[key] = value
    return value == recorded
