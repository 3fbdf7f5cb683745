"""`gradmatch run`: an experiment's jobs run by Snakemake; the executor flags that `gradmatch demo` shares."""

from __future__ import annotations

import os

from gradmatch.cli._base import DATA_DIR_HELP, command
from gradmatch.errors import UserError


def add_executor_flags(p) -> None:
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


def executor_kwargs(args) -> dict:
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
    return {"cores": args.cores, "executor": args.executor, "jobs_limit": args.jobs, "slurm": slurm,
            "extra_args": extra, "output": output}


def add(sub) -> None:
    p = command(
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
    add_executor_flags(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from gradmatch.pipeline.runner import run_experiment

    result = run_experiment(args.experiment, workdir=args.workdir, data_dir=args.data_dir, dry_run=args.dry_run,
                            **executor_kwargs(args))
    if args.dry_run or result.returncode:
        return result.returncode
    if (result.report_dir / "report.md").is_file():
        print(f"report: {result.report_dir / 'report.md'} (plots beside it)")
    return 0
