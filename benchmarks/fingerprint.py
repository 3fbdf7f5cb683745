"""What the weights fingerprint costs: the current scheme (every byte of every tensor, xxh3-128) against the
previous sampled one (three 4 KB samples per tensor, sha256), sha256 over every byte (the alternative weighed for
the current scheme), and reading every byte once (the floor). On SmolLM2-135M as gradmatch converts it (one 538 MB
float32 model.safetensors; alias ``smollm2``), or on a synthetic folder of ``--synthetic-mb`` MB where that is
absent. Warm: the file in the page cache; cold: evicted before each run (``posix_fadvise(DONTNEED)``). Best of
``--repeats``, one process, in a table.

    python benchmarks/fingerprint.py [--repeats 5] [--synthetic-mb 512]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from gradmatch.checkpoints import (
    _sampled_fingerprint,
    folder_fingerprint,
    read_safetensors_header,
)
from gradmatch.checkpoints import fingerprint as fp


def _model(synthetic_mb: int, workdir: Path) -> Path:
    try:
        from gradmatch.models import resolve_model

        return Path(resolve_model("smollm2"))
    except Exception as exc:  # noqa: BLE001 - the package is optional for this benchmark
        print(f"smollm2 unavailable ({exc}); a synthetic {synthetic_mb} MB folder instead", file=sys.stderr)
    folder = workdir / "synthetic"
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    rows = synthetic_mb * (1 << 20) // (4 * 1024 * 64)
    save_file({f"layers.{i}.weight": torch.randn(rows, 1024, generator=g) for i in range(64)},
              folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text('{"model_type": "toy"}')
    return folder


def _evict(files) -> None:
    os.sync()
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _read_all(path: Path, update=None) -> None:
    fd = os.open(path, os.O_RDONLY)
    buffer = memoryview(bytearray(8 << 20))
    offset = 0
    try:
        while True:
            n = os.preadv(fd, [buffer], offset)
            if not n:
                break
            if update is not None:
                update(buffer[:n])
            offset += n
    finally:
        os.close(fd)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--synthetic-mb", type=int, default=512)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = _model(args.synthetic_mb, Path(tmp))
        files = sorted(folder.glob("*.safetensors"))
        size = sum(f.stat().st_size for f in files)
        tensors = sum(len(read_safetensors_header(f)) for f in files)

        def current():
            fp._MEMO.clear()  # measure the work, not the memory of it
            folder_fingerprint(folder)

        contenders = {
            "xxh128-tensors (current: every byte)": current,
            "sha256-tensors (previous: 3 × 4 KB per tensor)": lambda: _sampled_fingerprint(folder),
            "sha256 of every byte (the alternative)": lambda: [_read_all(f, hashlib.sha256().update) for f in files],
            "reading every byte once (the floor)": lambda: [_read_all(f) for f in files],
        }
        print(f"{folder}: {size / 1e6:.0f} MB in {len(files)} file(s), {tensors} tensors; "
              f"best of {args.repeats}; load average {os.getloadavg()[0]:.2f}")
        print(f"| {'scheme':<48} | warm (s) | cold (s) | warm GB/s |")
        print(f"|{'-' * 50}|----------|----------|-----------|")
        for name, run in contenders.items():
            times = {}
            for cache in ("warm", "cold"):
                best = float("inf")
                for _ in range(args.repeats):
                    if cache == "cold":
                        _evict(files)
                    else:
                        [_read_all(f) for f in files]
                    start = time.perf_counter()
                    run()
                    best = min(best, time.perf_counter() - start)
                times[cache] = best
            print(f"| {name:<48} | {times['warm']:8.3f} | {times['cold']:8.3f} | {size / times['warm'] / 1e9:9.2f} |")


if __name__ == "__main__":
    main()
