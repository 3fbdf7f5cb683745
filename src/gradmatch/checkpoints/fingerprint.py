"""Which weights a folder holds, cheaply: the fingerprint that Hessian, Gram and merge records carry."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

log = logging.getLogger("gradmatch.checkpoints")


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
            for sample in _samples(fh, 0, size, _SAMPLE):
                h.update(sample)
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
