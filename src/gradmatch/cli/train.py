"""`gradmatch train`: fine-tune a model from a JSON/YAML config."""

from __future__ import annotations

from gradmatch.cli._base import DATA_DIR_HELP, command


def add(sub) -> None:
    p = command(
        sub, "train",
        help="fine-tune a model from a JSON/YAML config (the original's keys)",
        description="Fine-tune a classifier or a causal LM with Hugging Face Trainer (AdamW, warmup + linear/cosine "
        "schedule, optional LoRA) and write a model folder with training_metadata.json. Keys: docs/config.md.",
        examples=["gradmatch train train.yaml --data-dir DATA", "gradmatch train train_config.json --overwrite -q"],
    )
    p.add_argument("config", help="train config (.json or .yaml)")
    p.add_argument("--data-dir", default=None, help=DATA_DIR_HELP)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder (atomically)")
    p.set_defaults(func=run)


def run(args) -> int:
    from gradmatch.train import train

    out = train(args.config, data_dir=args.data_dir, overwrite=args.overwrite, quiet=args.quiet)
    print(f"trained model written to {out}")
    return 0
