"""`gradmatch demo`: the built-in experiment (digit domains, a small ViT, every merge method)."""

from __future__ import annotations

from gradmatch.cli._base import command
from gradmatch.cli.run import add_executor_flags, executor_kwargs


def add(sub) -> None:
    p = command(sub, "demo", help="the built-in experiment: digit domains, a small ViT, every merge method",
                 description="Run the embedded demo experiment offline (scikit-learn digits as image domains, a "
                 "small ViT trained from scratch, children per domain, every merge with an α sweep, three seeds) "
                 "and print its table.",
                 examples=["gradmatch demo", "gradmatch demo --print-config > my-demo.yaml"])
    p.add_argument("--out", default="runs/demo", help="run folder")
    p.add_argument("--dry-run", "-n", action="store_true", help="list the jobs; run nothing")
    p.add_argument("--print-config", action="store_true", help="print the demo's experiment YAML and exit")
    add_executor_flags(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from gradmatch.demo import DEMO_EXPERIMENT, run_demo

    if args.print_config:
        print(DEMO_EXPERIMENT.read_text(), end="")
        return 0
    return run_demo(args.out, dry_run=args.dry_run, **executor_kwargs(args))
