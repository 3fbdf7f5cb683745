"""`gradmatch report`: table, JSON and plots of a run folder."""

from __future__ import annotations

from gradmatch.cli._base import command


def add(sub) -> None:
    p = command(sub, "report", help="table, JSON and plots of a run folder",
                 description="Build the report of a run folder from whatever has finished (means ± sd over seeds, "
                 "paired comparisons, α plots, the removal trade-off).",
                 examples=["gradmatch report runs/sentiment", "gradmatch report runs/sentiment --out /tmp/report"])
    p.add_argument("run_dir", help="the run folder (holds plan.json)")
    p.add_argument("--out", default=None, help="report folder (default: RUN_DIR/report)")
    p.set_defaults(func=run)


def run(args) -> int:
    from gradmatch.pipeline.report import markdown_table, report_run

    out, results = report_run(args.run_dir, args.out)
    if not args.quiet:
        print(markdown_table(results))
    if results["missing"]:
        print(f"not finished yet: {', '.join(results['missing'])}")
    plots = ", ".join(str(p) for p in sorted(out.glob("*.png")))
    print(f"report: {out / 'report.md'}; plots: {plots}")
    return 0
