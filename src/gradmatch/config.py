"""Pydantic schemas of every file a user writes: merge, train/evaluate, Fisher and experiment configs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gradmatch.errors import UserError


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a JSON or YAML mapping (by extension; YAML otherwise), failing with one clear line."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"config file {path} does not exist")
    if path.is_dir():
        raise UserError(f"config file {path} is a folder")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read config file {path}: {exc}") from exc
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:  # json.JSONDecodeError, yaml.YAMLError
        detail = " ".join(str(exc).split())
        raise UserError(f"config file {path} is not valid {'JSON' if path.suffix.lower() == '.json' else 'YAML'}: {detail}") from exc
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of keys to values, not {type(data).__name__}")
    return data


def validation_message(exc, source: str | Path) -> str:
    """One line from a pydantic ValidationError: the first problem, its key path and the file."""
    errors = exc.errors()
    first = errors[0]
    loc = ".".join(str(part) for part in first.get("loc", ())) or "(top level)"
    msg = first.get("msg", "invalid value")
    if first.get("type") == "extra_forbidden":
        msg = "unknown key"
    more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    return f"{source}: {loc}: {msg}{more}"


# =========================================================================== merge configs
# (owned by the merge engine: MergeConfig and friends)


# =========================================================================== train / evaluate configs
# (owned by train.py / evaluate.py: TrainConfig, EvaluateConfig)


# =========================================================================== experiment configs
# (owned by the pipeline: ExperimentConfig)

#: Merge methods an experiment may compare (the merge engine's registry names).
EXPERIMENT_MERGE_METHODS = ("gradient_matching", "task_arithmetic", "average", "fisher_average", "ties", "dare")
#: Kinds of pipeline job; each gets its own resources.
JOB_KINDS = ("prepare", "train", "fisher", "evaluate", "merge", "report")
#: Training keys the pipeline sets itself (per job); an experiment may not override them.
_PIPELINE_TRAIN_KEYS = {
    "model_name_or_path", "dataset_name", "dataset_config_name", "dataset_train_split", "dataset_val_split",
    "dataset_test_split", "output_dir", "metric_output_file", "prediction_output_file",
}

import re as _re  # noqa: E402
from typing import Literal as _Literal  # noqa: E402

from pydantic import BaseModel as _BaseModel, ConfigDict as _ConfigDict, Field as _Field  # noqa: E402
from pydantic import ValidationError as _ValidationError, field_validator as _field_validator  # noqa: E402
from pydantic import model_validator as _model_validator  # noqa: E402

_NAME_RE = _re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class _Strict(_BaseModel):
    model_config = _ConfigDict(extra="forbid")


def _check_training_overrides(value: dict[str, Any]) -> dict[str, Any]:
    bad = sorted(set(value) & _PIPELINE_TRAIN_KEYS)
    if bad:
        raise ValueError(f"{', '.join(bad)} is set by the pipeline for each job and cannot be given here")
    return value


class DataPart(_Strict):
    """A slice of one data set: ``dataset`` + ``split`` (split syntax), optionally a seeded subset of ``size``."""

    dataset: str
    config_name: str | None = None
    split: str = "train"
    size: int | None = _Field(default=None, gt=0)


class TaskConfig(_Strict):
    """One task: its data set, training and test splits, subset sizes and training overrides."""

    name: str
    dataset: str
    config_name: str | None = None
    train_split: str = "train"
    test_split: str = "test"
    train_size: int | None = _Field(default=None, gt=0, description="seeded random subset of the training split")
    test_size: int | None = _Field(default=None, gt=0, description="seeded random subset of the test split")
    extra_train: list[DataPart] = _Field(default_factory=list, description="more training data mixed in")
    training: dict[str, Any] = _Field(default_factory=dict, description="overrides of the shared training settings")

    @_field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME_RE.match(value):
            raise ValueError("a task name may hold only letters, digits, '_', '.' and '-'")
        return value

    _training = _field_validator("training")(classmethod(lambda cls, v: _check_training_overrides(v)))

    def train_parts(self) -> list[DataPart]:
        own = DataPart(dataset=self.dataset, config_name=self.config_name, split=self.train_split, size=self.train_size)
        return [own, *self.extra_train]

    def test_parts(self) -> list[DataPart]:
        return [DataPart(dataset=self.dataset, config_name=self.config_name, split=self.test_split, size=self.test_size)]


class FisherSettings(_Strict):
    """How each model's diagonal Fisher is estimated (on that model's own training data)."""

    estimator: _Literal["sampled", "empirical"] = "sampled"
    max_examples: int | None = _Field(default=200, gt=0)
    batch_size: int = _Field(default=16, gt=0)
    max_length: int = _Field(default=128, gt=0)


class MergeSpec(_Strict):
    """One merge method to compare, at each α in ``alphas`` (the same α for every child)."""

    method: str
    alphas: list[float] = _Field(default_factory=lambda: [1.0], min_length=1)
    parameters: dict[str, Any] = _Field(default_factory=dict)
    name: str | None = _Field(default=None, description="label in the report (default: the method)")
    keep_models: bool = _Field(default=False, description="keep every merged model on disk, not only its metrics")

    @_field_validator("method")
    @classmethod
    def _method(cls, value: str) -> str:
        if value not in EXPERIMENT_MERGE_METHODS:
            raise ValueError(f"unknown merge method {value!r} (choose from {', '.join(EXPERIMENT_MERGE_METHODS)})")
        return value

    @_field_validator("alphas")
    @classmethod
    def _alphas(cls, value: list[float]) -> list[float]:
        if len(set(value)) != len(value):
            raise ValueError("alphas must not repeat")
        return [float(v) for v in value]

    @property
    def label(self) -> str:
        return self.name or self.method


class Resources(_Strict):
    """What one job asks the executor for (on SLURM: --cpus-per-task, --mem, --time, --gpus)."""

    threads: int = _Field(default=1, gt=0)
    mem_mb: int = _Field(default=4000, gt=0)
    runtime: int = _Field(default=60, gt=0, description="minutes")
    gpus: int = _Field(default=0, ge=0)


class _PartialResources(_Strict):
    threads: int | None = _Field(default=None, gt=0)
    mem_mb: int | None = _Field(default=None, gt=0)
    runtime: int | None = _Field(default=None, gt=0)
    gpus: int | None = _Field(default=None, ge=0)


class ResourcesConfig(_Strict):
    """Resources per kind of job; each kind falls back to ``default`` key by key."""

    default: Resources = _Field(default_factory=Resources)
    prepare: _PartialResources = _Field(default_factory=lambda: _PartialResources(mem_mb=2000, runtime=30))
    train: _PartialResources = _Field(default_factory=lambda: _PartialResources(threads=2, mem_mb=8000, runtime=240))
    fisher: _PartialResources = _Field(default_factory=lambda: _PartialResources(threads=2, mem_mb=8000, runtime=120))
    evaluate: _PartialResources = _Field(default_factory=lambda: _PartialResources(threads=2, mem_mb=6000, runtime=60))
    merge: _PartialResources = _Field(default_factory=lambda: _PartialResources(threads=2, mem_mb=8000, runtime=120))
    report: _PartialResources = _Field(default_factory=lambda: _PartialResources(mem_mb=2000, runtime=10))

    def for_kind(self, kind: str) -> Resources:
        values = self.default.model_dump()
        values.update({k: v for k, v in getattr(self, kind).model_dump().items() if v is not None})
        return Resources(**values)


class MultitaskConfig(_Strict):
    """The multitask baseline: the parent fine-tuned on every child's training data at once."""

    enabled: bool = True
    training: dict[str, Any] = _Field(default_factory=dict)

    _training = _field_validator("training")(classmethod(lambda cls, v: _check_training_overrides(v)))


class EvaluationSettings(_Strict):
    """How every model is evaluated on every task's test split."""

    batch_size: int = _Field(default=64, gt=0)
    max_length: int = _Field(default=128, gt=0)


class ExperimentConfig(_Strict):
    """An experiment: parent task, child tasks, training/Fisher settings, merges to compare, resources."""

    name: str = "experiment"
    seed: int = 0
    model: str = _Field(description="the parent's starting point: a model folder, hub id, alias or built-in spec")
    parent: TaskConfig
    children: list[TaskConfig] = _Field(min_length=1)
    training: dict[str, Any] = _Field(default_factory=dict, description="shared training settings (train config keys)")
    fisher: FisherSettings = _Field(default_factory=FisherSettings)
    merges: list[MergeSpec] = _Field(default_factory=list)
    multitask: MultitaskConfig = _Field(default_factory=MultitaskConfig)
    evaluation: EvaluationSettings = _Field(default_factory=EvaluationSettings)
    resources: ResourcesConfig = _Field(default_factory=ResourcesConfig)

    _training = _field_validator("training")(classmethod(lambda cls, v: _check_training_overrides(v)))

    @_field_validator("multitask", mode="before")
    @classmethod
    def _multitask_bool(cls, value):
        return {"enabled": value} if isinstance(value, bool) else value

    @_model_validator(mode="after")
    def _unique(self):
        names = [self.parent.name] + [c.name for c in self.children]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"task names must be unique; repeated: {', '.join(dupes)}")
        labels = [m.label for m in self.merges]
        dupes = sorted({n for n in labels if labels.count(n) > 1})
        if dupes:
            raise ValueError(f"merge names must be unique (set `name:` to tell them apart); repeated: {', '.join(dupes)}")
        return self

    @property
    def tasks(self) -> list[TaskConfig]:
        return [self.parent, *self.children]


def load_experiment(source: str | Path | dict[str, Any]) -> ExperimentConfig:
    """Validate an experiment from a YAML/JSON file or a dict; bad input raises one-line UserError."""
    if isinstance(source, ExperimentConfig):
        return source
    data = source if isinstance(source, dict) else read_config_file(source)
    try:
        return ExperimentConfig.model_validate(data)
    except _ValidationError as exc:
        raise UserError(validation_message(exc, source if not isinstance(source, dict) else "experiment")) from exc
