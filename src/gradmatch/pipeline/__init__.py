"""The experiment pipeline: an experiment YAML becomes hashed jobs that Snakemake runs, then a report.

``graph`` builds the jobs (:class:`~gradmatch.pipeline.graph.Job`), ``jobs`` holds what each kind of
job does, ``runner`` hands them to Snakemake (local or any executor plugin, e.g. SLURM), and
``report`` turns the evaluations into a table, JSON and plots.
"""

from __future__ import annotations

__all__ = ["Job", "build_jobs", "run_experiment", "run_jobs", "write_report"]


def __getattr__(name: str):
    # Keep `import gradmatch.pipeline` light; the submodules load on first use.
    if name in ("Job", "build_jobs"):
        from gradmatch.pipeline import graph

        return getattr(graph, name)
    if name in ("run_experiment", "run_jobs"):
        from gradmatch.pipeline import runner

        return getattr(runner, name)
    if name == "write_report":
        from gradmatch.pipeline.report import write_report

        return write_report
    raise AttributeError(f"module 'gradmatch.pipeline' has no attribute {name!r}")
