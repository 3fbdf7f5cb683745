"""Benchmark of the causal-LM Fisher: tokens per second of gradmatch's exact per-sequence Fisher (empirical and
sampled) against a plain batched forward+backward of the summed log-likelihood (the ceiling) and the batch-size-1
loop, rounds interleaved; and the peak memory per process of `gradmatch fisher` alone against W processes of
`gradmatch fisher --shard` under torchrun, with the memory formula of docs/fisher.md beside it.

    python benchmarks/fisher_lm.py --model smollm2 --threads 1                      # SmolLM2-135M, real weights
    python benchmarks/fisher_lm.py --model synthetic-0.5b --threads 1 --memory      # + peak RSS, 1 vs 2 sharded
    python benchmarks/fisher_lm.py --device cuda --model synthetic-1.1b --length 512 --batch-sizes 16

The synthetic models (Llama shapes, random bf16 weights, SmolLM2's tokenizer) are generated once into
--workdir (default /tmp/gradmatch-bench-fisher-lm), never into the repository.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fisher import _peak_rss_mib, _sync  # benchmarks/fisher.py (MiniLM): the same timing and memory readings

#: Llama shapes for the synthetic models (vocabulary: SmolLM2's tokenizer, so that `gradmatch fisher` can read text).
SYNTHETIC = {
    "synthetic-0.5b": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                           num_key_value_heads=8),
    "synthetic-1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                           num_key_value_heads=4),  # TinyLlama-1.1B's shape
}


def model_folder(name: str, workdir: Path) -> Path:
    """The folder of ``name``: SmolLM2 from its package, or a synthetic model generated once into ``workdir``."""
    from gradmatch.models import resolve_model

    if name not in SYNTHETIC:
        return Path(resolve_model(name))
    folder = workdir / name
    if (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file():
        return folder
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2"))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=2048, tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **SYNTHETIC[name])
    print(f"generating {name} into {folder} (once)", file=sys.stderr, flush=True)
    with torch.device("cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    tmp = Path(tempfile.mkdtemp(dir=workdir))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, folder)
    return folder


def make_batches(n: int, batch_size: int, length: int, vocab: int, seed: int = 0):
    """Full-length random token batches: the compute of real length-``length`` text."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        ids = torch.randint(10, vocab, (b, length), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone(),
                    "index": torch.arange(start, start + b)})
    return out


def _method(name: str, model, kind, device: str):
    """``timed(batches) -> seconds`` for one method."""

    from gradmatch.fisher import FisherAccumulator, estimate_fisher_reference
    from gradmatch.fisher.estimators import Targets

    if name == "loop":  # the original's method: one sequence at a time, its whole gradient squared
        def work(batches):
            estimate_fisher_reference(model, batches, kind=kind, estimator="empirical")
    elif name.startswith("gradmatch"):
        acc = FisherAccumulator(model, kind=kind, estimator=name.split("-")[1], seed=0)

        def work(batches):
            with acc.attached():
                for b in batches:
                    acc.add(b)
    else:  # the ceiling: one batched forward and backward of the summed log-likelihood, no per-example work
        def work(batches):
            for b in batches:
                model.zero_grad(set_to_none=True)
                kind.log_likelihood(model, b, targets=Targets.DATA, seed=0, index=b["index"].tolist()).backward()
            model.zero_grad(set_to_none=True)

    def timed(batches):
        _sync(device)
        t0 = time.perf_counter()
        work(batches)
        _sync(device)
        return time.perf_counter() - t0

    return timed


def throughput(args, folder: Path) -> list[dict]:
    """Tokens per second of each (method, batch size), rounds interleaved, the best round of each."""
    import torch
    from transformers import AutoModelForCausalLM

    from gradmatch.kinds import kind_of_config

    model = AutoModelForCausalLM.from_pretrained(folder).to(args.device).eval()
    kind = kind_of_config(model.config)
    vocab = model.config.vocab_size
    plan = [("loop", 1, args.examples_loop)] + [(m, bs, args.examples) for bs in args.batch_sizes
                                                 for m in ("gradmatch-empirical", "gradmatch-sampled", "plain")]
    runs = []
    for method, bs, n in plan:
        batches = [{k: v.to(args.device) for k, v in b.items()} for b in make_batches(n, bs, args.length, vocab)]
        timed = _method(method, model, kind, args.device)
        timed(batches[:1])  # warm-up
        runs.append((method, bs, batches, timed, []))
    for r in range(args.rounds):
        for method, bs, batches, timed, times in runs:
            times.append(timed(batches))
        print(f"  round {r + 1}/{args.rounds}: " + ", ".join(
            f"{m}/{s} {sum(b['input_ids'].numel() for b in bb) / t[-1]:.0f} tok/s" for m, s, bb, _, t in runs),
            file=sys.stderr, flush=True)
    del model
    torch.cuda.empty_cache() if args.device.startswith("cuda") else None
    return [{"method": m, "batch_size": s, "tokens": sum(b["input_ids"].numel() for b in bb), "rounds": t,
             "tokens_per_s": sum(b["input_ids"].numel() for b in bb) / min(t)} for m, s, bb, _, t in runs]


# --------------------------------------------------------------------------- memory: whole processes


def child(report: str, argv: list[str]) -> int:
    """Run ``gradmatch ARGV`` (``baseline``: only import and load the tokenizer) and write this process's peak."""
    if argv[0] == "baseline":
        import gradmatch.fisher.sharded  # noqa: F401 - what a sharded run imports
        from gradmatch.models import load_processor
        load_processor(argv[1])
        status = 0
    else:
        from gradmatch.cli import main

        status = main(argv)
    rank = os.environ.get("RANK", "0")
    Path(f"{report}.{rank}").write_text(json.dumps({"peak_mib": _peak_rss_mib(), "status": status}))
    return status


def memory(args, folder: Path, workdir: Path) -> list[dict]:
    """Peak RSS per process of: the baseline (imports + tokenizer), one process, one with gradient checkpointing,
    and ``--processes`` processes sharded (the largest of its processes)."""
    data = workdir / "texts.jsonl"
    if not data.is_file():  # ~200 words each: every text fills --length tokens
        import random

        rng = random.Random(0)
        words = "the a film story plot actor scene good bad long short funny sad music light dark end start".split()
        data.write_text("".join(json.dumps({"text": " ".join(rng.choice(words) for _ in range(200))}) + "\n"
                                for _ in range(64)))
    common = ["fisher", "--model", str(folder), "--data", str(data), "--split", "train",
              "--max-examples", str(args.memory_examples), "--max-length", str(args.length), "--batch-size",
              str(args.memory_batch_size), "--estimator", "empirical", "--quiet", "--overwrite", "--device", args.device]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads or 1), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONWARNINGS="ignore")
    runs = [("baseline", 1, ["baseline", str(folder)]), ("one process", 1, [*common, "--out", str(workdir / "one")]),
            ("one process, --gradient-checkpointing", 1,
             [*common, "--gradient-checkpointing", "--out", str(workdir / "ckpt")]),
            (f"{args.processes} processes, --shard", args.processes,
             [*common, "--shard", "--out", str(workdir / "sharded")])]
    out = []
    for label, processes, argv in runs:
        report = workdir / f"rss-{len(out)}"
        launch = [sys.executable] if processes == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                          f"--nproc_per_node={processes}"]
        t0 = time.perf_counter()
        proc = subprocess.run([*launch, os.path.abspath(__file__), "--child", str(report), *argv], env=env,
                              capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr[-4000:])
            raise SystemExit(f"{label} failed with exit status {proc.returncode}")
        peaks = [json.loads(Path(f"{report}.{r}").read_text())["peak_mib"] for r in range(processes)]
        out.append({"run": label, "processes": processes, "peak_mib": max(peaks), "peaks_mib": peaks, "wall_s": wall})
        print(f"  {label}: peak {max(peaks):.0f} MiB per process ({wall:.0f} s)", file=sys.stderr, flush=True)
    return out


def predicted_mib(folder: Path, args, processes: int) -> dict:
    """docs/fisher.md's formula for the model, a process's peak above the baseline without activations: the weights
    and float32 sums (1/W of each sharded), and with --shard the units FSDP holds gathered (the root, two layers,
    the larger of an untied embedding and head) and the reduction buffers."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from gradmatch.fisher.accumulator import repeated_layers
    from gradmatch.fisher.sharded import ROW_BLOCK_ELEMENTS

    config = AutoConfig.from_pretrained(folder)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    model.tie_weights()
    b = {"bfloat16": 2, "float16": 2}.get(str(getattr(config, "dtype", "float32")).removeprefix("torch."), 4)
    params = {id(p): p.numel() for p in model.parameters()}
    total = sum(params.values())
    layers = repeated_layers(model)
    layer = max(sum(p.numel() for p in m.parameters()) for m in layers)
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    untied = outputs is not None and inputs.weight is not outputs.weight
    in_units = sum(p.numel() for m in layers for p in m.parameters())
    if untied:
        in_units += inputs.weight.numel() + outputs.weight.numel()
    root = total - in_units
    units = max(inputs.weight.numel(), outputs.weight.numel()) if untied else 0
    small = max((n for n in params.values() if n < ROW_BLOCK_ELEMENTS), default=0)
    large = max((n for n in params.values() if n >= ROW_BLOCK_ELEMENTS), default=0)
    mib = 2 ** 20
    if processes == 1:
        return {"weights": total * b / mib, "sums": total * 4 / mib}
    return {"weights": total * b / processes / mib, "sums": total * 4 / processes / mib,
            "gathered": (root + 2 * layer + units) * b / mib, "buffers": 4 * (small + large / processes) / mib}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return child(argv[1], argv[2:])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2", help="smollm2, " + ", ".join(SYNTHETIC) + ", or a folder")
    p.add_argument("--device", default="cpu")
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[8])
    p.add_argument("--examples", type=int, default=16, help="sequences per round for each batched method")
    p.add_argument("--examples-loop", type=int, default=4, help="sequences per round for the batch-size-1 loop")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds, methods interleaved; the best counts")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--memory", action="store_true", help="also measure peak RSS per process, 1 vs --processes sharded")
    p.add_argument("--no-throughput", action="store_true", help="only the memory runs")
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--memory-examples", type=int, default=4)
    p.add_argument("--memory-batch-size", type=int, default=2)
    p.add_argument("--workdir", default="/tmp/gradmatch-bench-fisher-lm")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    folder = model_folder(args.model, workdir) if args.model in SYNTHETIC or not Path(args.model).is_dir() \
        else Path(args.model)
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or platform.machine()
    load = os.getloadavg()[0]
    result: dict = {"model": args.model, "device": args.device, "device_name": dev, "threads": torch.get_num_threads(),
                    "length": args.length, "load_at_start": load}
    if not args.no_throughput:
        runs = throughput(args, folder)
        result["throughput"] = runs
        loop = runs[0]["tokens_per_s"]
        plain = {r["batch_size"]: r["tokens_per_s"] for r in runs if r["method"] == "plain"}
        print(f"{args.model}, length {args.length}, {args.device} ({dev}, {torch.get_num_threads()} threads, "
              f"load {load:.2f} at start)")
        print("| method | batch | tokens/s | × batch-size-1 loop | × plain fwd+bwd |")
        print("|---|---:|---:|---:|---:|")
        for r in runs:
            ceiling = plain.get(r["batch_size"])
            ratio = f"{r['tokens_per_s'] / ceiling:.2f}" if r["method"] != "loop" else "–"
            print(f"| {r['method']} | {r['batch_size']} | {r['tokens_per_s']:.0f} | {r['tokens_per_s'] / loop:.2f} "
                  f"| {ratio} |")
    if args.memory:
        runs = memory(args, folder, workdir)
        result["memory"] = runs
        base = runs[0]["peak_mib"]
        print(f"\npeak RSS per process, {args.memory_examples} sequences of {args.length} tokens, batch "
              f"{args.memory_batch_size}")
        print("| run | peak MiB per process | above the baseline | predicted above it (no activations) | × one process |")
        print("|---|---:|---:|---:|---:|")
        single = runs[1]["peak_mib"]
        for r in runs:
            pred = sum(predicted_mib(folder, args, r["processes"]).values()) if r["run"] != "baseline" else 0.0
            print(f"| {r['run']} | {r['peak_mib']:.0f} | {r['peak_mib'] - base:.0f} | {pred:.0f} | "
                  f"{r['peak_mib'] / single:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
