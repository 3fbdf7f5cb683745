# Snakemake workflow of a gradmatch experiment: one rule per job of the plan that `gradmatch run` writes.
# A job is done when work/<hash>/job.json exists (see gradmatch.pipeline.runner).
# Run through `gradmatch run` (or gradmatch.pipeline.runner.run_jobs), which passes --config plan=PLAN.json.
import json

_plan = json.load(open(config["plan"]))
_python = _plan["python"]


rule all:
    default_target: True
    input:
        [f"work/{job['hash']}/job.json" for job in _plan["jobs"]],


for _job in _plan["jobs"]:
    _res = {"mem_mb": _job["resources"]["mem_mb"], "runtime": _job["resources"]["runtime"]}
    if _job["resources"]["gpus"]:
        _res["gpu"] = _job["resources"]["gpus"]
    # A job of several processes (a Fisher job under torchrun, on one node) is one task of its processes' threads
    # together ("cpus": threads × processes): on SLURM one task (--ntasks 1, or one step beside --gpus) with
    # --cpus-per-task cpus.
    _threads = _job["resources"]["cpus"]

    rule:
        name:
            _job["rule"]
        input:
            [f"work/{h}/job.json" for h in _job["deps"]],
        output:
            # written last, inside a folder that appears atomically: it exists only for a finished job
            f"work/{_job['hash']}/job.json",
        log:
            f"logs/{_job['rule']}.{_job['hash']}.log",
        threads: _threads
        resources:
            **_res,
        params:
            # directive arguments are evaluated now; the shell command itself runs later (after the loop)
            python=_python,
            spec=_job["spec"],
        shell:
            "'{params.python}' -m gradmatch.pipeline.jobrun '{params.spec}' --threads {threads} > '{log}' 2>&1"
