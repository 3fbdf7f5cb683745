"""The experiment YAML (`gradmatch run`): parent and child tasks, training and Fisher settings, merges, resources."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from gradmatch.config import Seed, read_config_file, validate
from gradmatch.config.fisher import Estimator
from gradmatch.config.merge import MAX_FACTOR, OUT_DTYPES, parameter_error
from gradmatch.config.run import GenerationSettings
from gradmatch.methods import get_method, method_names

#: Kinds of pipeline job; each gets its own resources.
JOB_KINDS = ("prepare", "pretrained", "train", "fisher", "gram", "evaluate", "merge", "report")
#: Training keys the pipeline sets itself (per job); an experiment may not override them.
_PIPELINE_TRAIN_KEYS = {
    "model_name_or_path", "dataset_name", "dataset_config_name", "dataset_train_split", "dataset_val_split",
    "dataset_test_split", "output_dir", "metric_output_file", "prediction_output_file",
}

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
#: The longest file name (one path component) the file systems a run folder lives on take: 255 bytes on ext4, XFS,
#: Btrfs, ZFS, tmpfs, APFS and NTFS (os.pathconf's PC_NAME_MAX on each).
NAME_MAX = 255
#: The most characters a task, merge or experiment name may have. A name becomes part of longer file names, the
#: longest a job's log, ``logs/seed_<seed>_fisher_child_<name>.<kind>-<16 hex>.log`` (Snakemake's rule name plus
#: the job's hash): 29 characters before the name with a 10-digit seed, 32 after it with the longest kind
#: (``pretrained``), so 255 − 61 = 194 would fit; 128 leaves room for the jobs built around an experiment in Python.
MAX_NAME_LENGTH = 128


def rule_form(name: str) -> str:
    """What a name becomes as a Snakemake rule (and in each job's log file name): every character other than a
    letter, digit or ``_`` (``/``, ``-``, ``.``) becomes ``_``."""
    return re.sub(r"\W", "_", name)


def name_key(name: str) -> str:
    """Two names are one downstream when their keys are equal: the same rule form, ignoring case (folders that
    differ only in case are one folder on macOS's and Windows' file systems)."""
    return rule_form(name).casefold()


def name_clash(names: Iterable[str]) -> tuple[str, str] | None:
    """The first two of ``names`` that are one name downstream (equal, or equal :func:`name_key`), or None."""
    seen: dict[str, str] = {}
    for name in names:
        key = name_key(name)
        if key in seen:
            return seen[key], name
        seen[key] = name
    return None


def _clash_with(name: str, others: Iterable[str]) -> tuple[str, str] | None:
    """``(other, name)`` for the first of ``others`` that is one name with ``name`` downstream, or None."""
    return next(((other, name) for other in others if name_key(other) == name_key(name)), None)


def clash_message(what: str, pair: tuple[str, str]) -> str:
    first, second = pair
    if first == second:
        return f"{what} must be unique; repeated: {first}"
    return (f"{what} must be unique as Snakemake rules and folders: {first!r} and {second!r} differ only in "
            "'-', '_', '.' or case; rename one")


def _check_name(value: str, what: str) -> str:
    if not _NAME_RE.match(value):
        raise ValueError(f"{what} may hold only letters, digits, '_', '.' and '-' (it names a folder)")
    if len(value) > MAX_NAME_LENGTH:
        raise ValueError(f"{what} has {len(value)} characters; at most {MAX_NAME_LENGTH} (it becomes part of file "
                         f"names, which file systems cap at {NAME_MAX} bytes)")
    return value
#: An lm-evaluation-harness task name (its registry's names: letters, digits, ``_``, ``-``, ``.``).
_LM_TASK_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _lm_task_name(value: str) -> str:
    if not _LM_TASK_RE.match(value):
        raise ValueError(f"{value!r} is not an lm-eval task name (letters, digits, '_', '.' and '-')")
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _check_training_overrides(value: dict[str, Any]) -> dict[str, Any]:
    bad = sorted(set(value) & _PIPELINE_TRAIN_KEYS)
    if bad:
        raise ValueError(f"{', '.join(bad)} is set by the pipeline for each job and cannot be given here")
    if "save_hessian" in value:
        raise ValueError("save_hessian is set by the pipeline: give the experiment's top-level hessian: adam or ivon")
    if "prompt" in value:
        raise ValueError("prompt is set by the pipeline: name the task's lm-eval task with the task's lm_eval: NAME")
    return value


#: Train-config keys each ``hessian:`` source adds to every training job of a model the run trains.
HESSIAN_TRAINING: dict[str, dict[str, str]] = {
    "fisher": {}, "adam": {"save_hessian": "adam"}, "ivon": {"optimizer_name": "IVON", "save_hessian": "ivon"}}


class DataPart(_Strict):
    """A slice of one data set: ``dataset`` + ``split`` (split syntax), its rows filtered by column values
    (``filter: {label: 0}``), optionally a seeded subset of ``size``."""

    dataset: str
    config_name: str | None = None
    split: str = "train"
    filter: dict[str, Any] | None = None
    size: int | None = Field(default=None, gt=0)


class TaskConfig(_Strict):
    """One task: its data set, training and test splits, subset sizes and training overrides."""

    name: str
    dataset: str
    config_name: str | None = None
    train_split: str = "train"
    test_split: str = "test"
    train_size: int | None = Field(default=None, gt=0, description="seeded random subset of the training split")
    test_size: int | None = Field(default=None, gt=0, description="seeded random subset of the test split")
    filter: dict[str, Any] | None = Field(default=None, description="keep only rows whose column holds the value "
                                          "(or one of a list), in both splits: {label: 0}")
    extra_train: list[DataPart] = Field(default_factory=list, description="more training data mixed in")
    training: dict[str, Any] = Field(default_factory=dict, description="overrides of the shared training settings")
    finetune: bool = Field(default=True, description="parent only: false takes the model as it is (a pretrained "
                           "base); its task then serves its Fisher and its evaluation")
    hessian_scale: float | None = Field(default=None, gt=0, le=1e30,
                                        description="N for this model's Hessian (default: its training-set size)")
    lm_eval: str | None = Field(default=None, description="causal LMs: the lm-evaluation-harness task that judges "
                                "every model on this task, its documents this task's prepared test rows; the task's "
                                "model is trained on that task's prompt template")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return _check_name(value, "a task name")

    _lm_eval = field_validator("lm_eval")(classmethod(lambda cls, v: v if v is None else _lm_task_name(v)))

    _training = field_validator("training")(classmethod(lambda cls, v: _check_training_overrides(v)))

    def train_parts(self) -> list[DataPart]:
        own = DataPart(dataset=self.dataset, config_name=self.config_name, split=self.train_split, filter=self.filter,
                       size=self.train_size)
        return [own, *self.extra_train]

    def test_parts(self) -> list[DataPart]:
        return [DataPart(dataset=self.dataset, config_name=self.config_name, split=self.test_split, filter=self.filter,
                         size=self.test_size)]


class ClassifierTask(TaskConfig):
    """The attribute classifier that scores generations, trained in the run on its own task."""

    name: str = "attribute-classifier"
    model: str = Field(default="minilm", description="its starting point (a text model)")


class FisherSettings(_Strict):
    """How each Fisher job estimates a diagonal Fisher: on that model's own training data (``data: split``), or
    data-free on sequences a causal LM samples itself (``data: generated``)."""

    estimator: Estimator = "sampled"
    max_examples: int | None = Field(default=200, gt=0)
    batch_size: int = Field(default=16, gt=0)
    max_length: int = Field(default=128, gt=0, description="tokens per example; with data: generated, the new "
                            "tokens each generated sequence has")
    data: Literal["split", "generated"] = Field(
        default="split", description="split: the model's own training data; generated: sequences sampled from the "
        "model itself (causal LMs; no data set read)")
    examples: int = Field(default=200, gt=0, description="data: generated: how many sequences are generated "
                          "(max_examples applies to a split)")
    out_dtype: Literal[OUT_DTYPES] | None = Field(  # type: ignore[valid-type]
        default=None, description="the dtype each Fisher is stored in (sums are float32 whatever it is; default "
        "bfloat16 for a bfloat16 model, else float32): gradmatch fisher --out-dtype")
    gradient_checkpointing: bool = Field(
        default=False, description="recompute each repeated layer's activations in backward (less memory, about one "
        "more forward pass of time; the same Fisher): gradmatch fisher --gradient-checkpointing. How a job runs, "
        "not what it computes: it does not enter the job's hash")

    @model_validator(mode="after")
    def _generated_keys(self):
        if self.data == "generated" and self.estimator != "sampled":
            raise ValueError(f"data: generated samples the sequences from the model, so estimator {self.estimator} "
                             "does not apply (remove it)")
        return self

    def job_params(self) -> dict[str, Any]:
        """What a Fisher job's parameters (and hash) hold: for a split, exactly what they held before ``data:``,
        ``out_dtype`` and ``gradient_checkpointing`` existed, so the Fisher jobs of earlier runs keep their folders
        (``out_dtype`` enters only when given: it changes the files; ``gradient_checkpointing`` never does)."""
        if self.data == "generated":
            return self.generated_params()
        return {**self.model_dump(exclude={"data", "examples", "out_dtype", "gradient_checkpointing"}),
                **self._dtype()}

    def generated_params(self) -> dict[str, Any]:
        """The parameters of a data-free Fisher job (``data: generated``, or a merge's ``base_hessian: generated``)."""
        return {"data": "generated", "examples": self.examples, "batch_size": self.batch_size,
                "max_length": self.max_length, **self._dtype()}

    def _dtype(self) -> dict[str, Any]:
        return {"out_dtype": self.out_dtype} if self.out_dtype is not None else {}


class GramSettings(_Strict):
    """How each child's Gram matrices (RegMean's statistics) are computed (on its own training data)."""

    max_examples: int | None = Field(default=200, gt=0)
    batch_size: int = Field(default=16, gt=0)
    max_length: int = Field(default=128, gt=0)


class MergeSpec(_Strict):
    """One merge method to compare, at each α in ``alphas`` (the same α for every child)."""

    method: str
    alphas: list[float] = Field(default_factory=lambda: [1.0], min_length=1)
    parameters: dict[str, Any] = Field(default_factory=dict)
    name: str | None = Field(default=None, description="label in the report (default: the method)")
    base_hessian_scale: float | None = Field(default=None, gt=0, le=1e30,
                                             description="N_0 for this merge (default: the parent task's hessian_scale, "
                                             "else the parent's training-set size)")
    base_hessian: Literal["fisher", "prior", "generated"] = Field(
        default="fisher", description="H_0: the parent's Hessian (as `hessian:` and `fisher:` say), the isotropic prior "
        "N_0·c·I (docs/merge.md), or the parent's data-free Fisher on sequences it samples itself (a causal LM; "
        "the fisher block's examples, max_length and batch_size)")
    keep_models: bool = Field(default=False, description="keep every merged model on disk, not only its metrics")

    @field_validator("method")
    @classmethod
    def _method(cls, value: str) -> str:
        if value not in method_names():
            raise ValueError(f"unknown merge method {value!r} (choose from {', '.join(method_names())})")
        return value

    @field_validator("alphas")
    @classmethod
    def _alphas(cls, value: list[float]) -> list[float]:
        if len(set(value)) != len(value):
            raise ValueError("alphas must not repeat")
        return [float(v) for v in value]

    @model_validator(mode="after")
    def _check_parameters(self):
        """The method's parameters and the α values are checked now, not when the merge job runs hours later
        (parameters are kept as given: they enter the job's hash)."""
        problem = parameter_error(self.method, self.parameters)
        if problem:
            raise ValueError(problem)
        method = get_method(self.method)
        for alpha in self.alphas:
            if not abs(alpha) <= MAX_FACTOR:
                raise ValueError(f"alpha {alpha} must be a finite number of magnitude at most {MAX_FACTOR:g}")
            if not method.signed_weights and alpha <= 0:
                raise ValueError(f"{self.method} takes positive weights, not alpha {alpha}")
        return self

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str | None) -> str | None:
        return value if value is None else _check_name(value, "a merge name")  # it names merges/<name> of the run

    @property
    def label(self) -> str:
        return self.name or self.method


class Resources(_Strict):
    """What one job asks the executor for (on SLURM: --cpus-per-task, --mem, --time, --gpus) and, for a Fisher job,
    how many processes it runs as (torchrun, on one node) and whether they shard the model (FSDP2)."""

    threads: int = Field(default=1, gt=0, description="per process")
    mem_mb: int = Field(default=4000, gt=0, description="the whole job's, all its processes together")
    runtime: int = Field(default=60, gt=0, description="minutes")
    gpus: int = Field(default=0, ge=0)
    processes: int = Field(default=1, ge=1, description="fisher jobs: processes torchrun starts on one node "
                           "(data-parallel; the same Fisher as one process)")
    shard: bool = Field(default=False, description="fisher jobs with processes ≥ 2: each process holds 1/processes "
                        "of the model and of the sums (gradmatch fisher --shard)")

    @property
    def cpus(self) -> int:
        """The CPUs the job asks for: ``threads`` for each of its processes (Snakemake's threads, SLURM's
        --cpus-per-task of its one task)."""
        return self.threads * self.processes


#: Resource keys only a Fisher job can use (its torchrun launch); any other kind, and ``default``, refuses them.
FISHER_ONLY_RESOURCES = ("processes", "shard")


class _PartialResources(_Strict):
    threads: int | None = Field(default=None, gt=0)
    mem_mb: int | None = Field(default=None, gt=0)
    runtime: int | None = Field(default=None, gt=0)
    gpus: int | None = Field(default=None, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _fisher_only(cls, data):
        if isinstance(data, dict):
            given = [key for key in FISHER_ONLY_RESOURCES if key in data and key not in cls.model_fields]
            if given:
                raise ValueError(f"{given[0]} applies to fisher jobs only (resources.fisher.{given[0]}): the other "
                                 "jobs run as one process")
        return data


class _FisherResources(_PartialResources):
    processes: int | None = Field(default=None, ge=1)
    shard: bool | None = None


#: Built-in resources per kind of job (under what an experiment's ``resources`` says).
DEFAULT_JOB_RESOURCES: dict[str, dict[str, int]] = {
    "prepare": {"mem_mb": 2000, "runtime": 30},
    "pretrained": {"mem_mb": 4000, "runtime": 30},
    "train": {"threads": 2, "mem_mb": 8000, "runtime": 240},
    "fisher": {"threads": 2, "mem_mb": 8000, "runtime": 120},
    "gram": {"threads": 2, "mem_mb": 8000, "runtime": 60},
    "evaluate": {"threads": 2, "mem_mb": 6000, "runtime": 60},
    "merge": {"threads": 2, "mem_mb": 8000, "runtime": 120},
    "report": {"mem_mb": 2000, "runtime": 10},
}


class ResourcesConfig(_Strict):
    """Resources per kind of job. Precedence, lowest first: built-in ``Resources()`` defaults, the
    built-in per-kind defaults (:data:`DEFAULT_JOB_RESOURCES`), the experiment's ``default``, its per-kind entry.
    ``processes`` and ``shard`` are the fisher entry's alone."""

    default: _PartialResources = Field(default_factory=_PartialResources)
    prepare: _PartialResources = Field(default_factory=_PartialResources)
    pretrained: _PartialResources = Field(default_factory=_PartialResources)
    train: _PartialResources = Field(default_factory=_PartialResources)
    fisher: _FisherResources = Field(default_factory=_FisherResources)
    gram: _PartialResources = Field(default_factory=_PartialResources)
    evaluate: _PartialResources = Field(default_factory=_PartialResources)
    merge: _PartialResources = Field(default_factory=_PartialResources)
    report: _PartialResources = Field(default_factory=_PartialResources)

    def for_kind(self, kind: str) -> Resources:
        values = Resources().model_dump()
        values.update(DEFAULT_JOB_RESOURCES[kind])
        for given in (self.default, getattr(self, kind)):
            values.update({k: v for k, v in given.model_dump().items() if v is not None})
        return Resources(**values)

    @model_validator(mode="after")
    def _fisher_launch(self):
        """A Fisher job's processes, shard and GPUs fit together (each process takes one GPU: cuda:LOCAL_RANK)."""
        fisher = self.for_kind("fisher")
        if fisher.shard and fisher.processes < 2:
            raise ValueError("fisher.shard: true shares each Fisher job's model out over its processes: set "
                             "fisher.processes to 2 or more (one process holds the whole model either way)")
        if fisher.processes > 1 and fisher.gpus not in (0, fisher.processes):
            raise ValueError(f"fisher.gpus: {fisher.gpus} with fisher.processes: {fisher.processes}: each process of a "
                             f"Fisher job uses one GPU of its own (cuda:LOCAL_RANK); set gpus to {fisher.processes}, "
                             "or to 0 to run on CPUs")
        return self


class MultitaskConfig(_Strict):
    """The multitask baseline: the parent fine-tuned on every child's training data at once."""

    enabled: bool = True
    training: dict[str, Any] = Field(default_factory=dict)

    _training = field_validator("training")(classmethod(lambda cls, v: _check_training_overrides(v)))


class ExperimentLmEval(_Strict):
    """lm-evaluation-harness tasks every model of a causal-LM run is judged on, beside each task's own ``lm_eval``
    task; and the settings of every harness call (gradmatch.harness.evaluate_tasks)."""

    tasks: list[str] = Field(default_factory=list, description="shared tasks, each on its own data (the task's "
                             "data files, or the data root); shown as their own columns, not in the average")
    include_path: str | None = Field(default=None, description="a folder of task YAML files beside the built-in "
                                     "ones (it serves the tasks' lm_eval names too)")
    num_fewshot: int | None = Field(default=0, ge=0, description="examples in each context (null: each task's "
                                    "default)")
    batch_size: int = Field(default=16, gt=0)
    limit: int | None = Field(default=None, gt=0, description="at most this many documents per task")

    @field_validator("tasks")
    @classmethod
    def _names(cls, value: list[str]) -> list[str]:
        for name in value:
            _lm_task_name(name)
        if len(set(value)) != len(value):
            raise ValueError("tasks must not repeat")
        return value


class EvaluationSettings(_Strict):
    """How every model is evaluated on every task's test split (and, for causal LMs, on prompts and lm-eval
    tasks)."""

    batch_size: int = Field(default=64, gt=0)
    max_length: int = Field(default=128, gt=0)
    generation: GenerationSettings | None = Field(
        default=None, description="causal LMs: continuations of prompts, scored by the attribute classifier")
    fluency_task: str | None = Field(default=None, description="the task whose perplexity measures fluency in the "
                                     "trade-off plot (default: the parent's)")
    lm_eval: ExperimentLmEval | None = Field(default=None, description="causal LMs: lm-eval tasks every model is "
                                           "judged on, and the harness's settings")

    @field_validator("generation")
    @classmethod
    def _pipeline_sets(cls, value):
        if value is not None and (value.classifier or value.output_file):
            raise ValueError("classifier and output_file are set by the pipeline (give attribute_classifier instead)")
        return value


class ExperimentConfig(_Strict):
    """An experiment: parent task, child tasks, training/Fisher settings, merges to compare, resources."""

    name: str = "experiment"
    seed: Seed = 0
    seeds: list[Seed] | None = Field(default=None, min_length=1, description="run everything once per seed; the "
                                    "report gives mean ± sd over seeds and paired differences (instead of seed)")
    model: str = Field(description="the parent's starting point: a model folder, hub id, alias or built-in spec")
    kind: str | None = Field(default=None, description="kind of every model of the run (default: from the model)")
    parent: TaskConfig
    children: list[TaskConfig] = Field(min_length=1)
    attribute_classifier: ClassifierTask | None = Field(
        default=None, description="a text classifier trained in the run that scores generations (evaluation.generation)")
    training: dict[str, Any] = Field(default_factory=dict, description="shared training settings (train config keys)")
    hessian: Literal["fisher", "adam", "ivon"] = Field(
        default="fisher", description="where each model's Hessian comes from: a Fisher job (the fisher block); adam: "
        "every model the run trains saves AdamW's estimate (save_hessian: adam); ivon: every model the run trains is "
        "trained with IVON and saves its Hessian. A parent taken as it is always gets a Fisher job")
    fisher: FisherSettings = Field(default_factory=FisherSettings)
    gram: GramSettings = Field(default_factory=GramSettings)
    merges: list[MergeSpec] = Field(default_factory=list)
    multitask: MultitaskConfig = Field(default_factory=MultitaskConfig)
    evaluation: EvaluationSettings = Field(default_factory=EvaluationSettings)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)

    _training = field_validator("training")(classmethod(lambda cls, v: _check_training_overrides(v)))

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        return _check_name(value, "an experiment name")  # it names the default run folder runs/<name>

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and len(set(value)) != len(value):
            raise ValueError("seeds must not repeat")
        return value

    @property
    def run_seeds(self) -> list[int]:
        """The seeds the experiment runs with: ``seeds``, else the one ``seed``."""
        return list(self.seeds) if self.seeds else [self.seed]

    @field_validator("multitask", mode="before")
    @classmethod
    def _multitask_bool(cls, value):
        return {"enabled": value} if isinstance(value, bool) else value

    @model_validator(mode="after")
    def _unique(self):
        self._check_names()
        self._resolve_paths(Path.cwd())
        if self.seeds is not None and "seed" in self.model_fields_set and self.seed not in self.seeds:
            raise ValueError(f"give seed (one run) or seeds (several), not both (seed {self.seed}, seeds {self.seeds})")
        self._check_lm_eval()
        self._check_training()
        self._check_roles()
        self._check_sharded_fisher()
        return self

    def _check_sharded_fisher(self) -> None:
        """``resources.fisher.shard`` applies to every Fisher job, and a data-free one cannot be sharded: sampling
        needs the whole model in each process (gradmatch fisher --data generated refuses --shard)."""
        if not self.resources.for_kind("fisher").shard:
            return
        why = ("a data-free Fisher job samples its sequences with the whole model in each process, so it cannot be "
               "sharded (drop shard: processes alone share the sequences out)")
        if self.fisher.data == "generated":
            raise ValueError(f"resources.fisher.shard: true with fisher.data: generated: {why}")
        for spec in self.merges:
            if spec.base_hessian == "generated" and get_method(spec.method).uses_parent_hessian:
                raise ValueError(f"resources.fisher.shard: true with merges: {spec.label}: base_hessian: generated, "
                                 f"whose H_0 is a data-free Fisher job (fisher/parent-generated): {why}")

    def _check_names(self) -> None:
        """Names that become one Snakemake rule or one folder of the run are refused (:func:`name_key`): tasks
        among themselves and against the models the pipeline names itself, merges among themselves. The job
        graph checks every job's name the same way before anything runs (graph.check_job_names)."""
        tasks = [t.name for t in self.tasks]
        clash = name_clash(tasks)
        if clash:
            raise ValueError(clash_message("task names", clash))
        own = ["parent", *(["multitask"] if self.multitask.enabled else [])]  # models/, eval/, data/multitask-train
        for task in self.tasks:
            if _clash_with(task.name, own[1:]):
                raise ValueError(f"task {task.name!r}: the multitask model's data is data/multitask-train, and this "
                                 "task's would be too: rename the task (or set multitask: false)")
        if self.attribute_classifier is not None:  # models/<name>, eval/<name> beside models/child-<t>, models/parent
            clash = _clash_with(self.attribute_classifier.name, [*own, *tasks, *(f"child-{t}" for t in tasks[1:])])
            if clash:
                raise ValueError(f"attribute_classifier.name {clash[1]!r}: the run already names a model or task "
                                 f"{clash[0]!r} (models/<name>, eval/<name>), equal up to '-', '_', '.' or case; "
                                 "rename the classifier")
        clash = name_clash(m.label for m in self.merges)
        if clash:
            raise ValueError(clash_message("merge names (set `name:` to tell them apart)", clash))

    def _resolve_paths(self, base: Path) -> None:
        """Every local path the experiment names, made absolute against ``base`` (the current directory) once, when
        the experiment is read: the checks before a run, the dry run and every job (which runs in the run folder,
        on a node of a cluster perhaps) see the same file. Names that are not paths (presets, aliases, built-in
        models, hub ids) stay as they are."""
        from gradmatch.data import DIGITS_DOMAINS, resolve_preset
        from gradmatch.models import BUILTIN_SPECS, MODEL_ALIASES

        def data(name: str) -> str:
            return name if name in DIGITS_DOMAINS or resolve_preset(name) is not None else local_path(name, base)

        def model(name: str) -> str:
            return name if name in MODEL_ALIASES or name in BUILTIN_SPECS else local_path(name, base)

        def training(block: dict[str, Any]) -> dict[str, Any]:
            if isinstance(block.get("cache_dir"), str) and block["cache_dir"]:
                return {**block, "cache_dir": local_path(block["cache_dir"], base, always=True)}
            return block

        self.model = model(self.model)
        self.training = training(self.training)
        self.multitask.training = training(self.multitask.training)
        tasks = self.tasks + ([self.attribute_classifier] if self.attribute_classifier is not None else [])
        for task in tasks:
            task.dataset = data(task.dataset)
            task.training = training(task.training)
            for part in task.extra_train:
                part.dataset = data(part.dataset)
        if self.attribute_classifier is not None:
            self.attribute_classifier.model = model(self.attribute_classifier.model)
        generation = self.evaluation.generation
        if generation is not None and isinstance(generation.prompts, str):
            generation.prompts = local_path(generation.prompts, base, always=True)
        if self.evaluation.lm_eval is not None and self.evaluation.lm_eval.include_path:
            self.evaluation.lm_eval.include_path = local_path(self.evaluation.lm_eval.include_path, base, always=True)

    def _check_roles(self) -> None:
        from gradmatch.kinds import kind_names

        if self.kind is not None and self.kind not in kind_names():
            raise ValueError(f"kind: unknown kind {self.kind!r} (choose from {', '.join(kind_names())})")
        for child in self.children:
            if not child.finetune:
                raise ValueError(f"children: {child.name}: finetune: false applies to the parent only")
        if not self.parent.finetune and self.parent.training:
            raise ValueError("parent: a parent with finetune: false is not trained; remove its training overrides")
        names = [t.name for t in self.tasks]
        fluency = self.evaluation.fluency_task
        if fluency is not None and fluency not in names:
            raise ValueError(f"evaluation.fluency_task: {fluency!r} is not a task ({', '.join(names)})")
        if self.attribute_classifier is not None and self.attribute_classifier.name in names:
            raise ValueError(f"attribute_classifier: its name {self.attribute_classifier.name!r} is also a task's")
        if self.attribute_classifier is not None and self.evaluation.generation is None:
            raise ValueError("attribute_classifier scores generations: add evaluation.generation (its prompts)")
        for spec in self.merges:
            if (get_method(spec.method).uses_parent_hessian and not self.parent.finetune
                    and spec.base_hessian in ("fisher", "generated")
                    and spec.base_hessian_scale is None and self.parent.hessian_scale is None):
                raise ValueError(f"merges: {spec.label} needs N_0, the scale of the parent's Hessian, and a parent "
                                 "that is not fine-tuned has no training-set size: set parent.hessian_scale "
                                 "(or the merge's base_hessian_scale)")

    def _check_lm_eval(self) -> None:
        """Each lm-eval task judges one thing: a task's own (on its test rows) or a shared one (on its own data)."""
        if self.attribute_classifier is not None and self.attribute_classifier.lm_eval is not None:
            raise ValueError("attribute_classifier: lm_eval judges the run's causal LMs, not its classifier")
        owners: dict[str, str] = {}
        for task in self.tasks:
            if task.lm_eval is None:
                continue
            if task.lm_eval in owners:
                raise ValueError(f"{task.name}.lm_eval: {task.lm_eval} already judges task {owners[task.lm_eval]} "
                                 "(its documents are one task's test rows)")
            owners[task.lm_eval] = task.name
        shared = self.evaluation.lm_eval.tasks if self.evaluation.lm_eval is not None else []
        if self.evaluation.lm_eval is not None and not shared and not owners:
            raise ValueError("evaluation.lm_eval names no lm-eval task: list shared ones under its tasks, or give a "
                             "task lm_eval: NAME")
        for name in shared:
            if name in owners:
                raise ValueError(f"evaluation.lm_eval.tasks: {name} is task {owners[name]}'s lm_eval (on its test "
                                 "rows); a shared task is read from its own data: list it once")
        named = [f"{c.name}: {c.lm_eval}" for c in self.children if c.lm_eval is not None]
        if named and self.multitask.enabled:
            raise ValueError(f"multitask: children name lm_eval tasks ({', '.join(named)}), whose models are trained "
                             "on each task's prompt template; a multitask model would need one template per row "
                             "(set multitask: false)")

    def lm_eval_tasks(self) -> dict[str, str]:
        """The run's own lm-eval tasks: each task's name → the lm-eval task judging it (tasks that name one)."""
        return {t.name: t.lm_eval for t in self.tasks if t.lm_eval is not None}

    @property
    def lm_eval_include_path(self) -> str | None:
        """``evaluation.lm_eval.include_path`` (absolute: every path is, once the experiment is read)."""
        given = self.evaluation.lm_eval.include_path if self.evaluation.lm_eval is not None else None
        return given or None

    def prompt_training(self, task: TaskConfig) -> dict[str, Any]:
        """Train-config keys a trained task's model gets from its ``lm_eval``: trained on that lm-eval task's own
        prompt template (context: its doc_to_text; target: the correct choice)."""
        if task.lm_eval is None or not task.finetune:
            return {}
        return {"prompt": {"task": task.lm_eval, "include_path": self.lm_eval_include_path}}

    def _check_training(self) -> None:
        """Every training job's settings (with what ``hessian:`` adds) are a valid train config now, before anything
        has run."""
        from gradmatch.config.run import load_train_config
        from gradmatch.errors import UserError

        placeholders = {"model_name_or_path": "-", "dataset_name": "-", "output_dir": "-"}
        where = [("training", {})] + [(f"{t.name}.training", {**t.training, **self.prompt_training(t)})
                                      for t in self.tasks]
        where.append(("multitask.training", self.multitask.training))
        if self.hessian != "fisher":
            wanted = "IVON" if self.hessian == "ivon" else "AdamW"
            optimizers = {"adamw": "AdamW", "adamwtorch": "AdamW", "ivon": "IVON"}
            for key, block in [("training", self.training), *where[1:]]:
                given = block.get("optimizer_name", block.get("optim"))
                known = optimizers.get(str(given).lower().replace("_", ""))
                if known is not None and known != wanted:  # an unknown name: the train config's own error below
                    raise ValueError(f"{key}.optimizer_name: {given} does not hold the Hessian estimate hessian: "
                                     f"{self.hessian} reads; every model the run trains uses {wanted} "
                                     "(or set hessian: fisher)")
                if block.get("lora") is not None:
                    raise ValueError(f"{key}.lora: hessian: {self.hessian} reads the optimizer's state, which covers "
                                     "the adapters only, not the full weights a merge reads (set hessian: fisher)")
        saved = HESSIAN_TRAINING[self.hessian]
        notes = logging.getLogger("gradmatch.config")  # keys ignored with a note: noted when the job runs
        level = notes.level
        notes.setLevel(logging.ERROR)
        try:
            for key, overrides in where:
                try:
                    load_train_config({"seed": self.seed, **self.training, **overrides, **saved, **placeholders})
                except UserError as exc:
                    raise ValueError(f"{key}: {str(exc).replace('train config: ', '', 1)}") from None
        finally:
            notes.setLevel(level)

    @property
    def tasks(self) -> list[TaskConfig]:
        return [self.parent, *self.children]


def local_path(value: str, base: Path, *, always: bool = False) -> str:
    """``value`` as an absolute path against ``base`` when it is a path: ``always``, or when it names a file or
    folder there, or when it clearly is one (starts with ``.``, ``/`` or ``~``, has more than one ``/``, or ends in
    a data file's suffix — what gradmatch.data and gradmatch.models take for a path that must exist). Anything else
    (a hub id ``owner/name``) is kept. An absolute path is kept as given; ``..`` and symbolic links are left for the
    operating system to follow, as it would have from ``base``."""
    path = Path(value).expanduser()
    if path.is_absolute():
        return str(path)
    looks_like_path = (value.startswith((".", "~")) or value.count("/") > 1
                       or path.suffix.lower() in (".json", ".jsonl", ".csv", ".txt", ".parquet"))
    if always or looks_like_path or (base / path).exists():
        return os.path.join(base, path) if str(path) != "." else str(base)
    return value


def load_experiment(source: str | Path | dict[str, Any]) -> ExperimentConfig:
    """Validate an experiment from a YAML/JSON file or a dict; bad input raises one-line UserError."""
    if isinstance(source, ExperimentConfig):
        return source
    data = source if isinstance(source, dict) else read_config_file(source)
    return validate(ExperimentConfig, data, source if not isinstance(source, dict) else "experiment")
