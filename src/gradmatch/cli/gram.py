"""`gradmatch gram`: RegMean's statistics, the Gram matrix of every Linear layer's inputs."""

from __future__ import annotations

import os

from gradmatch.cli._base import DATA_DIR_HELP, command, filters
from gradmatch.kinds import kind_names


def add(sub) -> None:
    p = command(
        sub, "gram",
        help="RegMean's statistics: the Gram matrix of every Linear layer's inputs",
        description="Write OUT/gram.safetensors (for every nn.Linear, keyed by its weight's name in the checkpoint: "
        "G = mean over the examples' non-padding positions of x xᵀ, float32, in × in) and OUT/gram.json. Under "
        "`torchrun --nproc_per_node K -m gradmatch gram ...` the examples are shared out across processes.",
        examples=['gradmatch gram --model runs/child-sst2 --data sst2 --split "train[:200]" --out runs/child-sst2-gram'],
    )
    p.add_argument("--model", required=True, help="Hugging Face folder, hub id or alias")
    p.add_argument("--data", required=True, help="data set: preset, local JSON Lines/CSV file or folder, hub id")
    p.add_argument("--split", required=True, help="split, `datasets` syntax: train, train[:20%%], test[100:600]")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--batch-size", type=int, default=16, help="examples per batch (the result does not depend on it)")
    p.add_argument("--max-examples", type=int, default=None, help="use the first N examples of the split")
    p.add_argument("--max-length", type=int, default=128, help="truncate texts to this many tokens")
    p.add_argument("--kind", choices=kind_names(), default=None, help="kind of model (default: read from its config)")
    p.add_argument("--filter", action="append", default=[], metavar="COLUMN=VALUE[,VALUE...]",
                   help="keep only rows whose column holds one of the values (repeatable)")
    p.add_argument("--data-dir", default=None, help=DATA_DIR_HELP)
    p.add_argument("--config-name", default=None, help="the data set's configuration name (hub data sets)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when present)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder (atomically)")
    p.set_defaults(func=run)


def run(args) -> int:
    from gradmatch.gram import run_gram

    out = run_gram(args.model, args.data, args.split, out=args.out, batch_size=args.batch_size,
                   max_examples=args.max_examples, max_length=args.max_length, data_dir=args.data_dir,
                   overwrite=args.overwrite, config_name=args.config_name, device=args.device,
                   progress=not args.quiet, kind=args.kind, filters=filters(args.filter))
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"Gram matrices written to {out}")
    return 0
