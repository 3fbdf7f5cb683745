"""What each kind of pipeline job does: importable functions with declared inputs and outputs.

Every job function takes ``(params, inputs, out)``: its parameters (JSON values), a mapping of input
roles to the folders of finished upstream jobs, and an empty folder to fill; :data:`JOB_IO` declares
the roles each kind reads and the files it writes (checked around every job). Snakemake runs one from the spec file the runner wrote with
``python -m gradmatch.pipeline.jobrun WORKDIR/jobs/<hash>.json [--threads N]``.

=========  ==============================================  =============================================
kind       inputs (role → upstream job folder)             writes into ``out``
=========  ==============================================  =============================================
prepare    —                                               ``data/`` (a saved ``datasets`` split)
pretrained —                                               ``model/`` (a model taken as it is, as a local folder)
train      ``train`` (prepare), ``init`` (train, optional) ``model/`` (HF folder + training_metadata.json; with
                                                           ``save_hessian`` also ``model/hessian/``)
fisher     ``model`` (train), ``data`` (prepare; not with  ``fisher/hessian/`` + ``fisher/hessian/fisher.json``
           ``data: generated``)                            (``params["launch"]["processes"]`` ≥ 2: under torchrun)
gram       ``model`` (train), ``data`` (prepare)           ``gram/gram.safetensors`` + ``gram/gram.json``
evaluate   ``model``, ``test/<task>``, ``classifier``?     ``metrics.json`` (with ``lm_eval``: the harness's
                                                           scores), ``eval/<task>.json``
merge      ``parent``, ``child/<t>``, Hessians, tests      ``metrics.json``, ``configs/*.yaml`` (rebuild a merge)
report     ``model/<label>``, ``merge/<label>``            ``report.md``, ``report.json``, ``*.png``
=========  ==============================================  =============================================
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from gradmatch.errors import UserError
from gradmatch.fsutil import atomic_dir, write_text


def _data(folder: str | Path) -> str:
    return str(Path(folder) / "data")


def _model(folder: str | Path) -> str:
    return str(Path(folder) / "model")


def _fisher(folder: str | Path) -> str:
    return str(Path(folder) / "fisher")


def _write_json(path: Path, value: Any) -> None:
    """JSON with non-finite numbers as the strings NaN, Infinity, -Infinity (gradmatch.finite: bare NaN is not JSON)."""
    from gradmatch.finite import dumps

    write_text(path, dumps(value, indent=2, ensure_ascii=False) + "\n")


# --------------------------------------------------------------------------- prepare


def prepare(params: dict[str, Any], inputs: dict[str, str], out: Path) -> None:
    """Materialise the concatenation of ``params["parts"]`` (each a split, filtered, optionally a seeded subset)."""
    import datasets

    from gradmatch.data import load_split, save_split

    seed = int(params.get("seed", 0))
    loaded = []
    for part in params["parts"]:
        ds = load_split(part["dataset"], part.get("split", "train"), config_name=part.get("config_name"),
                        data_dir=params.get("data_dir"), filters=part.get("filter"))
        size = part.get("size")
        if size is not None and size < len(ds):
            ds = ds.shuffle(seed=seed).select(range(size)).flatten_indices()
        elif size is not None:
            print(f"{part['dataset']} {part.get('split')}: asked for {size} examples, it has {len(ds)}; using all")
        loaded.append(ds)
    if len(loaded) > 1:
        features = loaded[0].features
        loaded = [ds if ds.features == features else ds.cast(features) for ds in loaded]
        result = datasets.concatenate_datasets(loaded)
    else:
        result = loaded[0]
    save_split(result, out / "data")
    _write_json(out / "summary.json", {"num_examples": len(result), "columns": result.column_names})
    print(f"prepared {len(result)} examples")


# --------------------------------------------------------------------------- pretrained


def pretrained(params: dict[str, Any], inputs: dict[str, str], out: Path) -> None:
    """A model taken as it is (an alias, hub id or folder) written as a local folder, so that every later job
    (possibly on a cluster node without network) reads the same files."""
    from gradmatch.models import kind_of, load_model

    kind = kind_of(params["model"], params.get("kind"))
    model, processor = load_model(params["model"], kind=kind)
    model.save_pretrained(out / "model")
    processor.save_pretrained(out / "model")
    print(f"pretrained {params['model']} ({kind.name}) written")


# --------------------------------------------------------------------------- train


def train(params: dict[str, Any], inputs: dict[str, str], out: Path) -> None:
    """Fine-tune ``init`` (an upstream model, else ``params["init"]``) on ``train``'s data."""
    from gradmatch.train import train as train_model

    init = _model(inputs["init"]) if "init" in inputs else params["init"]
    config = {**params["training"], "model_name_or_path": init, "dataset_name": _data(inputs["train"]),
              "dataset_train_split": "train", "output_dir": _model(out)}
    train_model(config)
    if params["training"].get("save_hessian") and not (out / "model" / "hessian" / "fisher.json").is_file():
        raise RuntimeError(f"training with save_hessian {params['training']['save_hessian']} wrote no "
                           "model/hessian/fisher.json")


# --------------------------------------------------------------------------- fisher


def fisher(params: dict[str, Any], inputs: dict[str, str], out: Path) -> None:
    """Diagonal Fisher of ``model`` on ``data`` (the model's own training data), or on sequences the model
    generates itself (``data: generated``).

    ``params["launch"]`` (not in the job's hash) says how: ``gradient_checkpointing``, and ``processes`` ≥ 2 runs
    ``gradmatch fisher`` under torchrun on this node (:func:`fisher_command`), ``shard`` with ``--shard``."""
    launch = params.get("launch") or {}
    if int(launch.get("processes", 1)) > 1:
        _run_torchrun(fisher_command(params, inputs, out))
        return
    if params.get("data") == "generated":
        from gradmatch.fisher.generated import run_generated_fisher

        run_generated_fisher(_model(inputs["model"]), out=_fisher(out), examples=params["examples"],
                             max_length=params["max_length"], seed=params["seed"], batch_size=params["batch_size"],
                             kind=params.get("kind"), out_dtype=params.get("out_dtype"),
                             gradient_checkpointing=bool(launch.get("gradient_checkpointing")))
        return
    from gradmatch.fisher import run_fisher

    run_fisher(_model(inputs["model"]), _data(inputs["data"]), "train", out=_fisher(out),
               estimator=params["estimator"], batch_size=params["batch_size"], max_examples=params["max_examples"],
               max_length=params["max_length"], seed=params["seed"], kind=params.get("kind"),
               out_dtype=params.get("out_dtype"), gradient_checkpointing=bool(launch.get("gradient_checkpointing")))


def fisher_command(params: dict[str, Any], inputs: dict[str, str], out: Path) -> list[str]:
    """The command a Fisher job of ``launch.processes`` processes runs: ``gradmatch fisher`` with the job's settings
    under torchrun on this node (``--standalone``: a free port of its own, so jobs side by side do not meet), with
    ``--shard`` when asked; the same options the job would pass to :func:`gradmatch.fisher.run_fisher`."""
    launch = params.get("launch") or {}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
           "--nproc_per_node", str(int(launch["processes"])), "-m", "gradmatch", "fisher",
           "--model", _model(inputs["model"]), "--out", _fisher(out), "--seed", str(params["seed"]),
           "--batch-size", str(params["batch_size"]), "--max-length", str(params["max_length"])]
    if params.get("data") == "generated":
        cmd += ["--data", "generated", "--examples", str(params["examples"])]
    else:
        cmd += ["--data", _data(inputs["data"]), "--split", "train", "--estimator", params["estimator"]]
        if params.get("max_examples") is not None:
            cmd += ["--max-examples", str(params["max_examples"])]
    for flag, key in (("--kind", "kind"), ("--out-dtype", "out_dtype")):
        if params.get(key):
            cmd += [flag, str(params[key])]
    cmd += ["--shard"] * bool(launch.get("shard")) + ["--gradient-checkpointing"] * bool(
        launch.get("gradient_checkpointing"))
    return cmd


#: Seconds torchrun gets to stop its processes when the job is stopped (it forwards the signal to them).
TORCHRUN_GRACE = 30.0


def _run_torchrun(cmd: list[str]) -> None:
    """Run ``cmd`` (torchrun and its processes), its output into this job's log; each process gets this job's
    threads divided among them. A bad input its processes report (``gradmatch: error: …``, one line each) is this
    job's one-line error; any other failure names the exit status."""
    import shlex
    import subprocess

    import torch

    processes = int(cmd[cmd.index("--nproc_per_node") + 1])
    threads = max(1, torch.get_num_threads() // processes)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    print(f"[gradmatch] {processes} processes of {threads} thread(s): OMP_NUM_THREADS={threads} "
          f"{shlex.join(cmd)}", flush=True)

    error = None
    # torchrun and its processes stay in this job's process group (the job server stops a job by its group; SLURM
    # by its step): no preexec_fn, which is unsafe in a process whose torch has started threads
    proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            errors="replace")
    try:
        for line in proc.stderr:
            sys.stderr.write(line)
            if error is None and line.startswith("gradmatch: error: "):
                error = line.removeprefix("gradmatch: error: ").strip()
        code = proc.wait()
    except BaseException:  # stopped (SIGTERM, Ctrl-C): torchrun forwards SIGTERM to its processes and exits
        proc.terminate()
        try:
            proc.wait(timeout=TORCHRUN_GRACE)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise
    sys.stderr.flush()
    if code != 0:
        if error is not None:
            raise UserError(error)
        raise RuntimeError(f"torchrun with {processes} processes exited with status {code} (its output is above)")


# --------------------------------------------------------------------------- gram


def gram(params: dict[str, Any], inputs: dict[str, str], out: Path) -> None:
    """RegMean's Gram matrices of ``model`` on ``data`` (the model's own training data)."""
    from gradmatch.gram import run_gram

    run_gram(_model(inputs["model"]), _data(inputs["data"]), "train", out=out / "gram",
             batch_size=params["batch_size"], max_examples=params["max_examples"], max_length=params["max_length"],
             kind=params.get("kind"))


# --------------------------------------------------------------------------- evaluate


#: Numbers of an evaluation kept in a job's metrics.json (the kind's metrics; per-example records stay in eval/).
_KEPT = ("accuracy", "macro_f1", "loss", "perplexity", "nll_per_token", "num_examples", "num_tokens")


@contextlib.contextmanager
def lm_eval_documents(params: dict[str, Any], tests: dict[str, str], folder: Path):
    """The documents of each task's lm-eval task: that task's prepared test rows, every column, as JSON Lines in
    ``folder`` (removed afterwards); yields lm-eval task → file (empty without lm-eval tasks)."""
    import datasets

    from gradmatch.data import _quiet_datasets

    own = (params.get("lm_eval") or {}).get("tasks") or {}
    if not own:
        yield {}
        return
    folder.mkdir(parents=True, exist_ok=True)
    try:
        files = {}
        for task, lm_task in own.items():
            files[lm_task] = str(folder / f"{lm_task}.jsonl")
            with _quiet_datasets():
                datasets.load_from_disk(_data(tests[task])).to_json(files[lm_task], lines=True, force_ascii=False)
        yield files
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def run_lm_eval(model: str | Path, settings: dict[str, Any], data_files: dict[str, str]) -> dict[str, Any]:
    """One lm-evaluation-harness call on a model folder: every task's lm-eval task (on ``data_files``) and the
    shared tasks, as :func:`gradmatch.harness.evaluate_tasks` returns them."""
    from gradmatch.harness import evaluate_tasks

    names = [*(settings.get("tasks") or {}).values(), *(settings.get("shared") or [])]
    result = evaluate_tasks(str(model), names, include_path=settings.get("include_path"),
                            data_root=settings.get("data_root"), data_files=data_files or None,
                            num_fewshot=settings.get("num_fewshot", 0), batch_size=settings.get("batch_size", 16),
                            limit=settings.get("limit"), progress=False)
    for name in names:
        scores = result["tasks"].get(name, {})
        primary = scores.get("primary")
        if primary in scores:
            se = scores.get(f"{primary}_stderr")
            print(f"  lm-eval {name}: {primary} {scores[primary]:.4g}" + (f" ± {se:.2g}" if se is not None else "")
                  + f" ({scores.get('num_documents', '?')} documents)", flush=True)
    return result


def evaluate_model(model: str | Path, tests: dict[str, str], params: dict[str, Any], out: Path,
                   predictions: bool = True, classifier: str | None = None,
                   lm_eval_files: dict[str, str] | None = None) -> dict[str, Any]:
    """Evaluate one model folder on every task's prepared test data: metrics per task, and — with a
    ``generation`` block — its generations scored by ``classifier`` (once per model, beside the fluency task);
    with an ``lm_eval`` block, the lm-eval tasks in one harness call (``lm_eval_files``: each task's documents,
    from :func:`lm_eval_documents`; exported here when not given)."""
    from gradmatch.evaluate import evaluate

    if params.get("lm_eval") and lm_eval_files is None:
        with lm_eval_documents(params, tests, out / ".lm_eval-documents") as files:
            return evaluate_model(model, tests, params, out, predictions, classifier, files)

    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    generation = None
    for task, folder in tests.items():
        config = {"model_name_or_path": str(model), "dataset_name": _data(folder), "dataset_test_split": "test",
                  "per_device_eval_batch_size": params.get("batch_size", 64),
                  "max_input_length": params.get("max_length", 128),
                  "metric_output_file": str(out / f"{task}.json")}
        if params.get("kind"):
            config["kind"] = params["kind"]
        if predictions:
            config["prediction_output_file"] = str(out / f"{task}-predictions.jsonl")
        else:
            config["prediction_output_file"] = str(out / f".{task}-predictions.json")
        if params.get("generation") and generation is None:
            config["generation"] = {**params["generation"], "output_file": str(out / "generations.jsonl"),
                                    **({"classifier": classifier} if classifier else {})}
        metrics = evaluate(config, overwrite=True)
        if not predictions:
            Path(config["prediction_output_file"]).unlink(missing_ok=True)
        results[task] = {k: metrics[k] for k in _KEPT if metrics.get(k) is not None}
        generation = metrics.get("generation", generation)
        shown = ", ".join(f"{k} {results[task][k]:.4g}" for k in ("accuracy", "perplexity") if k in results[task])
        print(f"  {task}: {shown}", flush=True)
    if generation is not None:
        rate = generation.get("unwanted_rate")
        print(f"  generations: {generation['num_generations']}" + ("" if rate is None else f", unwanted rate {rate:.3f}"),
              flush=True)
    if params.get("lm_eval"):
        return {"tasks": results, "generation": generation,
                "lm_eval": run_lm_eval(model, params["lm_eval"], lm_eval_files or {})}
    return {"tasks": results, "generation": generation}


def _tests(params: dict[str, Any], inputs: dict[str, str]) -> dict[str, str]:
    return {task: inputs[f"test/{task}"] for task in params["tasks"]}


def _classifier(inputs: dict[str, str]) -> str | None:
    return _model(inputs["classifier"]) if "classifier" in inputs else None


def evaluate(params: dict[str, Any], inputs: dict[str, str], out: Path) -> None:
    """Evaluate ``model`` on every task; ``metrics.json`` holds the kind's metrics per task (and generations')."""
    print(f"evaluating {params['label']}", flush=True)
    tests = _tests(params, inputs)
    with lm_eval_documents(params, tests, out / ".lm_eval-documents") as documents:
        result = evaluate_model(_model(inputs["model"]), tests, params, out / "eval", classifier=_classifier(inputs),
                                lm_eval_files=documents)
    _write_json(out / "metrics.json", {"label": params["label"], "kind": "model", **result})


# --------------------------------------------------------------------------- merge


def merge_config(params: dict[str, Any], inputs: dict[str, str], alpha: float) -> dict[str, Any]:
    """The merge YAML (as a dict) for one α: what `gradmatch merge CONFIG OUT` needs to rebuild it."""
    method = params["method"]
    config: dict[str, Any] = {"method": method, "base": _model(inputs["parent"])}
    if "parent_fisher" in inputs or "parent_hessian" in inputs:
        config["base_hessian"] = _hessian_path(inputs, "parent_fisher", "parent_hessian")
        config["base_hessian_scale"] = params.get("base_hessian_scale") or _num_train_examples(inputs["parent"])
    elif params.get("base_hessian") == "prior":
        config["base_hessian"] = "prior"
        if params.get("base_hessian_scale"):
            config["base_hessian_scale"] = params["base_hessian_scale"]
    models = []
    for child in params["children"]:
        entry: dict[str, Any] = {"model": _model(inputs[f"child/{child}"]), "weight": float(alpha)}
        if f"child_gram/{child}" in inputs:
            entry["gram"] = str(Path(inputs[f"child_gram/{child}"]) / "gram")
        if f"child_fisher/{child}" in inputs or f"child_hessian/{child}" in inputs:
            entry["hessian"] = _hessian_path(inputs, f"child_fisher/{child}", f"child_hessian/{child}")
            entry["hessian_scale"] = ((params.get("hessian_scales") or {}).get(child)
                                      or _num_train_examples(inputs[f"child/{child}"]))
        models.append(entry)
    config["models"] = models
    if params.get("parameters"):
        config["parameters"] = dict(params["parameters"])
    return config


def _hessian_path(inputs: dict[str, str], fisher_role: str, saved_role: str) -> str:
    """A Hessian for a merge: a Fisher job's output, or the hessian/ that training saved in a train job's model."""
    if fisher_role in inputs:
        return _fisher(inputs[fisher_role])
    return str(Path(_model(inputs[saved_role])) / "hessian")


def _hessians_read(record: dict[str, Any], children: list[str]) -> dict[str, Any]:
    """The estimator of each Hessian a merge read, from its merge.json (None: its fisher.json names none)."""
    read: dict[str, Any] = {}
    if record.get("base_hessian") is not None:
        read["parent"] = record.get("base_hessian_estimator")
    models = record.get("models") or []
    if any(m.get("hessian") is not None for m in models):
        read["children"] = {name: m.get("hessian_estimator") for name, m in zip(children, models)}
    return read


def _num_train_examples(train_folder: str) -> int:
    meta = Path(_model(train_folder)) / "training_metadata.json"
    try:
        return int(json.loads(meta.read_text())["num_train_examples"])
    except (OSError, KeyError, ValueError) as exc:
        raise UserError(f"cannot read num_train_examples from {meta}: {exc}") from exc


def merge(params: dict[str, Any], inputs: dict[str, str], out: Path) -> None:
    """Merge the children at every α, evaluate each merge on every task, keep the metrics.

    The merged models are deleted after evaluation unless ``keep_models``; ``configs/`` keeps the
    merge YAML of each α, so ``gradmatch merge configs/alpha-1.yaml OUT`` rebuilds any of them.
    """
    import yaml

    from gradmatch.merge import merge as merge_models

    tests = _tests(params, inputs)
    results = []
    hessians: dict[str, Any] = {}
    with lm_eval_documents(params, tests, out / ".lm_eval-documents") as lm_eval_files:  # once for every α
        for alpha in params["alphas"]:
            tag = f"alpha-{alpha:g}"
            config = merge_config(params, inputs, alpha)
            (out / "configs").mkdir(exist_ok=True)
            write_text(out / "configs" / f"{tag}.yaml", yaml.safe_dump(config, sort_keys=False))
            model_dir = out / "models" / tag
            print(f"{params['label']}: merging at α = {alpha:g}", flush=True)
            merge_models(config, model_dir, progress=False)
            record = json.loads((model_dir / "merge.json").read_text(encoding="utf-8"))
            hessians = _hessians_read(record, params["children"])
            result = evaluate_model(model_dir, tests, params, out / "eval" / tag, predictions=False,
                                    classifier=_classifier(inputs), lm_eval_files=lm_eval_files)
            results.append({"alpha": float(alpha), **result, "statistics": record.get("statistics", {})})
            if not params.get("keep_models"):
                shutil.rmtree(model_dir)
    with contextlib.suppress(OSError):
        (out / "models").rmdir()  # empty unless models are kept
    _write_json(out / "metrics.json", {"label": params["label"], "kind": "merge", "method": params["method"],
                                       "parameters": params.get("parameters", {}), "hessians": hessians,
                                       "alphas": results})


# --------------------------------------------------------------------------- report


def report(params: dict[str, Any], inputs: dict[str, str], out: Path) -> None:
    """Table, JSON and plots from every evaluation and merge of the experiment."""
    from gradmatch.pipeline.report import collect, write_report

    results = collect(params, inputs)
    write_report(results, out)
    print((out / "report.md").read_text())


#: The job functions by kind.
JOB_FUNCTIONS = {"prepare": prepare, "pretrained": pretrained, "train": train, "fisher": fisher, "gram": gram,
                 "evaluate": evaluate, "merge": merge, "report": report}

#: What each kind of job reads (input roles; ``x/*`` one per task or child; ``?`` optional) and what it
#: leaves in its folder (besides job.json). Checked before and after every job.
JOB_IO: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "prepare": ((), ("data", "summary.json")),
    "pretrained": ((), ("model/config.json",)),
    "train": (("train", "init?"), ("model/config.json", "model/training_metadata.json")),
    "fisher": (("model", "data?"), ("fisher/hessian/fisher.json",)),
    "gram": (("model", "data"), ("gram/gram.safetensors", "gram/gram.json")),
    "evaluate": (("model", "test/*", "classifier?"), ("metrics.json", "eval")),
    "merge": (("parent", "parent_fisher?", "parent_hessian?", "child/*", "child_fisher/*?", "child_hessian/*?",
               "child_gram/*?", "test/*", "classifier?"),
              ("metrics.json", "configs")),
    "report": (("model/*", "merge/*?", "classifier/*?"), ("report.md", "report.json", "alpha_average.png", "alpha_per_task.png",
                                        "best_per_task.png")),
}


def check_inputs(kind: str, inputs: dict[str, str]) -> None:
    """Every required input role is given, no unknown one is, and each given folder is a finished job."""
    declared = JOB_IO[kind][0]
    for role in declared:
        name = role.rstrip("?")
        present = [r for r in inputs if (r.startswith(name[:-1]) if name.endswith("*") else r == name)]
        if not present and not role.endswith("?"):
            raise UserError(f"{kind} job: missing input {name!r} (declared inputs: {', '.join(declared)})")
    for role, folder in inputs.items():
        if not any(role.startswith(d.rstrip("?")[:-1]) if d.rstrip("?").endswith("*") else role == d.rstrip("?")
                   for d in declared):
            raise UserError(f"{kind} job: unknown input {role!r} (declared inputs: {', '.join(declared)})")
        if not (Path(folder) / "job.json").is_file():
            raise UserError(f"{kind} job: input {role!r} ({folder}) has not finished")


def check_outputs(kind: str, folder: Path) -> None:
    missing = [name for name in JOB_IO[kind][1] if not (folder / name).exists()]
    if missing:
        raise RuntimeError(f"{kind} job finished without writing {', '.join(missing)}")


# --------------------------------------------------------------------------- running one job


def _set_threads(threads: int, kind: str) -> None:
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)
    if kind in ("pretrained", "train", "fisher", "gram", "evaluate", "merge"):
        import torch

        torch.set_num_threads(threads)
        with contextlib.suppress(RuntimeError):
            torch.set_num_interop_threads(1)


def link_alias(workdir: str | Path, alias: str, target: str | Path) -> Path:
    """Point ``workdir/alias`` at ``target`` with a relative symlink, replaced atomically."""
    link = Path(workdir) / alias
    link.parent.mkdir(parents=True, exist_ok=True)
    rel = os.path.relpath(target, link.parent)
    tmp = link.parent / f".{link.name}.tmp-{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    os.symlink(rel, tmp)
    if link.is_dir() and not link.is_symlink():  # e.g. a report written by `gradmatch report`
        shutil.rmtree(link)
    os.replace(tmp, link)
    return link


def run_job(spec: dict[str, Any] | str | Path, *, threads: int = 1) -> Path:
    """Run one job from its spec (dict or JSON file); the output folder appears atomically."""
    if not isinstance(spec, dict):
        spec = json.loads(Path(spec).read_text())
    kind = spec["kind"]
    out = Path(spec["out"])
    _set_threads(threads, kind)
    started = time.time()
    print(f"[gradmatch] {kind} job {spec['name']} ({spec['hash']}) with {threads} thread(s)", flush=True)
    check_inputs(kind, spec["inputs"])
    launch = spec.get("launch") or {}  # how the job runs (not in its hash): given to the job as params["launch"]
    with atomic_dir(out, overwrite=True) as tmp:
        JOB_FUNCTIONS[kind]({**spec["params"], "launch": launch} if launch else spec["params"], spec["inputs"], tmp)
        check_outputs(kind, tmp)
        _write_json(tmp / "job.json", {**{k: spec[k] for k in ("kind", "name", "hash", "params", "inputs")},
                                       **({"launch": launch} if launch else {}),
                                       "seconds": round(time.time() - started, 2)})
    if spec.get("alias"):
        link_alias(spec["workdir"], spec["alias"], out / spec.get("alias_subdir", ""))
    print(f"[gradmatch] done in {time.time() - started:.1f} s: {out}", flush=True)
    return out


def execute(spec: str | Path, threads: int = 1) -> int:
    """Run one job and turn its failure into an exit status (2: bad input, one line; 1: a bug, traceback)."""
    from gradmatch import console

    console.configure(console.NORMAL)  # the job's log is a file: no colour codes in it
    try:
        run_job(spec, threads=threads)
    except UserError as exc:
        print(f"gradmatch: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except Exception:
        traceback.print_exc()
        return 1
    return 0
