"""`gradmatch demo`: the embedded experiment (digit domains, a small ViT, every merge method) with its report.

The experiment file ships inside the package (``gradmatch/experiments/demo.yaml``), so the demo
runs from an installed wheel with no network and no files of its own.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from gradmatch.errors import UserError

#: The demo's experiment file (print it with `gradmatch demo --print-config`).
DEMO_EXPERIMENT = Path(__file__).with_name("experiments") / "demo.yaml"


def run_demo(out: str | os.PathLike = "runs/demo", *, dry_run: bool = False, experiment=None, echo=print,
             **run_kwargs) -> int:
    """Run the demo (or ``experiment``, e.g. a smaller dict for tests) in ``out``; print the table.

    Returns the exit status: 0 when every job finished.
    """
    from gradmatch.pipeline.report import markdown_table
    from gradmatch.pipeline.runner import run_experiment

    started = time.time()
    result = run_experiment(experiment if experiment is not None else DEMO_EXPERIMENT, workdir=out,
                            dry_run=dry_run, echo=echo, **run_kwargs)
    if dry_run or result.returncode:
        return result.returncode
    report = result.report_dir
    try:
        results = json.loads((report / "report.json").read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"the demo finished but its report {report / 'report.json'} cannot be read: {exc}") from exc
    echo("")
    echo(markdown_table(results))
    echo("")
    best = results["best"]
    for method in ("gradient_matching", "task_arithmetic"):
        if method in best:
            echo(f"best {method}: α = {best[method]['alpha']:g}, average accuracy {100 * best[method]['average']:.1f}%")
    echo(f"\nfinished in {time.time() - started:.0f} s; report: {report / 'report.md'}")
    echo(f"plots: {report / 'alpha_average.png'}, {report / 'alpha_per_task.png'}, {report / 'best_per_task.png'}")
    return 0
