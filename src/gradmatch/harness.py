"""lm-evaluation-harness tasks on a causal LM (``gradmatch evaluate``'s ``lm_eval`` block and the pipeline).

The harness itself computes every number: this module finds the tasks (lm-eval's own, ``include_path``'s and the
five offline sentiment tasks shipped in ``gradmatch/harness_tasks``, whose data files are written in from the data
root at run time), checks them before any model is loaded (unknown names, YAML that does not parse, data files
that do not exist, a model that is not a causal LM: one line each), calls :func:`lm_eval.simple_evaluate` as the
``lm_eval run --model hf --model_args pretrained=FOLDER`` command line does (the same dtype, ``auto``, and batch
size), and returns its metrics with their standard errors.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gradmatch.errors import UserError

log = logging.getLogger(__name__)

#: The offline task definitions shipped with the package.
PACKAGED_DIR = Path(__file__).with_name("harness_tasks")
#: Written into a packaged task's data-file paths at run time: the data root (``--data-dir``/``$GRADMATCH_DATA_DIR``).
DATA_ROOT_TOKEN = "${data_root}"
#: Data sets the harness reads from local files (``dataset_path`` of a task).
_LOCAL_BUILDERS = ("json", "csv", "parquet", "text", "arrow")


def packaged_tasks() -> dict[str, Path]:
    """The packaged tasks: name → YAML file (the ``task:`` of every file not starting with ``_``)."""
    import yaml

    found = {}
    for path in sorted(PACKAGED_DIR.glob("*.yaml")):
        if path.name.startswith("_"):
            continue
        name = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("task")
        if isinstance(name, str):
            found[name] = path
    return found


def _render_packaged(dest: Path, root: Path | None) -> None:
    """Copies of the packaged YAMLs in ``dest`` with the data root written in (left as the token without one)."""
    value = str(root.expanduser().absolute()).replace("'", "''") if root is not None else None
    for path in PACKAGED_DIR.glob("*.yaml"):
        text = path.read_text(encoding="utf-8")
        if value is not None:
            text = text.replace(DATA_ROOT_TOKEN, value)
        (dest / path.name).write_text(text, encoding="utf-8")


def _check_yaml(folder: Path) -> None:
    """Every YAML under ``folder`` parses (the harness would otherwise skip a broken file and call its task unknown)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    for path in sorted(folder.rglob("*.yaml")):
        try:
            load_yaml(path, resolve_func=False, recursive=True)
        except Exception as exc:  # noqa: BLE001 - yaml's and the loader's errors: one line naming the file
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"lm_eval: task file {path} does not parse: {first}") from None


@contextlib.contextmanager
def _quiet_harness(progress: bool) -> Iterator[None]:
    """lm-eval's INFO lines are pages of logs: only its warnings show. Without ``progress``, its progress bars
    (tqdm, imported by name in its modules) are swapped for disabled ones for the call."""
    import importlib

    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.WARNING if progress else logging.ERROR)
    patched: list[tuple[Any, Any]] = []
    if not progress:
        from tqdm import tqdm

        class Silent(tqdm):  # the harness passes disable= itself: it is overridden, not defaulted
            def __init__(self, *args, **kwargs):
                kwargs["disable"] = True
                super().__init__(*args, **kwargs)

        for name in ("lm_eval.api.model", "lm_eval.api.task", "lm_eval.api.metrics", "lm_eval.models.huggingface",
                     "lm_eval.evaluator"):
            module = importlib.import_module(name)
            if getattr(module, "tqdm", None) is tqdm:
                patched.append((module, tqdm))
                module.tqdm = Silent
    evaluator = importlib.import_module("lm_eval.evaluator")
    git_hash = getattr(evaluator, "get_git_commit_hash", None)
    if git_hash is not None:  # it runs `git describe` in the working folder, whose "fatal: not a git repository" is noise
        evaluator.get_git_commit_hash = _quiet_git_hash
    try:
        yield
    finally:
        logger.setLevel(level)
        for module, original in patched:
            module.tqdm = original
        if git_hash is not None:
            evaluator.get_git_commit_hash = git_hash


def _quiet_git_hash() -> str | None:
    """The harness's record of the working folder's git commit, without git's complaint outside a repository."""
    import subprocess

    try:
        out = subprocess.run(["git", "describe", "--always"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


@dataclass
class Resolved:
    """Tasks ready for the harness: its task manager and what to pass it (names, or whole configs where
    ``data_files`` replaced a task's documents)."""

    manager: Any
    specs: list[Any]
    names: list[str]
    configs: dict[str, dict[str, Any]] = field(default_factory=dict)


def _eval_split(cfg: Mapping[str, Any]) -> str:
    return cfg.get("test_split") or cfg.get("validation_split") or "test"


def _named_files(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, Mapping):
        return [f for v in value.values() for f in _named_files(v)]
    if isinstance(value, (list, tuple)):
        return [f for v in value for f in _named_files(v)]
    return []


def resolve(tasks: Sequence[str], *, include_path: str | os.PathLike | None, data_root: str | os.PathLike | None,
            data_files: Mapping[str, str | os.PathLike] | None, workdir: Path) -> Resolved:
    """Find ``tasks`` (lm-eval's, ``include_path``'s, the packaged ones rendered into ``workdir``) and check that
    every data file they read exists. Raises UserError, one line each, before any model is loaded."""
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._yaml_loader import load_yaml

    from gradmatch.data import DATA_DIR_ENV
    from gradmatch.data import data_root as find_root

    if not tasks:
        raise UserError("lm_eval: name at least one task")
    names = list(dict.fromkeys(str(t) for t in tasks))
    paths: list[Path] = []
    root = find_root(data_root)
    rendered = workdir / "packaged"
    rendered.mkdir(parents=True, exist_ok=True)
    _render_packaged(rendered, root)
    paths.append(rendered)
    if include_path is not None:
        include = Path(include_path).expanduser()
        if not include.is_dir():
            raise UserError(f"lm_eval: include_path {include} is not a folder")
        _check_yaml(include)
        paths.append(include)
    files = {str(k): Path(v).expanduser() for k, v in (data_files or {}).items()}
    stray = sorted(set(files) - set(names))
    if stray:
        raise UserError(f"lm_eval: data_files names {', '.join(stray)}, which is not among the tasks ({', '.join(names)})")
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    # The packaged and include_path tasks alone index in a moment; lm-eval's own ~15,000 only when a name needs them.
    manager = TaskManager(include_path=[str(p) for p in paths], include_defaults=False)
    if not set(names) <= set(manager.all_tasks):
        manager = TaskManager(include_path=[str(p) for p in paths])
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        near = difflib.get_close_matches(unknown[0], manager.all_tasks, n=3)
        where = "lm-eval's tasks, the packaged ones" + (f" or include_path {include_path}" if include_path else "")
        raise UserError(f"lm_eval: unknown task {unknown[0]!r} (not among {where})"
                        + (f"; did you mean {', '.join(near)}?" if near else ""))
    specs: list[Any] = []
    configs: dict[str, dict[str, Any]] = {}
    for name in names:
        entry = manager.task_index[name]
        if entry.yaml_path is None or name not in manager.all_subtasks:  # a group, a tag or a Python task
            if name in files:
                raise UserError(f"lm_eval: data_files for {name}: it is a group or tag of tasks, not one task")
            specs.append(name)
            continue
        try:
            cfg = load_yaml(entry.yaml_path, resolve_func=True, recursive=True)
        except Exception as exc:  # noqa: BLE001 - e.g. a !function whose module does not import
            raise UserError(f"lm_eval: task {name} ({entry.yaml_path}) cannot be loaded: {exc}") from None
        if name in files:
            if not files[name].is_file():
                raise UserError(f"lm_eval: data_files for {name}: {files[name]} does not exist")
            kwargs = dict(cfg.get("dataset_kwargs") or {})
            kwargs["data_files"] = {_eval_split(cfg): str(files[name].absolute())}
            cfg = {**cfg, "dataset_path": "json", "dataset_kwargs": kwargs}
            cfg.pop("dataset_name", None)
            specs.append(cfg)
        else:
            specs.append(name)
        configs[name] = cfg
        if cfg.get("dataset_path") in _LOCAL_BUILDERS:
            for named in _named_files((cfg.get("dataset_kwargs") or {}).get("data_files")):
                if DATA_ROOT_TOKEN in named:
                    raise UserError(f"lm_eval: task {name} reads its documents from the data root: give --data-dir "
                                    f"or set ${DATA_DIR_ENV} (<root>/{Path(named).parent.name}/{Path(named).name})")
                path = Path(named).expanduser()
                if not path.is_absolute() and entry.yaml_path is not None:
                    path = Path(entry.yaml_path).parent / path
                if not path.is_file():
                    source = f" (data root {root})" if Path(entry.yaml_path).parent == rendered and root else ""
                    raise UserError(f"lm_eval: task {name} reads {path}, which does not exist{source}")
    return Resolved(manager=manager, specs=specs, names=names, configs=configs)


def check_model(model: str) -> None:
    """The harness runs a causal LM: a classifier (or anything else) is refused in one line."""
    from gradmatch.models import BUILTIN_SPECS, kind_of, load_config

    kind = kind_of(model)
    if kind.name != "causal-lm":
        raise UserError(f"lm_eval: model {model} is a {kind.name} model; lm-evaluation-harness tasks need a causal "
                        "language model")
    if model not in BUILTIN_SPECS:
        kind.check_head(model, load_config(model), "lm-evaluation-harness tasks")


def check_tasks(tasks: Sequence[str], *, include_path: str | os.PathLike | None = None,
                data_root: str | os.PathLike | None = None,
                data_files: Mapping[str, str | os.PathLike] | None = None) -> None:
    """Validate tasks as :func:`evaluate_tasks` does, without a model (a pipeline's dry run)."""
    with tempfile.TemporaryDirectory(prefix="gradmatch-lm-eval-") as tmp:
        resolve(tasks, include_path=include_path, data_root=data_root, data_files=data_files, workdir=Path(tmp))


def _number(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):  # the harness writes "N/A" for a standard error it has not computed
        return None
    return out


def summarize(results: Mapping[str, Any], names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The harness's ``results`` per task (and group): ``metric`` and ``metric_stderr`` (the ``,none`` filter suffix
    dropped; other filters kept as ``metric,filter``), ``num_documents``, ``primary`` (its first metric) and
    ``higher_is_better``."""
    out: dict[str, dict[str, Any]] = {}
    higher = results.get("higher_is_better") or {}
    samples = results.get("n-samples") or {}
    for task, values in (results.get("results") or {}).items():
        row: dict[str, Any] = {}
        for key, value in values.items():
            if key == "alias" or "," not in key:
                continue
            metric, filt = key.split(",", 1)
            label = metric if filt == "none" else f"{metric},{filt}"
            row[label] = _number(value)
        metrics = [k for k in row if not k.split(",")[0].endswith("_stderr")]
        order = list((higher.get(task) or {}).keys())
        primary = next((m for m in order if m in metrics), metrics[0] if metrics else None)
        row["primary"] = primary
        row["higher_is_better"] = bool((higher.get(task) or {}).get(primary.split(",")[0], True)) if primary else True
        if task in samples:
            row["num_documents"] = int(samples[task].get("effective", samples[task].get("original", 0)))
        out[task] = row
    missing = [n for n in names if n not in out]
    if missing:
        raise RuntimeError(f"lm-eval returned no results for {', '.join(missing)}")
    return out


def evaluate_tasks(model: str, tasks: Sequence[str], *, include_path: str | os.PathLike | None = None,
                   data_root: str | os.PathLike | None = None,
                   data_files: Mapping[str, str | os.PathLike] | None = None, num_fewshot: int | None = 0,
                   batch_size: int = 16, limit: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Run lm-evaluation-harness ``tasks`` on the causal LM ``model`` (a folder or hub id; an alias is resolved to
    its folder) as ``lm_eval run --model hf --model_args pretrained=<folder> --tasks ... --num_fewshot N
    --batch_size B --device cpu|cuda [--limit L] --include_path DIR`` does; ``data_files`` maps a task to a JSON Lines file that replaces
    its test documents (the pipeline's materialised splits). Returns ``{"tasks": {task: {metric, metric_stderr,
    ..., "num_documents", "primary"}}, "num_fewshot", "batch_size", "limit", "lm_eval_version", "model_args"}``."""
    from importlib.metadata import version

    from gradmatch.models import resolve_model

    check_model(model)
    folder = resolve_model(model)
    if Path(folder).is_dir():
        folder = str(Path(folder).absolute())
    with tempfile.TemporaryDirectory(prefix="gradmatch-lm-eval-") as tmp:
        resolved = resolve(tasks, include_path=include_path, data_root=data_root, data_files=data_files,
                           workdir=Path(tmp))
        import lm_eval
        import torch

        model_args = {"pretrained": str(folder)}
        device = "cuda" if torch.cuda.is_available() else "cpu"  # the harness's own default is cuda, present or not
        with _quiet_harness(progress):
            try:
                resolved.manager.load(resolved.specs)  # the documents load now: a bad file is one line, not a traceback
            except Exception as exc:  # noqa: BLE001 - datasets' and the harness's errors about the user's tasks
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise UserError(f"lm_eval: the tasks {', '.join(resolved.names)} cannot be loaded: {first}") from None
            results = lm_eval.simple_evaluate(model="hf", model_args=model_args, tasks=resolved.specs,
                                              num_fewshot=num_fewshot, batch_size=batch_size, limit=limit,
                                              device=device, task_manager=resolved.manager, log_samples=False)
    return {"tasks": summarize(results, resolved.names), "num_fewshot": num_fewshot, "batch_size": batch_size,
            "limit": limit, "device": device, "lm_eval_version": version("lm_eval"), "model_args": model_args}


def training_pairs(task: str, rows: Sequence[Mapping[str, Any]], *,
                   include_path: str | os.PathLike | None = None) -> list[tuple[str, str]]:
    """(context, continuation) of every row as the harness would score its correct answer: the rows become the
    task's documents (its ``process_docs`` applies), the context is the task's zero-shot context for the row and the
    continuation its ``target_delimiter`` and correct choice — what `gradmatch train` with ``prompt:`` trains on.
    Multiple-choice tasks only (a generation task's answer has no fixed form)."""
    import json

    if not rows:
        raise UserError(f"prompt: task {task}: no rows to train on")
    with tempfile.TemporaryDirectory(prefix="gradmatch-lm-eval-") as tmp:
        data = Path(tmp) / "rows.jsonl"
        data.write_text("".join(json.dumps(dict(r), default=str) + "\n" for r in rows), encoding="utf-8")
        resolved = resolve([task], include_path=include_path, data_root=None, data_files={task: data},
                           workdir=Path(tmp))
        with _quiet_harness(progress=False):
            try:
                built = resolved.manager.load(resolved.specs)["tasks"][task]
            except Exception as exc:  # noqa: BLE001 - the rows do not fit the task's template or loader
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise UserError(f"prompt: task {task} cannot read the training rows: {first}") from None
            if built.OUTPUT_TYPE != "multiple_choice" or getattr(built, "multiple_input", False):
                raise UserError(f"prompt: task {task} is a {built.OUTPUT_TYPE} task; training on a task's template "
                                "needs a multiple-choice task with one context per document")
            docs = list(built.eval_docs)
            pairs = []
            for n, doc in enumerate(docs):
                try:
                    context = built.fewshot_context(doc, num_fewshot=0)
                    choices = list(built.doc_to_choice(doc))
                    gold = built.doc_to_target(doc)
                    index = choices.index(gold) if isinstance(gold, str) else int(gold)
                    if not 0 <= index < len(choices):
                        raise IndexError(f"its target {gold!r} is not one of its {len(choices)} choices")
                except Exception as exc:  # noqa: BLE001 - a template error on the user's rows
                    raise UserError(f"prompt: task {task}, training row {n}: {exc}") from None
                pairs.append((context, f"{built.config.target_delimiter}{choices[index]}"))
    return pairs
