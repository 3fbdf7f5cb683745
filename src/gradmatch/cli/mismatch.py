"""`gradmatch mismatch`: the residual of the paper's objective and the gradient mismatch of a merge or a run."""

from __future__ import annotations

from gradmatch.cli._base import DATA_DIR_HELP, command
from gradmatch.errors import UserError


def add(sub) -> None:
    p = command(
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
    p.set_defaults(func=run)


def _numbers(text: str | None, flag: str) -> list[float] | None:
    if not text:
        return None
    try:
        return [float(a) for a in text.split(",")]
    except ValueError:
        raise UserError(f"{flag} must be comma-separated numbers, not {text!r}") from None


def run(args) -> int:
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
    settings = {"children": split_list(args.children), "data": args.data,
                "alphas": _numbers(args.alphas, "--alphas"), "parent": args.parent,
                "base_hessian": args.base_hessian, "base_hessian_scale": args.base_hessian_scale,
                "scales": _numbers(args.scales, "--scales"), "hessians": split_list(args.hessians),
                "delta_0": args.delta_0, "split": args.split, "max_length": args.max_length,
                "batch_size": args.batch_size, "data_dir": args.data_dir, "max_examples": args.max_examples}
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
