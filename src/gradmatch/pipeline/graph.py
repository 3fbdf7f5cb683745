"""Jobs of an experiment and their hashes: each job's folder is keyed by everything that determines it.

A :class:`Job` is a kind (``prepare``, ``train``, ``fisher``, ``evaluate``, ``merge``, ``report``), its
parameters and its input jobs. Its hash covers the kind, the parameters and the hashes of its inputs,
so an unchanged job keeps its folder ``work/<hash>`` across runs and edits rerun only what they touch.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from gradmatch.config.experiment import (HESSIAN_TRAINING, NAME_MAX, ExperimentConfig, ExperimentLmEval, Resources,
                                         TaskConfig, load_experiment, name_key, rule_form)
from gradmatch.errors import UserError
from gradmatch.methods import get_method

#: Bump when the meaning of a job's parameters changes, so old folders are not reused.
HASH_VERSION = 1

#: Where, inside a job's folder, the thing its readable name should point at lives.
ALIAS_SUBDIR = {"prepare": "data", "pretrained": "model", "train": "model", "fisher": "fisher", "gram": "gram",
                "evaluate": "", "merge": "", "report": ""}


class Job:
    """One step of the pipeline: ``kind`` with ``params`` applied to the outputs of ``inputs``.

    ``name`` is the readable alias (``models/child-sst2``) linked to ``work/<hash>`` once the job is
    done. ``inputs`` maps a role (``model``, ``train``, ``test/sst2``, ...) to the job providing it.
    ``launch`` says how the job runs, not what it computes (a Fisher job: ``processes``, ``shard``,
    ``gradient_checkpointing``); like ``resources`` and ``name`` it is not in the hash, and the job function
    receives it as ``params["launch"]``.
    """

    def __init__(self, kind: str, name: str, params: dict[str, Any], inputs: dict[str, Job] | None = None,
                 resources: Resources | None = None, launch: dict[str, Any] | None = None):
        if kind not in ALIAS_SUBDIR:
            raise ValueError(f"unknown job kind {kind!r}")
        self.kind = kind
        self.name = name
        self.params = json.loads(json.dumps(params))  # plain JSON values, copied
        self.inputs = dict(inputs or {})
        self.resources = resources or Resources()
        self.launch = json.loads(json.dumps(launch or {}))
        self._hash: str | None = None

    @property
    def hash(self) -> str:
        """Hex digest of the kind, parameters and input hashes (not the name or resources)."""
        if self._hash is None:
            key = {"version": HASH_VERSION, "kind": self.kind, "params": self.params,
                   "inputs": {role: job.hash for role, job in sorted(self.inputs.items())}}
            blob = json.dumps(key, sort_keys=True, separators=(",", ":"))
            self._hash = f"{self.kind}-" + hashlib.sha256(blob.encode()).hexdigest()[:16]
        return self._hash

    @property
    def rule(self) -> str:
        """A Snakemake rule name for the job (its alias made an identifier; see config.experiment.rule_form)."""
        return rule_form(self.name)

    def file_names(self) -> list[str]:
        """Every file name (one path component) the run makes from this job's name: its log
        ``logs/<rule>.<hash>.log``, SLURM's log folder ``rule_<rule>``, and each component of its readable link
        with the temporary name it is written under (``.<name>.tmp-<pid>``, a pid of up to 7 digits)."""
        return [f"{self.rule}.{self.hash}.log", f"rule_{self.rule}",
                *(f".{part}.tmp-{'0' * 7}" for part in self.name.split("/"))]

    def folder(self, workdir: str | os.PathLike) -> Path:
        return Path(workdir) / "work" / self.hash

    def __repr__(self) -> str:
        return f"Job({self.kind!r}, {self.name!r}, {self.hash})"


def check_job_names(jobs: list[Job]) -> None:
    """Before anything is written: no two jobs share a Snakemake rule or a readable folder (names equal up to
    '-', '_', '.', '/' and case: :func:`~gradmatch.config.experiment.name_key`), and every file name a job's name
    becomes fits in :data:`~gradmatch.config.experiment.NAME_MAX` bytes. One line naming the job(s)."""
    seen: dict[str, Job] = {}
    for job in jobs:
        other = seen.setdefault(name_key(job.name), job)
        if other is not job and other.hash != job.hash:
            same = "the same name" if other.name == job.name else "names that differ only in '-', '_', '.' or case"
            raise UserError(f"jobs {other.name} ({other.kind}) and {job.name} ({job.kind}) have {same}: both would be "
                            f"Snakemake rule {job.rule} (rename a task or merge)")
        longest = max(job.file_names(), key=lambda n: len(n.encode()))
        if len(longest.encode()) > NAME_MAX:
            raise UserError(f"job {job.name}: its name makes the file name {longest[:40]}… of {len(longest.encode())} "
                            f"bytes, and file systems take at most {NAME_MAX} (shorten the task, merge or job name)")


def toposort(jobs: list[Job]) -> list[Job]:
    """Every job after its inputs (inputs not listed are added); order otherwise kept."""
    seen: dict[str, Job] = {}

    def visit(job: Job, stack: tuple[str, ...] = ()) -> None:
        if job.hash in seen:
            return
        if job.hash in stack:
            raise ValueError(f"job graph has a cycle through {job.name}")
        for dep in job.inputs.values():
            visit(dep, stack + (job.hash,))
        seen[job.hash] = job

    for job in jobs:
        visit(job)
    return list(seen.values())


# --------------------------------------------------------------------------- experiment → jobs


def _fmt_alpha(alpha: float) -> str:
    return f"{alpha:g}"


def build_jobs(experiment: ExperimentConfig | dict | str | os.PathLike, *, data_dir: str | os.PathLike | None = None
               ) -> list[Job]:
    """The jobs of an experiment, inputs before the jobs that need them, the report last.

    For each seed: prepare data (each split once) → the parent (trained on its task, or taken as it is: a
    ``pretrained`` job) → its Fisher; train each child from the parent → its Fisher (with ``hessian: adam`` or
    ``ivon`` a trained model saves its own Hessian and gets no Fisher job; a parent taken as it is still does);
    the attribute classifier when generations are scored; one job per merge method (all its α, each evaluated on
    every task); the multitask model; every model evaluated on every task (and, with lm-eval tasks, judged by them
    in one harness call per model; a task naming one trains its model on that task's prompt template). Then one
    report over every seed.
    With several seeds, every job's readable name starts with ``seed-<n>/``.
    """
    from gradmatch.models import kind_of

    exp = load_experiment(experiment)
    # the data root as the checks see it, in every job's parameters: a job does not read $GRADMATCH_DATA_DIR itself
    from gradmatch.data import DATA_DIR_ENV

    data_dir = data_dir or os.environ.get(DATA_DIR_ENV) or None
    data_dir = str(Path(data_dir).expanduser().resolve()) if data_dir else None
    run_kind = kind_of(exp.model, exp.kind)
    if exp.evaluation.generation is not None and not run_kind.generates:
        raise UserError(f"evaluation.generation: {exp.model} is a {run_kind.name} model, which does not generate text")
    if exp.fisher.data == "generated" and run_kind.name != "causal-lm":
        raise UserError(f"fisher.data: generated samples sequences from a causal LM, and {exp.model} is a "
                        f"{run_kind.name} model (use data: split)")
    generated = [s.label for s in exp.merges if s.base_hessian == "generated"]
    if generated and run_kind.name != "causal-lm":
        raise UserError(f"merges: {generated[0]}: base_hessian: generated samples sequences from a causal LM, and "
                        f"{exp.model} is a {run_kind.name} model (use base_hessian: fisher or prior)")
    lm_eval = lm_eval_params(exp, data_dir)
    if lm_eval is not None and run_kind.name != "causal-lm":
        where = next((f"{t.name}.lm_eval" for t in exp.tasks if t.lm_eval), "evaluation.lm_eval")
        raise UserError(f"{where}: lm-eval tasks judge causal LMs, and {exp.model} is a {run_kind.name} model")
    seeds = exp.run_seeds
    jobs: list[Job] = []
    entries: list[dict[str, Any]] = []
    report_inputs: dict[str, Job] = {}
    prepared: dict[str, Job] = {}
    for seed in seeds:
        prefix = f"seed-{seed}/" if len(seeds) > 1 else ""
        seed_jobs, seed_entries = _seed_jobs(exp, seed, prefix, data_dir, prepared, lm_eval)
        jobs += seed_jobs
        for entry, job in seed_entries:
            key = entry["key"] + (f"@{seed}" if len(seeds) > 1 else "")
            entries.append({**entry, "key": key, "seed": seed})
            report_inputs[key] = job
    params = {"experiment": exp.name, "tasks": [t.name for t in exp.tasks], "entries": entries, "seeds": seeds,
              "metric": run_kind.primary_metric, "higher_is_better": run_kind.higher_is_better,
              "fluency_task": exp.evaluation.fluency_task or exp.parent.name}
    if lm_eval is not None:  # the run's metric: each task's lm-eval task's primary metric (accuracy), where it has one
        params["lm_eval"] = {"tasks": lm_eval["tasks"], "shared": lm_eval["shared"]}
        if lm_eval["tasks"]:
            params.update(metric="accuracy", higher_is_better=True)
    report = Job("report", "report", params, report_inputs, exp.resources.for_kind("report"))
    return toposort(list(prepared.values()) + jobs + [report])


def lm_eval_params(exp: ExperimentConfig, data_dir: str | None) -> dict[str, Any] | None:
    """What every evaluation's lm-eval harness call gets (None: the run names no lm-eval task): each task's own
    lm-eval task (``tasks``: task → lm-eval task; its documents are that task's prepared test rows), the shared
    ones (on their own data: their data files, or the data root) and the harness's settings."""
    own, settings = exp.lm_eval_tasks(), exp.evaluation.lm_eval
    if not own and settings is None:
        return None
    settings = settings or ExperimentLmEval()
    return {"tasks": own, "shared": list(settings.tasks), "include_path": exp.lm_eval_include_path,
            "data_root": data_dir, "num_fewshot": settings.num_fewshot, "batch_size": settings.batch_size,
            "limit": settings.limit}


def _seed_jobs(exp: ExperimentConfig, seed: int, prefix: str, data_dir: str | None, prepared: dict[str, Job],
               lm_eval: dict[str, Any] | None = None) -> tuple[list[Job], list[tuple[dict[str, Any], Job]]]:
    """The jobs of one seed, and the report's entries with the job that holds each one's metrics."""
    res = exp.resources.for_kind

    def prepare(name: str, parts) -> Job:
        # Parts without a subset size read the same rows for every seed: one job serves them all.
        subset = any(p.size is not None for p in parts)
        params = {"parts": [p.model_dump(exclude_none=True) for p in parts], "seed": seed if subset else 0,
                  "data_dir": data_dir}
        job = Job("prepare", prefix * subset + name, params, resources=res("prepare"))
        return prepared.setdefault(job.hash, job)

    def training(task_overrides: dict, shared: dict = exp.training, kind: str | None = exp.kind) -> dict:
        return {"seed": seed, **({"kind": kind} if kind else {}), **shared, **task_overrides}

    tests = {t.name: prepare(f"data/{t.name}-test", t.test_parts()) for t in exp.tasks}
    test_inputs = {f"test/{name}": job for name, job in tests.items()}
    eval_params = {"tasks": list(tests), **exp.evaluation.model_dump(exclude_none=True, exclude={"lm_eval"}),
                   **({"kind": exp.kind} if exp.kind else {}), **({"lm_eval": lm_eval} if lm_eval else {})}
    jobs: list[Job] = []
    extra_entries: list[tuple[dict[str, Any], Job]] = []

    classifier = None
    if exp.attribute_classifier is not None:
        task = exp.attribute_classifier
        data = prepare(f"data/{task.name}-train", task.train_parts())
        classifier = Job("train", f"{prefix}models/{task.name}", {"training": training(task.training, {}, None),
                                                                   "init": task.model}, {"train": data}, res("train"))
        test = prepare(f"data/{task.name}-test", task.test_parts())
        evaluation = Job("evaluate", f"{prefix}eval/{task.name}",
                         {"label": task.name, "tasks": [task.name], "batch_size": exp.evaluation.batch_size,
                          "max_length": exp.evaluation.max_length},
                         {"model": classifier, f"test/{task.name}": test}, res("evaluate"))
        jobs.append(evaluation)
        extra_entries.append(({"key": f"classifier/{task.name}", "label": task.name, "kind": "classifier"}, evaluation))
    scorer = {"classifier": classifier} if classifier is not None else {}

    saved = HESSIAN_TRAINING[exp.hessian]  # a model the run trains saves its own Hessian (hessian: adam, ivon)

    def train(name: str, init: str | Job, data: Job, overrides: dict, task: TaskConfig | None = None) -> Job:
        # a task judged by an lm-eval task trains on that task's prompt template (prompt: set by the pipeline)
        params = {"training": {**training(overrides), **saved, **(exp.prompt_training(task) if task else {})}}
        inputs = {"train": data}
        if isinstance(init, Job):
            inputs["init"] = init
        else:
            params["init"] = init
        return Job("train", prefix + name, params, inputs, res("train"))

    def fisher_launch() -> dict[str, Any]:
        """How every Fisher job runs (none of it in the hash): as resources.fisher.processes processes under
        torchrun, sharded with resources.fisher.shard, with the fisher block's gradient_checkpointing."""
        resources, launch = res("fisher"), {}  # only what differs from one plain process: earlier specs unchanged
        if resources.processes > 1:
            launch["processes"] = resources.processes
        if resources.shard:
            launch["shard"] = True
        if exp.fisher.gradient_checkpointing:
            launch["gradient_checkpointing"] = True
        return launch

    def fisher(name: str, model: Job, data: Job) -> Job:
        params = {**exp.fisher.job_params(), "seed": seed, **({"kind": exp.kind} if exp.kind else {})}
        inputs = {"model": model} if exp.fisher.data == "generated" else {"model": model, "data": data}
        return Job("fisher", prefix + name, params, inputs, res("fisher"), fisher_launch())

    def hessian(name: str, model: Job, data: Job) -> tuple[str, Job]:
        """Where a model's Hessian comes from: (``fisher``, its Fisher job), or (``hessian``, the model's own train
        job, whose model/hessian/ its optimizer wrote)."""
        if saved and model.kind == "train":
            return "hessian", model
        return "fisher", fisher(name, model, data)

    def gram(name: str, model: Job, data: Job) -> Job:
        params = {**exp.gram.model_dump(), **({"kind": exp.kind} if exp.kind else {})}
        return Job("gram", prefix + name, params, {"model": model, "data": data}, res("gram"))

    def evaluate(label: str, model: Job) -> Job:
        return Job("evaluate", f"{prefix}eval/{label}", {"label": label, **eval_params},
                   {"model": model, **test_inputs, **scorer}, res("evaluate"))

    parent_data = prepare(f"data/{exp.parent.name}-train", exp.parent.train_parts())
    if exp.parent.finetune:
        parent = train("models/parent", exp.model, parent_data, exp.parent.training, exp.parent)
    else:  # the same model for every seed: one job
        parent = Job("pretrained", "models/parent", {"model": exp.model, **({"kind": exp.kind} if exp.kind else {})},
                     resources=res("pretrained"))
        parent = prepared.setdefault(parent.hash, parent)
    jobs.append(parent)
    parent_hessian = None  # only when a merge takes H_0 from it (a pretrained body may have no likelihood for it)
    if any(get_method(s.method).uses_parent_hessian and s.base_hessian == "fisher" for s in exp.merges):
        parent_hessian = hessian("fisher/parent", parent, parent_data)
        if parent_hessian[0] == "fisher":
            jobs.append(parent_hessian[1])
    parent_generated = None  # H_0 from the parent's own samples, for merges with base_hessian: generated
    if any(get_method(s.method).uses_parent_hessian and s.base_hessian == "generated" for s in exp.merges):
        if exp.fisher.data == "generated" and parent_hessian is not None and parent_hessian[0] == "fisher":
            parent_generated = parent_hessian  # the same job
        else:
            params = {**exp.fisher.generated_params(), "seed": seed, **({"kind": exp.kind} if exp.kind else {})}
            parent_generated = ("fisher", Job("fisher", prefix + "fisher/parent-generated", params, {"model": parent},
                                              res("fisher"), fisher_launch()))
            jobs.append(parent_generated[1])
    evals = [("parent", "model", evaluate("parent", parent))]
    children: dict[str, tuple[Job, tuple[str, Job]]] = {}
    grams: dict[str, Job] = {}
    needs_grams = any(get_method(spec.method).uses_grams for spec in exp.merges)
    for child in exp.children:
        data = prepare(f"data/{child.name}-train", child.train_parts())
        model = train(f"models/child-{child.name}", parent, data, child.training, child)
        children[child.name] = (model, hessian(f"fisher/child-{child.name}", model, data))
        jobs.append(model)
        if children[child.name][1][0] == "fisher":
            jobs.append(children[child.name][1][1])
        if needs_grams:
            grams[child.name] = gram(f"gram/child-{child.name}", model, data)
            jobs.append(grams[child.name])
        evals.append((f"child-{child.name}", "model", evaluate(f"child-{child.name}", model)))

    merges = []
    for spec in exp.merges:
        method = get_method(spec.method)
        needs_hessian = method.uses_child_hessians
        inputs: dict[str, Job] = {"parent": parent, **test_inputs, **scorer}
        scales = {}
        if method.uses_parent_hessian and spec.base_hessian in ("fisher", "generated"):
            role, job = parent_hessian if spec.base_hessian == "fisher" else parent_generated
            inputs[f"parent_{role}"] = job
            scales["base_hessian_scale"] = spec.base_hessian_scale or exp.parent.hessian_scale
        elif method.uses_parent_hessian:  # the isotropic prior: N_0 defaults to the mean of the children's N_t
            scales["base_hessian"] = "prior"
            scales["base_hessian_scale"] = spec.base_hessian_scale
        for name, (model, (role, job)) in children.items():
            inputs[f"child/{name}"] = model
            if needs_hessian:
                inputs[f"child_{role}/{name}"] = job
            if method.uses_grams:
                inputs[f"child_gram/{name}"] = grams[name]
        if needs_hessian:
            scales["hessian_scales"] = {c.name: c.hessian_scale for c in exp.children}
        params = {"method": spec.method, "label": spec.label, "alphas": spec.alphas, "parameters": spec.parameters,
                  "children": list(children), "keep_models": spec.keep_models,
                  **{k: v for k, v in scales.items() if v is not None}, **eval_params}
        merges.append((spec.label, "merge", Job("merge", f"{prefix}merges/{spec.label}", params, inputs, res("merge"))))

    if exp.multitask.enabled:
        parts = [p for child in exp.children for p in child.train_parts()]
        data = prepare("data/multitask-train", parts)
        model = train("models/multitask", parent, data, exp.multitask.training)
        jobs.append(model)
        evals.append(("multitask", "model", evaluate("multitask", model)))

    rows = evals[:-1] + merges + evals[-1:] if exp.multitask.enabled else evals + merges
    jobs += [job for _, _, job in rows]
    entries = [({"key": f"{kind}/{label}", "label": label, "kind": kind}, job) for label, kind, job in rows]
    return jobs, entries + extra_entries


def plan_dict(jobs: list[Job], workdir: str | os.PathLike, python: str) -> dict[str, Any]:
    """What the Snakefile reads: every job with its rule name, dependencies, spec file and resources (``cpus``: the
    threads of each of its processes together, the rule's threads)."""
    workdir = Path(workdir).resolve()
    return {
        "python": python,
        "workdir": str(workdir),
        "jobs": [
            {"hash": j.hash, "kind": j.kind, "name": j.name, "rule": j.rule,
             "deps": sorted({d.hash for d in j.inputs.values()}),
             "spec": str(workdir / "jobs" / f"{j.hash}.json"),
             "resources": {**j.resources.model_dump(), "cpus": j.resources.cpus}}
            for j in jobs
        ],
    }


def job_spec(job: Job, workdir: str | os.PathLike) -> dict[str, Any]:
    """The JSON a job process reads: kind, parameters, input folders, output folder and alias."""
    workdir = Path(workdir).resolve()
    return {"kind": job.kind, "name": job.name, "hash": job.hash, "params": job.params,
            "inputs": {role: str(dep.folder(workdir)) for role, dep in job.inputs.items()},
            "out": str(job.folder(workdir)), "workdir": str(workdir),
            "alias": job.name, "alias_subdir": ALIAS_SUBDIR[job.kind], **({"launch": job.launch} if job.launch else {})}


def read_run_specs(run_dir: str | os.PathLike, kind: str | None = None) -> list[dict[str, Any]]:
    """The job specs of a run folder (every job's, or one kind's), in the plan's order, with their folders
    relocated into ``run_dir``: a run folder that was copied or moved reports its own results, not the
    original's. Specs are read from ``run_dir/jobs``; a folder without a readable plan is one clear error."""
    run_dir = Path(run_dir)
    plan_path = run_dir / "plan.json"
    if not plan_path.is_file():
        raise UserError(f"{run_dir} is not a gradmatch run folder (no plan.json)")
    here = str(run_dir.resolve())
    try:
        jobs = [j for j in json.loads(plan_path.read_text(encoding="utf-8"))["jobs"] if kind in (None, j["kind"])]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{plan_path} is not a readable gradmatch plan: {' '.join(str(exc).split())[:200]}") from None
    specs = []
    for job in jobs:
        name = f"{job['hash']}.json" if "hash" in job else Path(str(job.get("spec", ""))).name
        path = run_dir / "jobs" / name
        try:
            spec = json.loads(path.read_text(encoding="utf-8"))
            there = str(spec.get("workdir") or here)

            def move(p: str) -> str:
                return here + p[len(there):] if p == there or p.startswith(there + os.sep) else p

            spec.update(workdir=here, inputs={r: move(p) for r, p in spec["inputs"].items()})
            if "out" in spec:
                spec["out"] = move(spec["out"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise UserError(f"the {job.get('kind', '?')} job of {run_dir} cannot be read: its spec {name} in "
                            f"{run_dir / 'jobs'}: {' '.join(str(exc).split())[:200]}") from None
        specs.append(spec)
    return specs
