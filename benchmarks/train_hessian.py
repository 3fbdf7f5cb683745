"""What a Hessian from training costs: `gradmatch train` of a demo child (the built-in ViT on a digits domain) with
and without `save_hessian: adam` in paired, interleaved rounds; IVON against AdamW per step; and the Fisher pass
that either saves (`gradmatch fisher` on the child's training data, as the demo runs it) as a fraction of
training time.

    python benchmarks/train_hessian.py                 # 5 paired rounds, 3 epochs, 1 torch thread
    python benchmarks/train_hessian.py --rounds 7 --epochs 5 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path


def _train(work: Path, name: str, args, **extra) -> tuple[float, Path]:
    from gradmatch.train import train

    out = work / name
    config = {"model_name_or_path": "vit-digits", "dataset_name": "digits-rot90", "dataset_train_split": "train[150:]",
              "output_dir": str(out), "per_device_train_batch_size": 32, "learning_rate": 1e-3,
              "num_train_epochs": args.epochs, "logging_strategy": "no", "seed": 0, "overwrite_output_dir": True,
              **extra}
    start = time.perf_counter()
    train(config, quiet=True)
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--epochs", type=float, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--fisher-examples", type=int, default=600, help="the demo's fisher.max_examples")
    parser.add_argument("--json", help="write the raw timings here")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    from gradmatch.fisher import run_fisher

    try:
        import ivon  # noqa: F401
        have_ivon = True
    except ImportError:
        have_ivon = False

    rows: dict[str, list[float]] = {"adamw": [], "adamw + save_hessian": [], "ivon + save_hessian": [], "fisher": []}
    with tempfile.TemporaryDirectory(prefix="gradmatch-bench-") as tmp:
        work = Path(tmp)
        _train(work, "warmup", args)  # imports, dataset caches
        for r in range(args.rounds):
            order = [("adamw", {}), ("adamw + save_hessian", {"save_hessian": "adam"})]
            if r % 2:  # alternate which goes first
                order.reverse()
            for label, extra in order:
                seconds, out = _train(work, f"{label.replace(' ', '')}-{r}", args, **extra)
                rows[label].append(seconds)
            if have_ivon:
                seconds, _ = _train(work, f"ivon-{r}", args, optimizer_name="IVON", save_hessian="ivon",
                                    learning_rate=0.1)
                rows["ivon + save_hessian"].append(seconds)
            start = time.perf_counter()
            run_fisher(str(out), "digits-rot90", "train[150:]", out=work / f"fisher-{r}", estimator="sampled",
                       batch_size=64, max_examples=args.fisher_examples, progress=False, overwrite=True)
            rows["fisher"].append(time.perf_counter() - start)

    base = statistics.median(rows["adamw"])
    paired = [b / a for a, b in zip(rows["adamw"], rows["adamw + save_hessian"])]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads "
          f"{args.threads}; {args.rounds} paired rounds, {args.epochs:g} epochs of a demo child (ViT, digits-rot90 "
          "train[150:], batch 32)\n")
    print("| run | median s | min s | max s | vs AdamW training |")
    print("|---|---|---|---|---|")
    for label, values in rows.items():
        if not values:
            continue
        print(f"| {label} | {statistics.median(values):.2f} | {min(values):.2f} | {max(values):.2f} | "
              f"{statistics.median(values) / base:.3f}× |")
    print(f"\nsave_hessian: adam / plain AdamW, paired by round: median {statistics.median(paired):.3f}× "
          f"(min {min(paired):.3f}, max {max(paired):.3f})")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "paired": paired}, indent=2))


if __name__ == "__main__":
    main()
