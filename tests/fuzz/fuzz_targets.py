"""What the fuzzers check: a reader given any bytes either succeeds consistently or raises UserError.

Shared by the bounded hypothesis tests (tests/test_fuzz.py) and the long fuzz runs
(tests/fuzz/fuzz_safetensors.py, tests/fuzz/fuzz_configs.py).
"""

from __future__ import annotations

import os
import random
from pathlib import Path

from gradmatch.errors import UserError

#: Files of the seed corpus, by reader.
CORPUS = Path(__file__).resolve().parent / "corpus"

#: Bytes of data a fuzzed safetensors file may make the reader allocate, at most (the files are small).
MAX_READ_BYTES = 1 << 20


def check_safetensors(data: bytes, folder: Path) -> str:
    """Write ``data`` as a model.safetensors and open it; returns 'ok' or 'rejected'.

    Accepted files must agree with the safetensors library tensor by tensor; anything else must be a
    UserError naming the file. Any other exception (a traceback for the user) fails the check.
    """
    import torch
    from safetensors.torch import load_file

    from gradmatch.checkpoints import Checkpoint, read_safetensors_header

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.safetensors"
    path.write_bytes(data)
    try:
        infos = read_safetensors_header(path)
    except UserError as exc:
        assert str(path) in str(exc), f"the message does not name the file: {exc}"
        return "rejected"
    total = sum(info.numel * info.dtype.itemsize for info in infos.values())
    assert total <= len(data), f"accepted tensors of {total} bytes from a file of {len(data)}"
    for info in infos.values():
        assert 0 <= info.offset and info.offset + info.numel * info.dtype.itemsize <= len(data)
    (folder / "config.json").write_text("{}")
    ckpt = Checkpoint(folder)
    reference = load_file(path)
    assert set(reference) == set(ckpt.tensors)
    for name, tensor in reference.items():
        got = ckpt.read(name)
        assert got.dtype == tensor.dtype and tuple(got.shape) == tuple(tensor.shape), name
        assert torch.equal(_raw(got), _raw(tensor)), name  # bytes, so NaN payloads compare too
        if got.ndim and got.shape[0] > 1:
            half = got.shape[0] // 2
            assert torch.equal(_raw(ckpt.read(name, slice(half, None))), _raw(tensor[half:])), name
    return "ok"


def _raw(tensor):
    return tensor.contiguous().reshape(-1).view(__import__("torch").uint8)


#: The config readers: (name, function of a path).
def _readers():
    from gradmatch.config.experiment import load_experiment
    from gradmatch.config.run import load_evaluate_config, load_train_config
    from gradmatch.merge import load_merge_config

    return {"merge": load_merge_config, "train": load_train_config, "evaluate": load_evaluate_config,
            "experiment": load_experiment}


def check_config(data: bytes, path: Path) -> dict[str, str]:
    """Write ``data`` to ``path`` (its suffix picks JSON or YAML) and give it to every config reader.

    Each reader must accept it or raise UserError with one line naming the file; returns reader → outcome.
    An accepted experiment must keep its run folder inside runs/ (names cannot climb out).
    """
    path.write_bytes(data)
    outcome = {}
    for name, reader in _readers().items():
        try:
            value = reader(path)
        except UserError as exc:
            message = " ".join(str(exc).split())
            assert str(path) in message or path.name in message, f"{name}: the message does not name the file: {message}"
            outcome[name] = "rejected"
            continue
        outcome[name] = "ok"
        if name == "experiment":
            from gradmatch.pipeline.runner import default_workdir

            runs = Path("runs").resolve()
            assert runs in (runs / default_workdir(value).relative_to("runs")).resolve().parents, value.name
            for spec in value.merges:
                assert "/" not in spec.label and spec.label not in (".", "..")
            for task in value.tasks:
                assert "/" not in task.name and task.name not in (".", "..")
    return outcome


# --------------------------------------------------------------------------- a small mutator for the long runs


_INTERESTING = [b"\x00", b"\xff", b"{", b"}", b"[", b"]", b'"', b":", b",", b"-1", b"1e400", b"NaN",
                b"18446744073709551615", b"9223372036854775807", b'"F32"', b'"BOOL"', b'"X9"', b"null",
                b'"data_offsets"', b'"shape"', b'"dtype"', b'"__metadata__"', b"[" * 64, b"\n", b": &a [*a]",
                b"!!python/object/apply:os.system", b"\xef\xbb\xbf", b"..", b"/", b"models:", b"- model: x"]


def mutate(data: bytes, rng: random.Random, corpus: list[bytes]) -> bytes:
    """One to four random edits: flip, insert, delete, overwrite with an interesting token, splice, fix length."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(7)
        pos = rng.randrange(len(buf) + 1)
        if op == 0 and buf:
            buf[min(pos, len(buf) - 1)] ^= 1 << rng.randrange(8)
        elif op == 1:
            buf[pos:pos] = rng.choice(_INTERESTING)
        elif op == 2 and buf:
            del buf[pos:pos + rng.randint(1, 16)]
        elif op == 3:
            token = rng.choice(_INTERESTING)
            buf[pos:pos + len(token)] = token
        elif op == 4 and corpus:
            other = rng.choice(corpus)
            cut = rng.randrange(len(other) + 1)
            buf = buf[:pos] + bytearray(other[cut:])
        elif op == 5 and len(buf) >= 8:
            # keep the safetensors length prefix consistent with a JSON header that changed size
            end = buf.find(b"}", 8)
            if end > 0:
                buf[:8] = (end - 7).to_bytes(8, "little")
        elif op == 6:
            buf[pos:pos] = os.urandom(rng.randint(1, 8)) if rng.random() < 0.5 else bytes(rng.randint(1, 8))
    return bytes(buf)


def run_fuzz(kind: str, iterations: int, seed: int, workdir: Path, report_every: int = 10_000) -> dict[str, int]:
    """Mutate the seed corpus of ``kind`` ('safetensors' or 'config') ``iterations`` times; fail on the first bug."""
    import logging

    logging.disable(logging.WARNING)  # the notes about ignored original keys
    rng = random.Random(seed)
    seeds = sorted((CORPUS / kind).iterdir())
    corpus = [p.read_bytes() for p in seeds]
    counts: dict[str, int] = {}
    for i in range(iterations):
        index = rng.randrange(len(corpus))
        data = mutate(corpus[index], rng, corpus)
        try:
            if kind == "safetensors":
                result = check_safetensors(data, workdir / "model")
            else:
                suffix = seeds[index].suffix if rng.random() < 0.8 else rng.choice([".json", ".yaml"])
                accepted = [k for k, v in check_config(data, workdir / f"config{suffix}").items() if v == "ok"]
                result = "accepted by " + "+".join(accepted) if accepted else "rejected by all"
        except BaseException:
            crash = Path.cwd() / f"crash-{kind}-{seed}-{i}.bin"
            crash.write_bytes(data)
            print(f"iteration {i}: failure; input saved to {crash}")
            raise
        counts[result] = counts.get(result, 0) + 1
        if report_every and (i + 1) % report_every == 0:
            print(f"{i + 1} iterations: {counts}", flush=True)
    return counts


def parse_args(description: str):
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--iterations", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None, help="scratch folder (default: a temporary one)")
    return parser.parse_args()


def main(kind: str, doc: str) -> None:
    """The command line of a long fuzz run of ``kind`` (``safetensors`` or ``config``)."""
    import tempfile
    import time

    args = parse_args(doc.splitlines()[0])
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="gradmatch-fuzz-") as tmp:
        workdir = Path(args.workdir) if args.workdir else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        counts = run_fuzz(kind, args.iterations, args.seed, workdir)
    print(f"{kind}: {args.iterations} iterations, seed {args.seed}, {time.time() - started:.0f} s, no failure: {counts}")


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit("run fuzz_safetensors.py or fuzz_configs.py")
