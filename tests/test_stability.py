"""Stability: 100 merges in one process keep resident memory flat after warm-up, and a Fisher run killed in the
middle (while estimating, and while writing) and started again gives the uninterrupted run's bytes."""

from __future__ import annotations

import gc
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch

import gradmatch

from conftest import make_tiny_bert
from test_merge import _write_model
from test_reliability_kill import _wait_for, folder_bytes
from test_security import _env

MERGES = 100
WARMUP = 20
#: Allowed difference between the median RSS of the last 20 merges and of the 20 after warm-up. One leaked input
#: tensor per merge would add 60 × 1 MiB; the allocator's own noise here is a few MiB.
RSS_TOLERANCE = 8 * 2**20


def _big_family(root: Path) -> dict:
    """Tensors of 1 MiB (512×512 float32): a leak of one per merge shows as ~90 MiB."""
    g = torch.Generator().manual_seed(3)
    config = {"model_type": "toy", "architectures": ["ToyForSequenceClassification"]}
    names = ["a.weight", "b.weight", "c.weight"]
    parent = {k: torch.randn(512, 512, generator=g) for k in names}
    fam = {"parent": _write_model(root / "parent", parent, config, 1000),
           "parent_hessian": _write_model(root / "hp", {k: torch.rand(512, 512, generator=g) for k in names}, config),
           "children": [], "hessians": []}
    for t in range(2):
        fam["children"].append(_write_model(root / f"c{t}", {k: v + 0.1 * torch.randn(v.shape, generator=g)
                                                             for k, v in parent.items()}, config, 200, extra=False))
        fam["hessians"].append(_write_model(root / f"h{t}", {k: torch.rand(512, 512, generator=g) for k in names},
                                            config, extra=False))
    return fam


def test_100_merges_in_one_process_do_not_grow_memory(tmp_path):
    fam = _big_family(tmp_path / "fam")
    methods = [
        {"method": "gradient_matching", "base_hessian": str(fam["parent_hessian"]), "parameters": {"delta_0": 1e-8},
         "models": [{"model": str(c), "hessian": str(h), "weight": 0.7} for c, h in zip(fam["children"], fam["hessians"])]},
        {"method": "task_arithmetic", "models": [{"model": str(c), "weight": 0.5} for c in fam["children"]]},
        {"method": "ties", "models": [{"model": str(c), "weight": 1.0} for c in fam["children"]],
         "parameters": {"density": 0.3}},
    ]
    proc = psutil.Process()
    rss, first = [], {}
    for i in range(MERGES):
        config = dict(methods[i % len(methods)], base=str(fam["parent"]))
        out = gradmatch.merge(config, tmp_path / "out", progress=False)
        result = folder_bytes(out)
        key = config["method"]
        if key in first:
            assert result == first[key], f"merge {i} ({key}) differs from the first {key} merge"
        else:
            first[key] = result
        shutil.rmtree(out)
        del result
        gc.collect()
        rss.append(proc.memory_info().rss)
    early, late = statistics.median(rss[WARMUP:WARMUP + 20]), statistics.median(rss[-20:])
    peak = max(rss[WARMUP:]) - rss[WARMUP - 1]
    print(f"RSS median after warm-up {early / 2**20:.1f} MiB, over the last 20 merges {late / 2**20:.1f} MiB; "
          f"largest rise {peak / 2**20:.1f} MiB")
    assert late - early < RSS_TOLERANCE, [round(r / 2**20, 1) for r in rss]
    assert peak < 4 * RSS_TOLERANCE, [round(r / 2**20, 1) for r in rss]  # no merge holds its inputs afterwards


# --------------------------------------------------------------------------- Fisher killed and restarted


_PAUSED_FISHER = """
import sys, time
from pathlib import Path
import gradmatch.fisher as f
import gradmatch.fisher.run as fisher_run
marker, where = Path(sys.argv[1]), sys.argv[2]
if where == "estimating":
    add = f.FisherAccumulator.add
    def slow_add(self, batch):
        n = add(self, batch)
        marker.touch()
        time.sleep(60)
        return n
    f.FisherAccumulator.add = slow_add
else:
    write = fisher_run.write_hessian  # the name run_fisher calls
    def slow_write(*args, **kwargs):
        write(*args, **kwargs)
        marker.touch()
        time.sleep(60)
    fisher_run.write_hessian = slow_write
from gradmatch.cli import main
sys.exit(main(sys.argv[3:]))
"""


@pytest.mark.slow
def test_fisher_killed_and_restarted_gives_the_same_result(tmp_path):
    model = make_tiny_bert(tmp_path / "model", seed=4)
    data = tmp_path / "data"
    data.mkdir()
    texts = [f"review number {i}: " + " ".join(["good", "bad", "plot", "actor", "slow"][j % 5] for j in range(i % 7 + 1))
             for i in range(24)]
    (data / "train.jsonl").write_text("".join(json.dumps({"text": t, "label": i % 2}) + "\n" for i, t in enumerate(texts)))
    args = ["fisher", "--model", str(model), "--data", str(data), "--split", "train", "--batch-size", "4",
            "--seed", "3", "--quiet"]
    clean = subprocess.run([sys.executable, "-m", "gradmatch", *args, "--out", str(tmp_path / "clean")],
                           env=_env(), capture_output=True, text=True, timeout=300)
    assert clean.returncode == 0, clean.stderr
    out = tmp_path / "out"
    for where in ("estimating", "writing"):
        marker = tmp_path / f"paused-{where}"
        proc = subprocess.Popen([sys.executable, "-c", _PAUSED_FISHER, str(marker), where, *args, "--out", str(out)],
                                env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        assert _wait_for(marker.exists, proc, 240), proc.communicate()[1][-3000:]
        if where == "writing":  # the estimate is written, in the temporary folder only
            assert list(tmp_path.glob(".gradmatch-tmp-out-*/hessian/model.safetensors"))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert not out.exists(), where
    restarted = subprocess.run([sys.executable, "-m", "gradmatch", *args, "--out", str(out)], env=_env(),
                               capture_output=True, text=True, timeout=300)
    assert restarted.returncode == 0, restarted.stderr
    assert folder_bytes(out) == folder_bytes(tmp_path / "clean")  # weights, config and fisher.json, byte for byte
    meta = json.loads((out / "hessian" / "fisher.json").read_text())
    assert meta["num_examples"] == 24 and meta["seed"] == 3
