"""Does IVON's Hessian, after a short fine-tune, measure the data's curvature? The demo's setting (a tiny ViT on
sklearn digits: the demo's parent, one child fine-tuned on a rotated-digits domain), IVON children with several
(beta2, hess_init, learning_rate) against the AdamW child the demo trains: for each, the mean of IVON's Hessian,
how far it moved from hess_init, its log-scale correlation (per tensor and over all entries) with the sampled
Fisher of the same trained model (`gradmatch.fisher.estimate_fisher`, the estimate a merge would otherwise use),
their scale ratio, and the child's accuracy on its domain.

    python benchmarks/ivon_hessian.py                            # the default grid, child rot90, seed 0
    python benchmarks/ivon_hessian.py --child shift --settings 0.99:1e-2:0.1 0.999:1e-3:0.2
    python benchmarks/ivon_hessian.py --merge            # gradient matching of all four children, per setting

A setting is beta2:hess_init:learning_rate[:ess as a multiple of N]. With --merge, each setting (and AdamW) also
fine-tunes all four children and merges them by gradient matching (N_0 = the parent's examples, N_t = 1050,
δ = 1e-12, the same α for every child) with the children's IVON Hessians, with the sampled Fishers of the same
children, and by task arithmetic; the table is the average accuracy over the five domains.

The parent (the demo's: original digits plus 150 of each other domain, 12 epochs) is trained once and kept in
--workdir.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import time
from pathlib import Path

#: The demo's shared training block (src/gradmatch/experiments/demo.yaml) and its parent's overrides.
DEMO_TRAINING = dict(per_device_train_batch_size=32, learning_rate=1e-3, num_train_epochs=3, lr_scheduler="linear",
                     weight_decay=0.0, logging_strategy="no")
DEMO_PARENT = dict(num_train_epochs=12, learning_rate=2e-3, warmup_steps=20)
DOMAINS = ("rot90", "inverted", "hflip", "shift")
#: beta2:hess_init:learning_rate[:ess/N]: ivon-opt's defaults (β2, h0) first, then the config's first defaults
#: (h0 1e-3, β2 0.999), then faster Hessian EMAs at ess = N, and ess ≫ N (a colder posterior: smaller noise).
DEFAULT_GRID = ["0.99999:1:1", "0.999:1e-3:0.3", "0.999:1:0.3", "0.99:1:0.3", "0.99:1:0.1", "0.97:1:0.3",
                "0.95:1e-2:0.3", "0.9:1:0.3", "0.95:0.1:0.3:100", "0.9:0.1:0.3:100", "0.95:1:0.3:1000",
                "0.9:1:0.3:1000", "0.9:1:0.1:1000"]
#: The settings `--merge` with no settings merges (beside AdamW).
DEFAULT_MERGE = ["0.99:1:0.3", "0.99:1:0.1", "0.95:0.1:0.3:100", "0.9:1:0.1:1000"]


def parse_setting(text: str) -> tuple[float, float, float, float]:
    """beta2:hess_init:learning_rate[:ess as a multiple of N]."""
    values = [float(x) for x in text.split(":")]
    return tuple(values) if len(values) == 4 else (*values, 1.0)


def train_parent(workdir: Path, seed: int) -> Path:
    import datasets

    from gradmatch.data import load_split, save_split
    from gradmatch.train import train

    out = workdir / f"parent-{seed}"
    if (out / "model.safetensors").is_file():
        return out
    data = workdir / f"parent-data-{seed}"
    if not data.exists():
        parts = [load_split("digits-original", "train")]
        parts += [load_split(f"digits-{d}", "train[:150]") for d in DOMAINS]
        save_split(datasets.concatenate_datasets(parts), data)
    train({**DEMO_TRAINING, **DEMO_PARENT, "model_name_or_path": "vit-digits", "dataset_name": str(data),
           "output_dir": str(out), "seed": seed}, overwrite=True, quiet=True)
    return out


def encoded_split(model_dir: Path, dataset: str, split: str):
    from gradmatch.data import load_split
    from gradmatch.models import kind_of, load_model

    kind = kind_of(str(model_dir), None)
    _, processor = load_model(str(model_dir), kind=kind)
    return kind, processor, kind.encode(load_split(dataset, split), processor, 384)


def accuracy(model, kind, processor, encoded) -> float:
    import torch

    from gradmatch.statistics import batches

    model.eval()
    right = 0
    with torch.no_grad():
        for batch in batches(encoded, kind.collator(processor), list(range(len(encoded))), 256):
            batch.pop("index", None)
            labels = batch.pop("labels")
            right += int((model(**batch).logits.argmax(-1) == labels).sum())
    return right / len(encoded)


def sampled_fisher(model, kind, processor, encoded, n: int = 600, batch_size: int = 64) -> dict:
    from gradmatch.fisher import estimate_fisher
    from gradmatch.statistics import batches

    indices = list(range(min(n, len(encoded))))
    return estimate_fisher(model.eval(), batches(encoded, kind.collator(processor), indices, batch_size),
                           estimator="sampled", seed=0, progress=False)


def fine_tune(parent: Path, data: str, out: Path, seed: int, setting=None):
    """A child as `gradmatch train` makes it (AdamW), or with IVONTrainer for ``setting``; returns
    (model, trainer, train-set size, seconds)."""
    import transformers

    from gradmatch.config.run import load_train_config
    from gradmatch.fisher.ivon import IVONTrainer
    from gradmatch.models import load_model
    from gradmatch.train import _training_arguments

    config = {**DEMO_TRAINING, "model_name_or_path": str(parent), "dataset_name": data,
              "dataset_train_split": "train[150:]", "output_dir": str(out), "seed": seed}
    if setting is not None:
        beta2, hess_init, lr, ess = setting
        ivon = {"beta2": beta2, "hess_init": hess_init}
        if ess != 1:
            ivon["ess"] = ess * 1050  # N of a demo child: train[150:] of 1200
        config.update(optimizer_name="IVON", learning_rate=lr, ivon=ivon)
    cfg = load_train_config(config)
    kind, processor, train_data = encoded_split(parent, data, "train[150:]")
    transformers.set_seed(seed)
    model, _ = load_model(str(parent), kind=kind)
    args = _training_arguments(cfg, out / ".trainer", quiet=True, has_eval=False)
    common = dict(model=model, args=args, data_collator=kind.collator(processor), train_dataset=train_data,
                  processing_class=processor)
    if setting is None:
        trainer = transformers.Trainer(**common)
    else:
        trainer = IVONTrainer(**common, train_config=cfg, num_train_examples=len(train_data))
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    started = time.time()
    trainer.train()
    return trainer.model, trainer, len(train_data), time.time() - started


def compare(hess: dict, fisher: dict, hess_init: float) -> dict:
    """Mean, movement from hess_init, log-scale correlation with the Fisher (median over tensors, and all
    entries at once) and the geometric-mean ratio hess / F, over entries where F > 0."""
    import torch

    h_all = torch.cat([h.flatten().double() for h in hess.values()])
    per_tensor, logs_h, logs_f = [], [], []
    for name, h in hess.items():
        f = fisher[name].flatten().double()
        h = h.flatten().double()
        keep = (f > 0) & (h > 0)
        if keep.sum() < 3:
            continue
        lh, lf = h[keep].log(), f[keep].log()
        logs_h.append(lh)
        logs_f.append(lf)
        if lh.std() > 0 and lf.std() > 0:
            per_tensor.append(float(torch.corrcoef(torch.stack([lh, lf]))[0, 1]))
    lh, lf = torch.cat(logs_h), torch.cat(logs_f)
    return {
        "mean_hess": float(h_all.mean()),
        "moved": float((h_all - hess_init).norm() / (hess_init * math.sqrt(h_all.numel()))),
        "corr_tensor": float(torch.tensor(per_tensor).median()) if per_tensor else float("nan"),
        "corr_all": float(torch.corrcoef(torch.stack([lh, lf]))[0, 1]),
        "ratio": float((lh - lf).mean().exp()),
        "closed": float(1 - (lh - lf).abs().mean() / (math.log(hess_init) - lf).abs().mean()),
        "mean_fisher": float(torch.cat([f.flatten().double() for f in fisher.values()]).mean()),
    }


def merge_table(parent: Path, workdir: Path, seed: int, settings, alphas=(0.5, 1.0, 2.0)) -> list[str]:
    """Average accuracy over the five domains of gradient matching (IVON Hessians, or sampled Fishers of the same
    children) and task arithmetic of the four children, per setting (None: AdamW children, sampled Fishers)."""
    import torch
    from transformers import AutoModelForImageClassification

    from gradmatch.data import load_split
    from gradmatch.fisher.ivon import ivon_hessian
    from gradmatch.methods.gradient_matching import gradient_matching

    kind, processor, parent_data = encoded_split(parent, str(workdir / f"parent-data-{seed}"), "train")
    tests = {d: encoded_split(parent, f"digits-{d}", "test")[2] for d in ("original", *DOMAINS)}
    parent_model = AutoModelForImageClassification.from_pretrained(parent)
    theta_0 = {n: p.detach().clone() for n, p in parent_model.named_parameters()}
    f_0 = sampled_fisher(parent_model, kind, processor, parent_data)
    n_0 = len(load_split(str(workdir / f"parent-data-{seed}"), "train"))

    def average(params) -> float:
        with torch.no_grad():
            for name, p in parent_model.named_parameters():
                p.copy_(params[name])
        result = sum(accuracy(parent_model, kind, processor, t) for t in tests.values()) / len(tests)
        with torch.no_grad():
            for name, p in parent_model.named_parameters():
                p.copy_(theta_0[name])
        return result

    lines = ["| children | Hessian of the children | " + " | ".join(f"α={a:g}" for a in alphas) + " |",
             "|---|---|" + "---|" * len(alphas)]
    lines.insert(0, f"parent: {100 * average(theta_0):.1f}% (N_0 = {n_0})\n")
    for setting in settings:
        thetas, hessians, fishers = [], [], []
        for domain in DOMAINS:
            data = f"digits-{domain}"
            model, trainer, n, _ = fine_tune(parent, data, workdir / "merge-child", seed, setting)
            thetas.append({name: p.detach().clone() for name, p in model.named_parameters()})
            _, _, own = encoded_split(parent, data, "train[150:]")
            if setting is not None:
                hessians.append(ivon_hessian(trainer.optimizer, model))
            fishers.append(sampled_fisher(model, kind, processor, own))
        label = "AdamW lr 1e-3" if setting is None else "IVON β2 {:g} h0 {:g} lr {:g}".format(*setting[:3]) + (
            "" if setting[3] == 1 else f" ess {setting[3]:g}N")
        kinds = [("sampled Fisher", fishers)] + ([("IVON hess", hessians)] if setting is not None else [])
        kinds.append(("none (task arithmetic)", [{k: torch.zeros_like(v) for k, v in f.items()} for f in fishers]))
        for what, hs in kinds:
            row = []
            for alpha in alphas:
                merged = {name: gradient_matching(
                    theta_0[name], [t[name] for t in thetas], parent_fisher=f_0[name] if what[0] != "n" else
                    torch.ones_like(f_0[name]), fishers=[h[name] for h in hs], alphas=[alpha] * len(thetas),
                    parent_scale=float(n_0), scales=[1050.0] * len(thetas), stats={}) for name in theta_0}
                row.append(f"{100 * average(merged):.1f}")
            lines.append(f"| {label} | {what} | " + " | ".join(row) + " |")
    return lines


def main(argv=None) -> None:
    import torch

    from gradmatch.fisher.ivon import ivon_hessian

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", default="rot90", choices=DOMAINS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--settings", nargs="+", default=DEFAULT_GRID, help="beta2:hess_init:learning_rate ...")
    parser.add_argument("--workdir", default="/tmp/gradmatch-bench-ivon")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--merge", nargs="*", default=None,
                        help="merge four children per setting (and AdamW's); no settings: DEFAULT_MERGE")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    started = time.time()
    parent = train_parent(workdir, args.seed)
    if args.merge is not None:
        lines = merge_table(parent, workdir, args.seed, [None, *map(parse_setting, args.merge or DEFAULT_MERGE)])
        print(f"\ngradient matching of four children, average accuracy over five domains (%), seed {args.seed}; "
              f"{torch.get_num_threads()} threads; {time.time() - started:.0f} s\n")
        print("\n".join(lines))
        return
    data = f"digits-{args.child}"
    kind, processor, test = encoded_split(parent, data, "test")
    _, _, fisher_data = encoded_split(parent, data, "train[150:]")

    from transformers import AutoModelForImageClassification

    parent_model = AutoModelForImageClassification.from_pretrained(parent)
    rows = [("parent", None, accuracy(parent_model, kind, processor, test), None, 0.0)]
    model, _, n, seconds = fine_tune(parent, data, workdir / "adamw", args.seed)
    rows.append(("AdamW lr 1e-3", None, accuracy(model, kind, processor, test), None, seconds))
    for setting in map(parse_setting, args.settings):
        beta2, hess_init, lr, ess = setting
        model, trainer, n, seconds = fine_tune(parent, data, workdir / "ivon", args.seed, setting)
        hess = ivon_hessian(trainer.optimizer, model)
        fisher = sampled_fisher(model, kind, processor, fisher_data)
        stats = compare(hess, fisher, hess_init)
        ess_label = "" if ess == 1 else f" ess {ess:g}N"
        rows.append((f"IVON β2 {beta2:g} h0 {hess_init:g} lr {lr:g}{ess_label}", stats,
                     accuracy(model, kind, processor, test), trainer.state.global_step, seconds))

    machine = platform.processor() or platform.machine()
    print(f"\nchild {args.child} (N = {n}, {rows[1][4]:.0f} s AdamW), seed {args.seed}; {machine}, "
          f"{torch.get_num_threads()} threads; total {time.time() - started:.0f} s\n")
    print("| child | mean hess | mean F | ‖h − h0‖/(h0·√n) | log-corr per tensor (median) | log-corr all | "
          "hess / F (geo. mean) | log-gap to F closed | accuracy | s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for label, stats, acc, steps, seconds in rows:
        if stats is None:
            print(f"| {label} | | | | | | | | {100 * acc:.1f} | {seconds:.0f} |")
        else:
            print(f"| {label} | {stats['mean_hess']:.3g} | {stats['mean_fisher']:.3g} | {stats['moved']:.3g} | "
                  f"{stats['corr_tensor']:.2f} | {stats['corr_all']:.2f} | {stats['ratio']:.3g} | "
                  f"{stats['closed']:.2f} | {100 * acc:.1f} | "
                  f"{seconds:.0f} |")


if __name__ == "__main__":
    main()
