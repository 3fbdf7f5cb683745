"""What the weights fingerprint costs: the current scheme (every byte of every tensor, xxh3-128) against the
previous sampled one (three 4 KB samples per tensor, sha256), sha256 over every byte (the alternative weighed for
the current scheme), and reading every byte once (the floor). On SmolLM2-135M as gradmatch converts it (one 538 MB
float32 model.safetensors; alias ``smollm2``), or on a synthetic folder of ``--synthetic-mb`` MB where that is
absent. Warm: the file in the page cache; cold: evicted before each run (``posix_fadvise(DONTNEED)``). Best of
``--repeats``, one process, in a table. ``--merge`` also times a gradient-matching merge of the model with one
child (parent + noise) and random Hessians (4 inputs; ``--kernel reference``; inputs warm), alternating the current
fingerprint with the previous sampled one in merge.json's records (1.6 GB of inputs written to a temporary folder).

    python benchmarks/fingerprint.py [--repeats 5] [--synthetic-mb 512] [--merge]
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
from safetensors.torch import load_file, save_file

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


def _merge_cost(folder: Path, workdir: Path, repeats: int) -> None:
    """Best wall and CPU time of a gradient-matching merge of ``folder`` with one child, fingerprinting its inputs by
    the current scheme and by the previous sampled one (merge.json records the fingerprint of every input)."""
    import shutil

    from gradmatch import checkpoints
    from gradmatch.merge import merge

    g = torch.Generator().manual_seed(0)
    tensors = {}
    for f in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(f))
    child = workdir / "child"
    child.mkdir()
    shutil.copy(folder / "config.json", child / "config.json")
    save_file({k: v + 0.001 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
               for k, v in tensors.items()}, child / "model.safetensors", metadata={"format": "pt"})
    for name in ("h0", "h1"):
        (workdir / name).mkdir()
        shutil.copy(folder / "config.json", workdir / name / "config.json")
        save_file({k: torch.rand(v.shape, generator=g) for k, v in tensors.items() if v.is_floating_point()},
                  workdir / name / "model.safetensors", metadata={"format": "pt"})
    del tensors
    config = {"method": "gradient_matching", "base": str(folder), "base_hessian": str(workdir / "h0"),
              "base_hessian_scale": 1000,
              "models": [{"model": str(child), "hessian": str(workdir / "h1"), "hessian_scale": 100}]}
    current = checkpoints.folder_fingerprint
    times: dict[str, list[tuple[float, float]]] = {"xxh128-tensors": [], "sha256-tensors": []}
    for i in range(repeats):
        order = list(times) if i % 2 == 0 else list(times)[::-1]
        for scheme in order:
            fp._MEMO.clear()
            checkpoints.folder_fingerprint = current if scheme == "xxh128-tensors" else _sampled_fingerprint
            shutil.rmtree(workdir / "out", ignore_errors=True)
            start, cpu = time.perf_counter(), time.process_time()
            try:
                merge(config, workdir / "out", progress=False, kernel="reference")
            finally:
                checkpoints.folder_fingerprint = current
            times[scheme].append((time.perf_counter() - start, time.process_time() - cpu))
    print(f"\ngradient-matching merge, one child (4 inputs), best of {repeats}:")
    print("| fingerprint in merge.json | wall (s) | CPU (s) |\n|---|---|---|")
    for scheme, runs in times.items():
        print(f"| {scheme} | {min(w for w, _ in runs):.2f} | {min(c for _, c in runs):.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--synthetic-mb", type=int, default=512)
    parser.add_argument("--merge", action="store_true", help="also time a merge with each scheme")
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
        if args.merge:
            _merge_cost(folder, Path(tmp), args.repeats)


if __name__ == "__main__":
    main()
