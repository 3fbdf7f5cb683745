"""`gradmatch evaluate`: a model's metrics on a split (or, with the original's Fisher method, its Fisher)."""

from __future__ import annotations

from gradmatch.cli._base import DATA_DIR_HELP, command


def add(sub) -> None:
    p = command(
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
    p.set_defaults(func=run)


def run(args) -> int:
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
