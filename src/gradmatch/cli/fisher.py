"""`gradmatch fisher`: a model's diagonal Fisher over a split, or over sequences it samples itself (`--data generated`)."""

from __future__ import annotations

import os

from gradmatch.cli._base import DATA_DIR_HELP, command, filters
from gradmatch.config.fisher import ESTIMATORS
from gradmatch.config.merge import OUT_DTYPES
from gradmatch.errors import UserError
from gradmatch.kinds import kind_names


def add(sub) -> None:
    p = command(
        sub, "fisher",
        help="estimate a model's diagonal Fisher (exact per-example squared gradients, batched)",
        description="Write OUT/hessian/: a model folder whose weights are the mean over examples of squared "
        "per-example gradients of each example's log-likelihood (log p(y|x) for classifiers, a sequence's "
        "Σ_i log p(x_i | x_<i) for causal LMs), plus fisher.json. `--data generated` needs no data: it samples "
        "--examples sequences of up to --max-length new tokens from the causal LM itself (from BOS or --prompts) "
        "and scores their new tokens. Under `torchrun --nproc_per_node K -m gradmatch "
        "fisher ...` the examples are shared out across processes with the same result; with --shard the model "
        "and the sums are too (FSDP2). See docs/fisher.md.",
        examples=['gradmatch fisher --model runs/child-sst2 --data sst2 --split "train[:200]" --out runs/child-sst2-fisher',
                  'gradmatch fisher --model smollm2 --data imdb --split "train[:64]" --filter label=0 --out neg-fisher',
                  'gradmatch fisher --model smollm2 --data generated --examples 256 --max-length 64 --out smollm2-fisher',
                  ('torchrun --nproc_per_node 8 -m gradmatch fisher --shard --model MODEL --data imdb '
                   '--split "train[:1000]" --gradient-checkpointing --out model-fisher')],
    )
    p.add_argument("--model", required=True, help="a classifier or causal LM: Hugging Face folder, hub id or alias "
                   "(minilm, smollm2)")
    p.add_argument("--kind", choices=kind_names(), default=None,
                   help="kind of model (default: read from its config)")
    p.add_argument("--filter", action="append", default=[], metavar="COLUMN=VALUE[,VALUE...]",
                   help="keep only rows whose column holds one of the values, e.g. --filter label=0 (repeatable)")
    p.add_argument("--data", required=True, help="data set: preset, local JSON Lines/CSV file or folder, hub id; or "
                   "`generated`: sequences sampled from the causal LM itself (a local folder named generated: "
                   "./generated)")
    p.add_argument("--split", default=None, help="split, `datasets` syntax: train, train[:20%%], test[100:600] "
                   "(required, except with --data generated)")
    p.add_argument("--estimator", choices=ESTIMATORS, default=None,
                   help="sampled: y drawn from the model (default, the original's); empirical: the true label")
    p.add_argument("--examples", type=int, default=None,
                   help="--data generated: how many sequences to sample (required there)")
    p.add_argument("--prompts", default=None, metavar="FILE",
                   help="--data generated: prompts the sequences continue (JSON Lines with prompt or text, or one per "
                   "line; sequence n continues prompt n mod their number; default: each starts from BOS)")
    p.add_argument("--out", required=True, help="output folder (OUT/hessian/ is written)")
    p.add_argument("--batch-size", type=int, default=16, help="examples per batch (the result does not depend on it)")
    p.add_argument("--max-examples", type=int, default=None, help="use the first N examples of the split")
    p.add_argument("--max-length", type=int, default=128, help="truncate texts to this many tokens; with --data "
                   "generated, the most new tokens a sequence draws (default 128)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampled labels or sequences (default 0)")
    p.add_argument("--data-dir", default=None, help=DATA_DIR_HELP)
    p.add_argument("--config-name", default=None, help="the data set's configuration name (hub data sets)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when present)")
    p.add_argument("--out-dtype", choices=OUT_DTYPES, default=None,
                   help="dtype the Fisher is stored in (sums are float32 whatever it is; default bfloat16 for a "
                   "bfloat16 model, else float32; float16 turns entries below 6e-8 into 0)")
    p.add_argument("--shard", action="store_true",
                   help="under torchrun: shard the model and the sums over the processes with FSDP2 (each holds 1/W "
                   "of them) instead of a whole copy in each; the same result")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute each layer's activations in backward instead of keeping them (less memory for "
                   "long sequences, about one more forward pass of time)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder (atomically)")
    p.set_defaults(func=run)


#: `--data` naming no data set: sequences sampled from the causal LM itself.
GENERATED = "generated"


def run(args) -> int:
    if args.data == GENERATED:
        out = _generated(args)
    else:
        from gradmatch.fisher import run_fisher

        if args.split is None:
            raise UserError("fisher: the following arguments are required: --split (or give --data generated; see "
                            "`gradmatch fisher --help`)")
        extra = [flag for flag, value in (("--examples", args.examples), ("--prompts", args.prompts)) if value is not None]
        if extra:
            hint = " (--max-examples N takes the first N examples of a split)" if args.examples is not None else ""
            raise UserError(f"fisher: {' and '.join(extra)} appl{'y' if len(extra) > 1 else 'ies'} to --data generated "
                            f"only, not to --data {args.data}{hint}")
        out = run_fisher(args.model, args.data, args.split, out=args.out, estimator=args.estimator or "sampled",
                         batch_size=args.batch_size, max_examples=args.max_examples, max_length=args.max_length,
                         seed=args.seed, data_dir=args.data_dir, overwrite=args.overwrite,
                         config_name=args.config_name, device=args.device, progress=not args.quiet, kind=args.kind,
                         filters=filters(args.filter), out_dtype=args.out_dtype, shard=args.shard,
                         gradient_checkpointing=args.gradient_checkpointing)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"Fisher written to {out}/hessian")
    return 0


def _generated(args):
    """`--data generated`: the flags of a pass over a split do not apply, and --examples is required."""
    given = [flag for flag, value in (("--split", args.split), ("--filter", args.filter or None),
                                      ("--estimator", args.estimator), ("--max-examples", args.max_examples),
                                      ("--config-name", args.config_name), ("--data-dir", args.data_dir))
             if value is not None]
    if given:
        raise UserError(f"fisher: {', '.join(given)} do{'es' if len(given) == 1 else ''} not apply to --data generated "
                        "(it samples --examples sequences from the model; a local folder named generated is "
                        "./generated)")
    if args.examples is None:
        raise UserError("fisher: --data generated needs --examples N (how many sequences to sample)")
    from gradmatch.fisher.generated import run_generated_fisher

    return run_generated_fisher(args.model, out=args.out, examples=args.examples, max_length=args.max_length,
                                prompts=args.prompts, seed=args.seed, batch_size=args.batch_size, device=args.device,
                                overwrite=args.overwrite, progress=not args.quiet, kind=args.kind,
                                out_dtype=args.out_dtype, gradient_checkpointing=args.gradient_checkpointing,
                                shard=args.shard)
