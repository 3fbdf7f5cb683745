"""gradmatch: merge models fine-tuned from one parent by uncertainty-based gradient matching, and its baselines.

(Each command has an ``_add_<command>`` function declaring its flags and a ``_run_<command>`` function that
imports what it needs lazily — `gradmatch merge` must start fast — and calls the library. A
:class:`~gradmatch.errors.UserError` anywhere becomes one line on stderr and exit status 2.)
"""

from __future__ import annotations

import argparse
import os
import sys

from gradmatch.errors import UserError
from gradmatch.config.fisher import ESTIMATORS
from gradmatch.kinds import kind_names
from gradmatch.methods import method_names


#: How the local data root is given, in every command that reads data.
DATA_DIR_HELP = "local data root holding <root>/<preset>/<split>.jsonl (default: $GRADMATCH_DATA_DIR, else the hub)"


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line and exit status 2, and lets a command's options come
    before, between or after its positional arguments."""

    intermixed = False

    def error(self, message: str):  # noqa: D102 - argparse API
        command = self.prog.removeprefix("gradmatch").strip()
        raise UserError(f"{command + ': ' if command else ''}{message} (see `{self.prog} --help`)")

    def parse_known_args(self, args=None, namespace=None):  # noqa: D102 - argparse API
        if self.intermixed and not getattr(self, "_inside", False):
            self._inside = True  # parse_known_intermixed_args calls parse_known_args itself
            try:
                return self.parse_known_intermixed_args(args, namespace)
            finally:
                self._inside = False
        return super().parse_known_args(args, namespace)


class _Formatter(argparse.HelpFormatter):
    """Examples as written, descriptions wrapped; every option's default shown when it has a meaningful one."""

    def _fill_text(self, text, width, indent):
        if text.startswith("examples:"):
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if ("default" not in text and default not in (None, False, "", [], argparse.SUPPRESS)
                and action.option_strings and action.nargs != 0):
            text += " (default: %(default)s)"
        return text


def _output_flags() -> argparse.ArgumentParser:
    """-q / -v, the same on every command (a parent parser)."""
    p = argparse.ArgumentParser(add_help=False)
    group = p.add_argument_group("output")
    group.add_argument("-q", "--quiet", action="store_true",
                       help="print nothing but errors and the final line (no progress bars, no library logs)")
    group.add_argument("-v", "--verbose", action="store_true", help="print more detail (informational log lines)")
    return p


def _command(sub, name: str, *, help: str, description: str, examples: list[str]):
    """A subcommand parser with the output flags, shown defaults and its examples."""
    p = sub.add_parser(name, help=help, description=description, parents=[_OUTPUT], formatter_class=_Formatter,
                       epilog="examples:\n" + "\n".join(f"  {e}" for e in examples))
    p.intermixed = True
    return p


class _Removed(argparse.Action):
    """A flag that no longer exists: one line saying what replaced it."""

    def __init__(self, option_strings, dest, message: str = "", **kwargs):
        kwargs.setdefault("nargs", "?")
        super().__init__(option_strings, dest, **kwargs)
        self.message = message

    def __call__(self, parser, namespace, values, option_string=None):
        raise UserError(self.message)


# --------------------------------------------------------------------------- merge


def _add_merge(sub) -> None:
    p = _command(
        sub, "merge",
        help="merge fine-tuned children of a common parent",
        description="Merge models fine-tuned from one parent into one Hugging Face model folder. Give a merge YAML "
        "(gradmatch's own, or a mergekit YAML for the methods both have) and an output folder, or the original "
        "scripts' flags. Methods, parameters and guarantees: docs/merge.md.",
        examples=["gradmatch merge merge.yaml merged/",
                  "gradmatch merge mergekit.yaml merged/ --out-dtype bfloat16",
                  "gradmatch merge --pretrained-model-name-or-path parent --pretrained-hessian-path parent-fisher \\",
                  "    --ft-model-name-or-paths a,b --ft-hessian-paths a-fisher,b-fisher --scaling-factor-pt 2000 \\",
                  "    --scaling-factors-ft 1000,1000 --delta-0 1e-12 --out-model-path merged/"],
    )
    p.add_argument("config", nargs="?", help="merge YAML (method, base, models, parameters)")
    p.add_argument("out", nargs="?", help="output folder (Hugging Face model folder)")
    orig = p.add_argument_group(
        "the original scripts' flags",
        "uncertainty_based_gradient_matching.py and task_arithmetic.py, same meaning and defaults (their underscore "
        "spellings are accepted too, e.g. --pretrained_model_name_or_path)")

    def flag(name: str, *more: str, **kwargs):
        orig.add_argument(f"--{name.replace('_', '-')}", f"--{name}", *more, dest=name, **kwargs)

    flag("pretrained_model_name_or_path", "--pretrained-model", metavar="PATH",
         help="the parent θ_0 (folder, hub id, or an alias: minilm, smollm2)")
    flag("pretrained_hessian_path", metavar="PATH", help="the parent's Hessian F_0: a fisher output folder or its hessian/")
    flag("ft_model_name_or_paths", metavar="A,B,...", help="comma-separated fine-tuned children θ_t")
    flag("ft_hessian_paths", metavar="HA,HB,...", help="comma-separated Hessians F_t of the children, in the same order")
    flag("scaling_factor_pt", type=float, metavar="N0", help="N_0, the scale of the parent's Hessian (the original's "
         "default 1.0; give the parent's training-set size)")
    flag("scaling_factors_ft", metavar="N1,N2,...", help="N_t, the scales of the children's Hessians (default 1.0 "
         "each; give their training-set sizes)")
    flag("delta_0", type=float, metavar="DELTA", help="prior precision δ added to N_0·F_0 (the original's default 0.0; "
         "1e-12 works well)")
    flag("scaling_factor", type=float, metavar="ALPHA", help="α, one weight for every task vector (default 1.0)")
    flag("scaling_factors", metavar="A1,A2,...", help="comma-separated α_t, one per child (instead of --scaling-factor)")
    flag("out_model_path", metavar="OUT", help="the output folder")
    flag("task_type", default="SEQ_CLS", help="accepted for compatibility; the merge reads weight files whatever the head")
    orig.add_argument("--method", default=None, choices=method_names(),
                      help="the method (default: gradient_matching when Hessians are given, else task_arithmetic)")
    run = p.add_argument_group("execution")
    run.add_argument("--overwrite", action="store_true", help="replace an existing output folder (atomically)")
    run.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    run.add_argument("--precision", choices=["float32", "float64"], default="float32", help="compute dtype")
    run.add_argument("--out-dtype", default=None, choices=["float32", "float16", "bfloat16", "float64"],
                     help="dtype of the merged floating tensors (default: the parent's stored dtype)")
    run.add_argument("--max-shard-size", default="5GB", help="safetensors shard size, e.g. 2GB, 500MB")
    run.add_argument("--block-rows", type=int, default=None,
                     help="rows per block for methods that stream a tensor (default: about 2^17 entries per input)")
    run.add_argument("--clamp-denominator", action=_Removed, help=argparse.SUPPRESS,
                     message="--clamp-denominator was replaced by the removal guard: set parameters: "
                     "{max_update_ratio: R} in the merge YAML (see docs/merge.md, Removal)")
    run.add_argument("--threads", type=int, default=1,
                     help="CPU threads for torch and the fused kernels (merging is memory-bound; more can be slower on "
                          "shared machines)")
    run.add_argument("--kernel", choices=["auto", "fused", "reference"], default="auto",
                     help="fused: one compiled pass over the inputs as stored (gradient_matching, task_arithmetic; "
                          "CPU, float32); reference: the torch formula; auto (default): fused for merges that read "
                          "2 GiB or more")
    run.add_argument("--no-check-hessians", dest="check_inputs", action="store_false",
                     help="accept Hessians and Grams whose record names another model (fisher.json / gram.json)")
    run.add_argument("--allow-config-mismatch", action="store_true",
                     help="merge children whose config differs from the parent's in a way that changes the function")
    run.add_argument("--no-card", dest="no_card", action="store_true",
                     help="write no model card (README.md: method, formula, inputs, how to reproduce)")
    p.set_defaults(func=_run_merge)


def _run_merge(args) -> int:
    from gradmatch.cli.merge import merge_from_args

    out = merge_from_args(args)
    print(f"merged model written to {out}")
    return 0


# --------------------------------------------------------------------------- run / report / demo (pipeline)


def _add_executor_flags(p) -> None:
    p.add_argument("--cores", type=int, default=None, help="CPU cores Snakemake may use at once (default: all)")
    p.add_argument("--executor", default="local",
                   help="Snakemake executor: local, slurm, or any installed executor plugin")
    p.add_argument("--jobs", type=int, default=None, help="jobs submitted at once on a cluster executor (default: 8)")
    slurm = p.add_argument_group("SLURM (with --executor slurm)")
    slurm.add_argument("--slurm-partition", default=os.environ.get("GRADMATCH_SLURM_PARTITION"),
                       help="partition (default: $GRADMATCH_SLURM_PARTITION, else the cluster's default)")
    slurm.add_argument("--slurm-account", default=os.environ.get("GRADMATCH_SLURM_ACCOUNT"),
                       help="account (default: $GRADMATCH_SLURM_ACCOUNT, else none: --slurm-no-account)")
    slurm.add_argument("--slurm-status-command", choices=["squeue", "sacct"], default="squeue",
                       help="how job states are read (sacct needs an accounting database)")
    p.add_argument("--snakemake-args", default="", metavar="'ARGS'",
                   help="more Snakemake arguments, as one quoted string (e.g. '--latency-wait 60')")


def _executor_kwargs(args) -> dict:
    import shlex

    from gradmatch.pipeline.runner import SlurmOptions, check_executor

    if args.cores is not None and args.cores <= 0:
        raise UserError(f"--cores must be positive, not {args.cores}")
    if args.jobs is not None and args.jobs <= 0:
        raise UserError(f"--jobs must be positive, not {args.jobs}")
    check_executor(args.executor)
    slurm = SlurmOptions(partition=args.slurm_partition or None, account=args.slurm_account or None,
                         status_command=args.slurm_status_command)
    try:
        extra = shlex.split(args.snakemake_args)
    except ValueError as exc:
        raise UserError(f"--snakemake-args: {exc}") from exc
    # what the run shows while it works: one progress display; Snakemake's own log with -v; nothing with -q
    output = "quiet" if args.quiet else "log" if args.verbose else "progress"
    return dict(cores=args.cores, executor=args.executor, jobs_limit=args.jobs, slurm=slurm, extra_args=extra,
                output=output)


def _add_run(sub) -> None:
    p = _command(
        sub, "run",
        help="run an experiment (train, Fisher, merges, evaluation, report) with Snakemake",
        description="Turn an experiment YAML into hashed jobs and run them with Snakemake, locally or on a "
        "cluster (--executor slurm). Finished jobs are skipped; an interrupted run resumes. Schema: "
        "docs/pipeline.md.",
        examples=["gradmatch run experiments/sentiment.yaml --data-dir DATA --cores 2",
                  "gradmatch run experiments/sentiment.yaml --data-dir DATA --dry-run",
                  "gradmatch run experiments/sentiment.yaml --executor slurm --jobs 20"],
    )
    p.add_argument("experiment", help="experiment YAML (see docs/pipeline.md)")
    p.add_argument("--workdir", default=None, help="run folder (default: runs/<experiment name>)")
    p.add_argument("--data-dir", default=None, help=DATA_DIR_HELP)
    p.add_argument("--dry-run", "-n", action="store_true",
                   help="check the data and models, list the jobs with a rough time estimate; run nothing")
    _add_executor_flags(p)
    p.set_defaults(func=_run_run)


def _run_run(args) -> int:
    from gradmatch.pipeline.runner import run_experiment

    result = run_experiment(args.experiment, workdir=args.workdir, data_dir=args.data_dir, dry_run=args.dry_run,
                            **_executor_kwargs(args))
    if args.dry_run or result.returncode:
        return result.returncode
    if (result.report_dir / "report.md").is_file():
        print(f"report: {result.report_dir / 'report.md'} (plots beside it)")
    return 0


def _add_report(sub) -> None:
    p = _command(sub, "report", help="table, JSON and plots of a run folder",
                 description="Build the report of a run folder from whatever has finished (means ± sd over seeds, "
                 "paired comparisons, α plots, the removal trade-off).",
                 examples=["gradmatch report runs/sentiment", "gradmatch report runs/sentiment --out /tmp/report"])
    p.add_argument("run_dir", help="the run folder (holds plan.json)")
    p.add_argument("--out", default=None, help="report folder (default: RUN_DIR/report)")
    p.set_defaults(func=_run_report)


def _run_report(args) -> int:
    from gradmatch.pipeline.report import markdown_table, report_run

    out, results = report_run(args.run_dir, args.out)
    if not args.quiet:
        print(markdown_table(results))
    if results["missing"]:
        print(f"not finished yet: {', '.join(results['missing'])}")
    plots = ", ".join(str(p) for p in sorted(out.glob("*.png")))
    print(f"report: {out / 'report.md'}; plots: {plots}")
    return 0


def _add_demo(sub) -> None:
    p = _command(sub, "demo", help="the built-in experiment: digit domains, a small ViT, every merge method",
                 description="Run the embedded demo experiment offline (scikit-learn digits as image domains, a "
                 "small ViT trained from scratch, children per domain, every merge with an α sweep, three seeds) "
                 "and print its table.",
                 examples=["gradmatch demo", "gradmatch demo --print-config > my-demo.yaml"])
    p.add_argument("--out", default="runs/demo", help="run folder")
    p.add_argument("--dry-run", "-n", action="store_true", help="list the jobs; run nothing")
    p.add_argument("--print-config", action="store_true", help="print the demo's experiment YAML and exit")
    _add_executor_flags(p)
    p.set_defaults(func=_run_demo)


def _run_demo(args) -> int:
    from gradmatch.demo import DEMO_EXPERIMENT, run_demo

    if args.print_config:
        print(DEMO_EXPERIMENT.read_text(), end="")
        return 0
    return run_demo(args.out, dry_run=args.dry_run, **_executor_kwargs(args))


# --------------------------------------------------------------------------- train / evaluate


def _add_train(sub) -> None:
    p = _command(
        sub, "train",
        help="fine-tune a model from a JSON/YAML config (the original's keys)",
        description="Fine-tune a classifier or a causal LM with Hugging Face Trainer (AdamW, warmup + linear/cosine "
        "schedule, optional LoRA) and write a model folder with training_metadata.json. Keys: docs/config.md.",
        examples=["gradmatch train train.yaml --data-dir DATA", "gradmatch train train_config.json --overwrite -q"],
    )
    p.add_argument("config", help="train config (.json or .yaml)")
    p.add_argument("--data-dir", default=None, help=DATA_DIR_HELP)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder (atomically)")
    p.set_defaults(func=_run_train)


def _run_train(args) -> int:
    from gradmatch.train import train

    out = train(args.config, data_dir=args.data_dir, overwrite=args.overwrite, quiet=args.quiet)
    print(f"trained model written to {out}")
    return 0


def _add_evaluate(sub) -> None:
    p = _command(
        sub, "evaluate",
        help="evaluate a model (or, with the original's Fisher method, estimate its Fisher) from a config",
        description="Write a model's metrics on a split (accuracy and macro-F1 for classifiers, perplexity for "
        "causal LMs; with a generation block, continuations of prompts scored by a classifier) and per-example "
        "records; a config with method sequence_classification_squared_gradients writes <output_dir>/hessian "
        "instead. Keys: docs/config.md.",
        examples=["gradmatch evaluate eval.yaml --data-dir DATA", "gradmatch evaluate fisher_config.json"],
    )
    p.add_argument("config", help="evaluate config (.json or .yaml)")
    p.add_argument("--data-dir", default=None, help=DATA_DIR_HELP)
    p.add_argument("--overwrite", action="store_true", help="replace existing output files (atomically)")
    p.set_defaults(func=_run_evaluate)


def _run_evaluate(args) -> int:
    from gradmatch.evaluate import evaluate

    result = evaluate(args.config, data_dir=args.data_dir, overwrite=args.overwrite, quiet=args.quiet)
    if "fisher" in result:
        print(f"Fisher written to {result['fisher']}")
        return 0
    shown = [f"{key} {result[key]:.4f}" for key in ("accuracy", "macro_f1", "perplexity") if key in result]
    if "dataset" in result:
        print(f"{'  '.join(shown)}  on {result['num_examples']} examples of {result['dataset']} {result['split']}")
    for task, row in (result.get("lm_eval") or {}).get("tasks", {}).items():
        primary = row.get("primary")
        if primary is not None and row.get(primary) is not None:
            stderr = row.get(f"{primary}_stderr")
            print(f"{task}: {primary} {row[primary]:.4f}" + (f" ± {stderr:.4f}" if stderr is not None else "")
                  + f" on {row.get('num_documents', '?')} documents")
    generation = result.get("generation")
    if generation:
        rate = (f"unwanted rate {generation['unwanted_rate']:.3f} ± {generation['unwanted_rate_se']:.3f}, "
                if "unwanted_rate" in generation else "")
        print(f"{generation['num_generations']} generations: {rate}distinct-2 {generation['distinct_2']:.3f}")
    return 0


# --------------------------------------------------------------------------- fisher


def _add_fisher(sub) -> None:
    p = _command(
        sub, "fisher",
        help="estimate a model's diagonal Fisher (exact per-example squared gradients, batched)",
        description="Write OUT/hessian/: a model folder whose weights are the mean over examples of squared "
        "per-example gradients of each example's log-likelihood (log p(y|x) for classifiers, a sequence's "
        "Σ_i log p(x_i | x_<i) for causal LMs), plus fisher.json. `--data generated` needs no data: it samples "
        "--examples sequences of up to --max-length new tokens from the causal LM itself (from BOS or --prompts) "
        "and scores their new tokens. Under `torchrun --nproc_per_node K -m gradmatch "
        "fisher ...` the examples are shared out across processes with the same result. See docs/fisher.md.",
        examples=['gradmatch fisher --model runs/child-sst2 --data sst2 --split "train[:200]" --out runs/child-sst2-fisher',
                  'gradmatch fisher --model smollm2 --data imdb --split "train[:64]" --filter label=0 --out neg-fisher',
                  'gradmatch fisher --model smollm2 --data generated --examples 256 --max-length 64 --out smollm2-fisher'],
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
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder (atomically)")
    p.set_defaults(func=_run_fisher)


#: `--data` naming no data set: sequences sampled from the causal LM itself.
GENERATED = "generated"


def _filters(given: list[str]) -> dict[str, list] | None:
    """``["label=0,1"]`` as ``{"label": [0, 1]}`` (integers where the value is one)."""
    filters: dict[str, list] = {}
    for item in given:
        column, sep, values = item.partition("=")
        if not sep or not column.strip() or not values.strip():
            raise UserError(f"--filter {item!r}: write COLUMN=VALUE[,VALUE...], e.g. label=0")
        parsed = [int(v) if v.strip().lstrip("-").isdigit() else v.strip() for v in values.split(",")]
        filters.setdefault(column.strip(), []).extend(parsed)
    return filters or None


def _run_fisher(args) -> int:
    if args.data == GENERATED:
        out = _run_generated_fisher(args)
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
                         filters=_filters(args.filter))
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"Fisher written to {out}/hessian")
    return 0


def _run_generated_fisher(args):
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
                                overwrite=args.overwrite, progress=not args.quiet, kind=args.kind)


# --------------------------------------------------------------------------- gram


def _add_gram(sub) -> None:
    p = _command(
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
    p.set_defaults(func=_run_gram)


def _run_gram(args) -> int:
    from gradmatch.gram import run_gram

    out = run_gram(args.model, args.data, args.split, out=args.out, batch_size=args.batch_size,
                   max_examples=args.max_examples, max_length=args.max_length, data_dir=args.data_dir,
                   overwrite=args.overwrite, config_name=args.config_name, device=args.device,
                   progress=not args.quiet, kind=args.kind, filters=_filters(args.filter))
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"Gram matrices written to {out}")
    return 0


# --------------------------------------------------------------------------- mismatch


def _add_mismatch(sub) -> None:
    p = _command(
        sub, "mismatch",
        help="what the paper bounds about a merge: the residual of its objective and the gradient mismatch",
        description="For a merged model θ̄ and its children θ_t: the plain gradient mismatch "
        "||Σ_t α_t (∇L_t(θ̄) − ∇L_t(θ_t))|| on held-out data (per task and in total) and, with the parent's "
        "Hessian, the residual r(θ̄) = H_0(θ̄ − θ_0) + Σ_t α_t ∇ℓ_t(θ̄) of the paper's target objective with its "
        "terms: the prior term H_0(θ̄ − θ̄_TA), the scaled mismatch and the children's optimality gap "
        "(ℓ_t = N_t·L_t, H_0 = N_0·F_0 + δ; docs/results.md). Children, α_t, the parent, F_0 and the scales "
        "default to the merge's merge.json. With --run, every merge of a finished `gradmatch run` is measured on "
        "one scale (the run's parent Hessian and training-set sizes) and test error is plotted against each "
        "quantity, with rank correlations.",
        examples=["gradmatch mismatch --run runs/sentiment --max-examples 64",
                  "gradmatch mismatch merged/ --data sst2 --data rotten_tomatoes --split \"test[:200]\" --data-dir DATA"],
    )
    p.add_argument("merged", nargs="?", help="a merged model folder (written by gradmatch merge)")
    p.add_argument("--run", metavar="RUN_DIR", help="measure every merge of this pipeline run instead")
    p.add_argument("--seed", type=int, action="append", default=None,
                   help="with --run: only the merges of this seed (repeat the flag for several; default: all)")
    p.add_argument("--children", help="comma-separated child folders (default: from merge.json)")
    p.add_argument("--alphas", help="comma-separated α_t (default: from merge.json)")
    p.add_argument("--parent", help="the parent θ_0 (default: merge.json's base)")
    p.add_argument("--base-hessian", help="the parent's Hessian F_0 (default: merge.json's base_hessian); "
                   "without one only the plain mismatch is measured")
    p.add_argument("--base-hessian-scale", type=float, help="N_0 (default: merge.json's, else the parent's training size)")
    p.add_argument("--scales", help="comma-separated N_t (default: merge.json's, else each child's training size)")
    p.add_argument("--hessians", help="comma-separated F_t of the children: adds ‖H̄⁻¹ r‖")
    p.add_argument("--delta-0", type=float, default=None, help="δ (default: merge.json's delta_0, else 1e-12)")
    p.add_argument("--data", action="append", help="the data set of each child, in order (repeat the flag)")
    p.add_argument("--split", default="test", help="held-out split (datasets syntax, default: test)")
    p.add_argument("--data-dir", default=None, help=DATA_DIR_HELP)
    p.add_argument("--max-examples", type=int, default=None,
                   help="examples per task (default: all; 100 with --run)")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", default=None,
                   help="write the result here: a JSON file, or with --run a folder (default RUN_DIR/mismatch)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_run_mismatch)


def _numbers(text: str | None, flag: str) -> list[float] | None:
    if not text:
        return None
    try:
        return [float(a) for a in text.split(",")]
    except ValueError:
        raise UserError(f"{flag} must be comma-separated numbers, not {text!r}") from None


def _run_mismatch(args) -> int:
    import json

    from gradmatch.mismatch import gradient_mismatch, write_mismatch, write_run_mismatch

    if (args.merged is None) == (args.run is None):
        raise UserError("give either a merged model folder or --run RUN_DIR")
    if args.run:
        max_examples = 100 if args.max_examples is None else args.max_examples
        out = write_run_mismatch(args.run, args.out, overwrite=args.overwrite, max_examples=max_examples,
                                 max_length=args.max_length, batch_size=args.batch_size, seeds=args.seed)
        record = json.loads((out / "mismatch.json").read_text(encoding="utf-8"))
        print(f"{'merge':<28} {'alpha':>6} {'plain':>10} {'residual':>10} {'test error':>10}")
        for r in record["merges"]:
            residual = "—" if r.get("residual") is None else f"{float(r['residual']):.4g}"  # "Infinity": a string
            print(f"{r['label'][:28]:<28} {r['alpha']:>6.3g} {float(r['plain_mismatch']):>10.4g} {residual:>10} "
                  f"{float(r['mean_test_error']):>10.3f}")
        shown = ", ".join(f"{k} {float(v):+.2f}" for k, v in record["rank_correlation_with_error"].items()
                          if v is not None)
        print(f"Spearman correlation with the test error: {shown}")
        print(f"written to {out / 'mismatch.json'} and {out / 'mismatch_vs_error.png'}")
        return 0
    split_list = (lambda text: [c.strip() for c in text.split(",")] if text else None)
    settings = dict(children=split_list(args.children), data=args.data, alphas=_numbers(args.alphas, "--alphas"),
                    parent=args.parent, base_hessian=args.base_hessian, base_hessian_scale=args.base_hessian_scale,
                    scales=_numbers(args.scales, "--scales"), hessians=split_list(args.hessians),
                    delta_0=args.delta_0, split=args.split, max_length=args.max_length, batch_size=args.batch_size,
                    data_dir=args.data_dir, max_examples=args.max_examples)
    if args.out:  # the output checked against every input before any model loads; written atomically
        result = write_mismatch(args.merged, args.out, overwrite=args.overwrite, **settings)
    else:
        result = gradient_mismatch(args.merged, **settings)
    print(f"{'task':<24} {'alpha':>6} {'mismatch':>10} {'loss':>9}  metrics of the merged model")
    for t in result.tasks:
        shown = ", ".join(f"{k} {v:.4g}" for k, v in t.metrics_merged.items())
        print(f"{t.task[-24:]:<24} {t.alpha:>6.3g} {t.mismatch:>10.4g} {t.loss_merged:>9.4g}  {shown}")
    mean = "" if result.mean_error is None else f", mean error {result.mean_error:.3f}"
    print(f"plain mismatch {result.total_mismatch:.4g}{mean}")
    if result.residual:
        print("residual " + ", ".join(f"{k} {v:.4g}" for k, v in result.residual.items() if v is not None))
    if args.out:
        print(f"written to {args.out}")
    return 0


# --------------------------------------------------------------------------- entry point


_EPILOG = """examples:
  gradmatch demo                                   a complete merge experiment on bundled data, offline
  gradmatch merge merge.yaml merged/               merge children described in a YAML file
  gradmatch fisher --model M --data sst2 --split "train[:200]" --out M-fisher
  gradmatch run experiments/sentiment.yaml --data-dir DATA --cores 2

`gradmatch COMMAND --help` describes each command; docs/ has the details."""


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="gradmatch", description=__doc__.splitlines()[0], epilog=_EPILOG,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    from gradmatch import __version__

    parser.add_argument("--version", action="version", version=f"gradmatch {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for add in _COMMANDS:
        add(sub)
    return parser


_OUTPUT = _output_flags()
_COMMANDS = [_add_merge, _add_train, _add_evaluate, _add_fisher, _add_gram, _add_run, _add_report, _add_demo,
             _add_mismatch]


def main(argv: list[str] | None = None) -> int:
    from gradmatch import console

    try:
        args = build_parser().parse_args(argv)
        with console.configured(console.QUIET if args.quiet else console.VERBOSE if args.verbose else console.NORMAL):
            return int(args.func(args) or 0)
    except UserError as exc:
        message = " ".join(str(exc).split())
        print(f"gradmatch: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gradmatch: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
