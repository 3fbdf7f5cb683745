"""Before a run: check every data source and model the jobs still to run will read, and (for a dry run)
estimate what the jobs cost from throughput measured on this project's machine.

The checks read no rows and load no weights: a local data root must hold each preset's folder and the
split files a job names; a model must be an alias, a built-in spec, a model folder or a hub id; a prompts
file is read (it is small). The
estimate counts each job's examples (local JSON Lines are counted by their lines) and divides by the
rates below, scaled by the model's size and the sequence length: a rough figure, meant to tell minutes
from hours.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gradmatch.errors import UserError
from gradmatch.pipeline.graph import Job

#: Throughput of a MiniLM-size model (22.7M parameters) at sequence length 128 on this project's machine (2-core
#: AMD EPYC, torch 2.13 CPU, 2 threads): training (batch 16) 12 examples/s and inference 60 examples/s (measured
#: for the project's brief); the exact Fisher 3 examples/s (docs/benchmarks.md "Fisher": 3.3 on one thread;
#: 2.5 MiniLM-equivalent in the removal run's SmolLM2 Fisher jobs); Gram matrices 21 examples/s (a forward pass
#: plus an x xᵀ per Linear input: the sentiment run's MiniLM Gram jobs, length 128, batch 16, 200 examples in 9.9 s
#: with another job beside them); generation 350 tokens/s
#: MiniLM-equivalent (SmolLM2-135M wrote 200 continuations of 24 tokens in about 80 s in the removal run).
RATES = {"train": 12.0, "infer": 60.0, "fisher": 3.0, "gram": 21.0, "generate": 350.0}
#: Seconds a job costs beyond its compute (starting from the warm job server, reading its model and data), and a
#: merge per α (merging, loading the merged model): the demo's 35 jobs of a small ViT took 53 s on two slots.
JOB_SECONDS, ALPHA_SECONDS = 3.0, 1.0
#: Requests an lm-eval document costs: one log-likelihood per choice (the sentiment tasks' negative / positive).
LM_EVAL_CHOICES = 2
REFERENCE_PARAMETERS = 22.7e6
REFERENCE_LENGTH = 128
#: Sizes of the aliases (no need to open their weights, or to convert SmolLM2's GGUF file, to know them).
ALIAS_PARAMETERS = {"minilm": 22.7e6, "smollm2": 134.5e6}
MACHINE = "a 2-core AMD EPYC (this project's machine)"


# --------------------------------------------------------------------------- checks


def check_inputs(jobs: list[Job], done: Callable[[Job], bool]) -> list[str]:
    """Check the data sources and models of every job not yet done; return one note per thing checked that
    could not be checked fully (a hub id offline). A problem is a :class:`UserError` naming the job."""
    from gradmatch.data import check_split
    from gradmatch.models import BUILTIN_SPECS, MODEL_ALIASES, resolve_model

    notes: list[str] = []
    seen: set[tuple] = set()
    for job in jobs:
        if done(job):
            continue
        if job.kind == "prepare":
            for part in job.params["parts"]:
                key = (part["dataset"], part.get("split", "train"), part.get("config_name"), job.params.get("data_dir"))
                if key in seen:
                    continue
                seen.add(key)
                try:
                    where = check_split(part["dataset"], part.get("split", "train"), config_name=part.get("config_name"),
                                        data_dir=job.params.get("data_dir"))
                except UserError as exc:
                    raise UserError(f"{job.name}: {exc}") from None
                if where == "hub":
                    notes.append(f"data set {part['dataset']} comes from the Hugging Face hub: not checked before loading")
        if job.kind == "train" and job.params["training"].get("optimizer_name") == "IVON" and "ivon" not in seen:
            seen.add("ivon")
            import importlib.util

            if importlib.util.find_spec("ivon") is None:
                raise UserError(f"{job.name}: optimizer_name IVON needs the ivon-opt package (pip install ivon-opt)")
        prompts = (job.params.get("generation") or {}).get("prompts") if job.kind in ("evaluate", "merge") else None
        if isinstance(prompts, str) and ("prompts", prompts) not in seen:  # a file: read it now, not hours later
            seen.add(("prompts", prompts))
            from gradmatch.evaluate import read_prompts

            try:
                read_prompts(prompts)
            except UserError as exc:
                raise UserError(f"{job.name}: evaluation.generation.prompts: {exc}") from None
        if job.kind in ("evaluate", "merge") and job.params.get("lm_eval"):
            key = ("lm_eval", json.dumps(job.params["lm_eval"], sort_keys=True))
            if key not in seen:
                seen.add(key)
                _check_lm_eval(job)
        if job.kind == "fisher" and (job.launch.get("shard") or job.launch.get("gradient_checkpointing")):
            _check_fisher_launch(job, seen)
        for model in _models_named(job):
            if model in seen or model in BUILTIN_SPECS or model in MODEL_ALIASES:
                continue
            seen.add(model)
            try:
                resolved = resolve_model(model)
            except UserError as exc:
                raise UserError(f"{job.name}: {exc}") from None
            if not Path(resolved).is_dir():
                notes.append(f"model {model} comes from the Hugging Face hub: not checked before loading")
    return notes


def _check_lm_eval(job: Job) -> None:
    """The lm-eval tasks an evaluation runs exist and parse, and the shared ones find their data (offline, no model
    loaded). Each task's own lm-eval task reads that task's test rows, which the run prepares: a placeholder stands
    for them here."""
    import tempfile

    from gradmatch.harness import check_tasks

    settings = job.params["lm_eval"]
    own = list((settings.get("tasks") or {}).values())
    with tempfile.TemporaryDirectory(prefix="gradmatch-lm-eval-") as scratch:
        files = {}
        for name in own:
            files[name] = str(Path(scratch) / f"{name}.jsonl")
            Path(files[name]).write_text(json.dumps({"text": "", "label": 0}) + "\n", encoding="utf-8")
        try:
            check_tasks([*own, *(settings.get("shared") or [])], include_path=settings.get("include_path"),
                        data_root=settings.get("data_root"), data_files=files or None)
        except UserError as exc:
            raise UserError(f"{job.name}: {exc}") from None


def _base_model(job: Job) -> str | None:
    """The model a model job starts from, by name (a train job's ``init``, through its chain of train jobs; a
    pretrained job's model): the architecture of what it writes."""
    while job.kind == "train" and "init" not in job.params and "init" in job.inputs:
        job = job.inputs["init"]
    return job.params.get("init") if job.kind == "train" else job.params.get("model")


def _check_fisher_launch(job: Job, seen: set) -> None:
    """``resources.fisher.shard`` and ``fisher.gradient_checkpointing`` need an architecture whose repeated layers
    transformers marks (the unit FSDP shards and checkpointing recomputes), and ``shard`` a closed-form rule for every
    module that owns parameters (gradmatch.fisher.sharded refuses the rest): checked on the architecture alone, built
    on the meta device, before the run, rather than when the job starts hours in. What the architecture cannot tell
    (a model from the hub offline) the job checks itself."""
    from gradmatch.fisher.accumulator import repeated_layers
    from gradmatch.fisher.layers import rule_for
    from gradmatch.models import kind_of, load_config, skeleton

    name = _base_model(job.inputs["model"]) if "model" in job.inputs else None
    key = ("fisher-launch", name, job.params.get("kind"), bool(job.launch.get("shard")))
    if name is None or key in seen:
        return
    seen.add(key)
    try:
        kind = kind_of(name, job.params.get("kind"))
        model = skeleton(load_config(name), kind)
    except Exception:  # noqa: BLE001 - not readable offline, or not buildable on the meta device: the job checks it
        return
    shard = bool(job.launch.get("shard"))
    what = "resources.fisher.shard" if shard else "fisher.gradient_checkpointing"
    if not repeated_layers(model):
        raise UserError(f"{job.name}: {what}: {type(model).__name__} (model {name}) has no repeated layers that "
                        "transformers marks (GradientCheckpointingLayer blocks), which "
                        f"{'FSDP shards' if shard else 'checkpointing recomputes'}; remove it")
    if shard:
        for module_name, module in model.named_modules():
            if any(True for _ in module.parameters(recurse=False)) and rule_for(module) is None:
                raise UserError(f"{job.name}: resources.fisher.shard: module {module_name} ({type(module).__name__}) "
                                f"of model {name} has no closed-form rule for its per-example squares, which a sharded "
                                "Fisher needs for every module that owns parameters; drop shard (processes alone "
                                "share the examples out, each process holding the whole model)")


def _models_named(job: Job) -> list[str]:
    """Models a job names by path, alias or hub id (not those other jobs make)."""
    if job.kind == "pretrained":
        return [job.params["model"]]
    if job.kind == "train" and "init" in job.params:
        return [job.params["init"]]
    return []


# --------------------------------------------------------------------------- estimate


def estimate(jobs: list[Job], done: Callable[[Job], bool]) -> str:
    """A table of the jobs still to run by kind with a rough estimate of their compute, and its basis."""
    counts: Counter[str] = Counter()
    seconds: Counter[str] = Counter()
    unknown: set[str] = set()
    rows_cache: dict[tuple, int | None] = {}
    size_cache: dict[str, float | None] = {}
    for job in jobs:
        if done(job):
            continue
        counts[job.kind] += 1
        cost = _job_seconds(job, rows_cache, size_cache)
        if cost is None:
            unknown.add(job.kind)
        else:
            seconds[job.kind] += cost
    if not counts:
        return "nothing to run"
    lines = [f"  {'kind':<10} {'jobs':>5}  estimate"]
    for kind in ["prepare", "pretrained", "train", "fisher", "gram", "evaluate", "merge", "report"]:
        if counts[kind]:
            lines.append(f"  {kind:<10} {counts[kind]:>5}  {_duration(seconds[kind])}"
                         + (" + jobs without an estimate" if kind in unknown else ""))
    total = sum(seconds.values())
    lines.append(f"  {'total':<10} {sum(counts.values()):>5}  {_duration(total)} of compute, one job at a time"
                 + (" (some jobs without an estimate)" if unknown else ""))
    lines.append(f"rough: from throughput measured on {MACHINE} for a {REFERENCE_PARAMETERS / 1e6:.1f}M-parameter "
                 f"model at length {REFERENCE_LENGTH} (training {RATES['train']:g} examples/s, inference "
                 f"{RATES['infer']:g}/s, Fisher {RATES['fisher']:g}/s, Gram {RATES['gram']:g}/s, generation "
                 f"{RATES['generate']:g} tokens/s), scaled by each model's parameters and the sequence length; "
                 "jobs without a dependency between them run side by side as --cores allows")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds < 60:
        return "< 1 min"
    if seconds < 3600:
        return f"~{math.ceil(seconds / 60)} min"
    return f"~{seconds / 3600:.1f} h"


def _job_seconds(job: Job, rows_cache: dict, size_cache: dict) -> float | None:
    """Seconds of compute ``job`` needs by the rates above (None: unknown, e.g. a model from the hub)."""
    if job.kind in ("prepare", "pretrained", "report"):
        return JOB_SECONDS
    model = _model_of(job)
    if model not in size_cache:
        size_cache[model] = _model_size(model)
    if size_cache[model] is None:
        return None
    size, tokens = size_cache[model]
    scale = size / REFERENCE_PARAMETERS

    def _length(length: int) -> float:  # an image is as long as its patches (+ the class token)
        return (tokens or int(length)) / REFERENCE_LENGTH
    if job.kind == "train":
        settings = job.params["training"]
        rows = _rows(job.inputs["train"], rows_cache)
        if rows is None:
            return None
        epochs = float(settings.get("num_train_epochs", 1.0))
        steps = settings.get("max_steps", -1)
        examples = rows * epochs
        if steps and steps > 0:
            examples = min(examples, steps * settings.get("per_device_train_batch_size", 8)
                           * settings.get("gradient_accumulation_steps", 1))
        return JOB_SECONDS + examples * _length(settings.get("max_input_length", 384)) * scale / RATES["train"]
    if job.kind == "fisher" and job.params.get("data") == "generated":  # generate the sequences, then one pass
        examples, new_tokens = job.params["examples"], job.params.get("max_length", 128)
        return (JOB_SECONDS + examples * new_tokens * scale / RATES["generate"]
                + examples * _length(new_tokens) * scale / RATES["fisher"])
    if job.kind in ("fisher", "gram"):
        rows = _rows(job.inputs["data"], rows_cache)
        if rows is None:
            return None
        limit = job.params.get("max_examples")
        examples = min(rows, limit) if limit else rows
        return JOB_SECONDS + examples * _length(job.params.get("max_length", 128)) * scale / RATES[job.kind]
    if job.kind in ("evaluate", "merge"):
        test_rows = [_rows(j, rows_cache) for role, j in job.inputs.items() if role.startswith("test/")]
        if any(r is None for r in test_rows):
            return None
        one = sum(test_rows) * _length(job.params.get("max_length", 128)) * scale / RATES["infer"]
        lm_eval = job.params.get("lm_eval")
        if lm_eval:  # each document is scored once per choice; shared tasks count only when limit bounds them
            limit = lm_eval.get("limit")
            docs = [_rows(job.inputs[f"test/{task}"], rows_cache) for task in lm_eval.get("tasks") or {}]
            docs = [min(d, limit) if limit else d for d in docs] + [limit or 0] * len(lm_eval.get("shared") or [])
            one += LM_EVAL_CHOICES * sum(docs) * _length(job.params.get("max_length", 128)) * scale / RATES["infer"]
        generation = job.params.get("generation")
        if generation:
            tokens = _prompt_count(generation) * generation.get("num_samples", 1) * generation.get("max_new_tokens", 32)
            one += tokens * scale / RATES["generate"]
        if job.kind == "merge":
            return JOB_SECONDS + len(job.params.get("alphas", [None])) * (one + ALPHA_SECONDS)
        return JOB_SECONDS + one
    return None


def _prompt_count(generation: dict[str, Any]) -> int:
    """How many prompts a generation block names (a file: its non-empty lines)."""
    prompts = generation.get("prompts") or []
    if isinstance(prompts, list):
        return len(prompts)
    try:
        with open(prompts, "rb") as fh:
            return sum(1 for line in fh if line.strip())
    except OSError:
        return 0


def _model_of(job: Job) -> str | None:
    """The model (path, alias or hub id) whose size sets a job's cost: the one it starts from."""
    while True:
        if job.kind == "pretrained":
            return job.params["model"]
        if job.kind == "train":
            if "init" in job.params:
                return job.params["init"]
            job = job.inputs["init"]
        elif job.kind in ("fisher", "gram", "evaluate"):
            job = job.inputs["model"]
        elif job.kind == "merge":
            job = job.inputs["parent"]
        else:
            return None


def _model_size(model: str | None) -> tuple[float, int | None] | None:
    """A model's number of parameters and, for an image model, the tokens an image makes (text: None, the
    configured length counts). None: unknown (e.g. a hub id offline)."""
    from gradmatch.checkpoints import Checkpoint
    from gradmatch.kinds import kind_of_config
    from gradmatch.models import BUILTIN_SPECS, load_config, resolve_model

    if model is None:
        return None
    if model in ALIAS_PARAMETERS:
        return ALIAS_PARAMETERS[model], None
    try:
        config = load_config(model)
        if kind_of_config(config).name == "image-classification":
            size = int(getattr(config, "image_size", 224) or 224) // int(getattr(config, "patch_size", 16) or 16)
            tokens = size * size + 1
        else:
            tokens = None
        if model in BUILTIN_SPECS:  # random weights: the parameters of its architecture
            from gradmatch.models import load_model

            net, _ = load_model(model)
            return float(sum(p.numel() for p in net.parameters())), tokens
        folder = Path(resolve_model(model))
        if not folder.is_dir():
            return None
        return float(sum(info.numel for info in Checkpoint(folder).tensors.values())), tokens
    except UserError:
        return None


def _rows(job: Job, cache: dict) -> int | None:
    """Rows a prepare job writes: its parts' subset sizes, else the local files' lines (None: from the hub)."""
    total = 0
    for part in job.params["parts"]:
        key = (json.dumps(part, sort_keys=True), job.params.get("data_dir"))
        if key not in cache:
            cache[key] = _part_rows(part, job.params.get("data_dir"))
        if cache[key] is None:
            return None
        total += cache[key]
    return total


def _part_rows(part: dict[str, Any], data_dir: str | None) -> int | None:
    from gradmatch.data import DIGITS_DOMAINS, DIGITS_TEST_SIZE, DIGITS_TRAIN_SIZE, data_root, resolve_preset

    if part.get("size"):
        return int(part["size"])
    name, split = part["dataset"], part.get("split", "train")
    base = split.split("[")[0].split("+")[0].strip()
    if name in DIGITS_DOMAINS:
        rows = DIGITS_TRAIN_SIZE if base == "train" else DIGITS_TEST_SIZE
    else:
        preset = resolve_preset(name)
        root = data_root(data_dir)
        folder = root / preset if preset and root is not None else Path(name).expanduser()
        path = folder / f"{base}.jsonl" if folder.is_dir() else folder
        if not path.is_file() or path.suffix != ".jsonl":
            return None
        with open(path, "rb") as fh:
            rows = sum(1 for line in fh if line.strip())
    if "[" in split:
        from datasets import ReadInstruction

        try:
            absolute = ReadInstruction.from_spec(split).to_absolute({base: rows})
            rows = sum(max(0, a.to - a.from_) for a in absolute)
        except (ValueError, AssertionError):
            return None
    if part.get("filter"):
        rows = rows // 2  # a filter on a label keeps about half of a balanced set
    return rows
