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
    bad = [key for key in data if not isinstance(key, str)]
    if bad:
        raise UserError(f"config file {path}: key {bad[0]!r} is not a name (keys must be strings)")
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

from typing import Literal  # noqa: E402

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator  # noqa: E402

#: The merge methods, by the name a merge YAML gives in ``method`` (implemented in gradmatch.methods).
MERGE_METHODS = ("gradient_matching", "task_arithmetic", "average", "fisher_average", "ties", "dare")
#: Methods that need a Hessian (diagonal Fisher) for every child; gradient matching also for the parent.
HESSIAN_METHODS = ("gradient_matching", "fisher_average")


class _MergeSchema(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GradientMatchingParameters(_MergeSchema):
    """H_0 = N_0·F_0 + delta_0; the denominator H_0 + Σ α_t H_t must stay positive unless clamped."""

    delta_0: float = Field(1e-12, ge=0, description="prior precision δ added to the parent's Hessian")
    clamp_denominator: float | None = Field(None, gt=0, description="clamp the denominator to ≥ this instead of failing")


class TaskArithmeticParameters(_MergeSchema):
    """θ_0 + Σ α_t (θ_t − θ_0): no parameters beyond the per-model weights α_t."""


class AverageParameters(_MergeSchema):
    include_base: bool = Field(False, description="also average the parent, with weight base_weight")
    base_weight: float = Field(1.0, ge=0)


class FisherAverageParameters(_MergeSchema):
    epsilon: float = Field(0.0, ge=0, description="added to every scaled Fisher N_t·F_t (Matena & Raffel's floor)")


class TiesParameters(_MergeSchema):
    density: float = Field(0.2, gt=0, le=1, description="fraction k of each task vector's entries kept (top-k magnitudes)")


class DareParameters(_MergeSchema):
    p: float = Field(0.5, ge=0, lt=1, description="probability of dropping a task-vector entry")
    seed: int = Field(0, description="seed of the drop masks")
    combine: Literal["task_arithmetic", "ties"] = "task_arithmetic"
    density: float = Field(1.0, gt=0, le=1, description="TIES trim after the drop (combine: ties only)")


METHOD_PARAMETERS: dict[str, type[BaseModel]] = {
    "gradient_matching": GradientMatchingParameters,
    "task_arithmetic": TaskArithmeticParameters,
    "average": AverageParameters,
    "fisher_average": FisherAverageParameters,
    "ties": TiesParameters,
    "dare": DareParameters,
}


class ModelParameters(_MergeSchema):
    """Per-model ``parameters`` (mergekit's spelling of the per-model keys)."""

    weight: float | None = None
    hessian_scale: float | None = Field(None, ge=0)


class MergeModelEntry(_MergeSchema):
    """One child: its folder, its Hessian, its weight α_t (λ_t, w_t) and its Hessian scale N_t."""

    model: str
    hessian: str | None = None
    weight: float | None = Field(None, description="α_t (default 1.0)")
    hessian_scale: float | None = Field(None, ge=0, description="N_t (default: training_metadata.json num_train_examples)")
    parameters: ModelParameters = Field(default_factory=ModelParameters)

    @model_validator(mode="after")
    def _fold_parameters(self):
        for key in ("weight", "hessian_scale"):
            given = getattr(self.parameters, key)
            if given is not None:
                if getattr(self, key) is not None and getattr(self, key) != given:
                    raise ValueError(f"{key} is given twice with different values ({getattr(self, key)} and parameters.{key} {given})")
                setattr(self, key, given)
        return self


class MergeConfig(_MergeSchema):
    """A merge: the method, the parent (base), its Hessian and scale N_0, the children, the method's parameters."""

    method: Literal[MERGE_METHODS]  # type: ignore[valid-type]
    base: str
    base_hessian: str | None = None
    base_hessian_scale: float | None = Field(None, ge=0, description="N_0 (default: the parent's training_metadata.json)")
    models: list[MergeModelEntry] = Field(min_length=1)
    parameters: dict[str, Any] = Field(default_factory=dict)
    out_dtype: Literal["float32", "float16", "bfloat16", "float64"] | None = None

    @model_validator(mode="after")
    def _check_method(self):
        schema = METHOD_PARAMETERS[self.method]
        try:
            parsed = schema.model_validate(self.parameters or {})
        except ValidationError as exc:
            first = exc.errors()[0]
            key = ".".join(str(p) for p in first.get("loc", ())) or "(top level)"
            msg = f"not a parameter of {self.method}" if first.get("type") == "extra_forbidden" else first.get("msg")
            raise ValueError(f"parameters.{key}: {msg}") from None
        self.parameters = parsed.model_dump()
        if self.method in HESSIAN_METHODS:
            missing = [i for i, m in enumerate(self.models) if not m.hessian]
            if missing:
                raise ValueError(f"{self.method} needs a hessian for every model; models[{missing[0]}] ({self.models[missing[0]].model}) has none")
        if self.method == "gradient_matching" and not self.base_hessian:
            raise ValueError("gradient_matching needs base_hessian (the parent's Hessian folder)")
        if self.method in ("average", "fisher_average"):
            weights = [1.0 if m.weight is None else m.weight for m in self.models]
            if any(w < 0 for w in weights):
                raise ValueError(f"{self.method} needs non-negative weights, got {weights}")
            total = sum(weights) + (self.parameters.get("base_weight", 0.0) if self.parameters.get("include_base") else 0.0)
            if total <= 0:
                raise ValueError(f"{self.method} needs weights with a positive sum, got {weights}")
        return self

    def weights(self) -> list[float]:
        """α_t of every child (1.0 where not given)."""
        return [1.0 if m.weight is None else float(m.weight) for m in self.models]


# =========================================================================== train / evaluate configs
# (owned by train.py / evaluate.py: TrainConfig, EvaluateConfig)

import logging as _te_logging  # noqa: E402
from typing import Literal as _TeLiteral  # noqa: E402

from pydantic import BaseModel as _TeBaseModel, ConfigDict as _TeConfigDict, Field as _TeField  # noqa: E402
from pydantic import ValidationError as _TeValidationError, field_validator as _te_field_validator  # noqa: E402
from pydantic import model_validator as _te_model_validator  # noqa: E402

_te_log = _te_logging.getLogger("gradmatch.config")

#: Keys of the original code's config files that have no meaning here: accepted, ignored with a note.
ORIGINAL_IGNORED_KEYS: dict[str, str] = {
    "max_output_length": "generation length; classification generates nothing",
    "save_strategy": "no intermediate checkpoints are kept; the final model is written once",
    "save_steps": "no intermediate checkpoints are kept",
    "save_total_limit": "no intermediate checkpoints are kept",
    "load_best_model_at_end": "the final model is the one written",
    "metric_for_best_model": "the final model is the one written",
    "is_training": "implied by the command (train or evaluate)",
    "track_fim": "implied by method sequence_classification_squared_gradients",
    "config_name": "the config comes from model_name_or_path",
    "tokenizer_name": "the tokenizer comes from model_name_or_path",
    "model_revision": "pin a revision by a local folder or a hub id",
    "use_auth_token": "log in with `hf auth login` instead",
    "report_to": "training logs go to training_metadata.json",
    "do_train": "implied by the command", "do_eval": "implied by dataset_val_split", "do_predict": "implied by the command",
    "predict_with_generate": "classification generates nothing",
    "dataset_data_files": "give a local file or folder as dataset_name",
    "dataset_transformations": "not supported", "dataset_lowercase_entities": "not supported",
    "dataset_filter_dict": "not supported",
    "generation_max_len": "classification generates nothing", "generation_beam_size": "classification generates nothing",
    "generation_do_sample": "classification generates nothing",
    "generation_length_penalty": "classification generates nothing",
    "generation_uid_regularization": "classification generates nothing",
    "generation_no_repeat_ngram_size": "classification generates nothing",
    "num_return_sequences": "classification generates nothing", "num_sequences_to_keep": "classification generates nothing",
    "history_max_tokens": "dialogue-only key", "history_max_utterances": "dialogue-only key",
    "knowledge_max_tokens": "dialogue-only key", "knowledge_truncation_strategy": "dialogue-only key",
    "user_token": "dialogue-only key", "agent_token": "dialogue-only key", "system_token": "dialogue-only key",
    "knowledge_sep_token": "dialogue-only key", "knowledge_tag_token": "dialogue-only key",
    "test_documents_faiss_index_path": "retrieval-only key",
}

#: Methods of the original code this project runs.
TRAIN_METHODS = ("sequence_classification", "image_classification")
FISHER_METHOD = "sequence_classification_squared_gradients"


class LoraSettings(_TeBaseModel):
    """LoRA fine-tuning (peft); the adapters are folded into full weights when the model is saved."""

    model_config = _TeConfigDict(extra="forbid")

    r: int = _TeField(default=8, gt=0, description="rank of the adapters")
    alpha: float = _TeField(default=16.0, gt=0, description="lora_alpha: the adapters are scaled by alpha / r")
    dropout: float = _TeField(default=0.0, ge=0, lt=1, description="dropout on the adapters' input")
    target_modules: list[str] | str | None = _TeField(
        default=None, description="module names to adapt (default: peft's choice for the architecture, e.g. query, value)"
    )


class _TeBase(_TeBaseModel):
    """Keys shared by train and evaluate configs (the original's names and meanings)."""

    model_config = _TeConfigDict(extra="forbid", protected_namespaces=())

    method: str = "sequence_classification"
    model_name_or_path: str
    dataset_name: str
    dataset_config_name: str | None = None
    max_input_length: int = _TeField(default=384, gt=0)
    per_device_eval_batch_size: int = _TeField(default=8, gt=0)
    seed: int = 42
    cache_dir: str | None = None
    #: keys of the original files that were accepted and ignored (filled in on loading; not a user key)
    ignored_keys: list[str] = _TeField(default_factory=list, exclude=True)

    @_te_field_validator("model_name_or_path", "dataset_name")
    @classmethod
    def _not_empty(cls, value: str) -> str:
        if not str(value).strip():
            raise ValueError("must not be empty")
        return value


class TrainConfig(_TeBase):
    """A fine-tuning run (`gradmatch train`): model, data, AdamW hyperparameters, schedule, output folder."""

    output_dir: str
    dataset_train_split: str = "train"
    dataset_val_split: str | None = None
    num_labels: int | None = _TeField(default=None, ge=1)
    from_scratch: bool = False
    per_device_train_batch_size: int = _TeField(default=16, gt=0)
    gradient_accumulation_steps: int = _TeField(default=1, gt=0)
    learning_rate: float = _TeField(default=5e-5, gt=0)
    num_train_epochs: float = _TeField(default=1.0, gt=0)
    max_steps: int = -1
    warmup_steps: int = _TeField(default=0, ge=0)
    lr_scheduler: _TeLiteral["linear", "cosine", "constant"] = "linear"
    min_lr: float = _TeField(default=0.0, ge=0)
    optimizer_name: str = "AdamW"
    beta1: float = _TeField(default=0.9, ge=0, lt=1)
    beta2: float = _TeField(default=0.999, ge=0, lt=1)
    eps: float = _TeField(default=1e-8, gt=0)
    weight_decay: float = _TeField(default=0.0, ge=0)
    max_grad_norm: float = _TeField(default=1.0, ge=0)
    dropout: float | None = _TeField(default=None, ge=0, lt=1)
    logging_strategy: _TeLiteral["no", "steps", "epoch"] = "steps"
    logging_steps: float = _TeField(default=10, gt=0)
    evaluation_strategy: _TeLiteral["no", "steps", "epoch"] | None = None
    eval_steps: float | None = _TeField(default=None, gt=0)
    overwrite_output_dir: bool = False
    lora: LoraSettings | None = None

    @_te_field_validator("method")
    @classmethod
    def _train_method(cls, value: str) -> str:
        if value == FISHER_METHOD:
            raise ValueError(f"{FISHER_METHOD} computes a Fisher: run it with `gradmatch evaluate` or `gradmatch fisher`")
        if value not in TRAIN_METHODS:
            raise ValueError(f"unknown method {value!r} (expected one of {', '.join(TRAIN_METHODS)})")
        return value

    @_te_field_validator("optimizer_name")
    @classmethod
    def _adamw_only(cls, value: str) -> str:
        if value.lower().replace("_", "") not in ("adamw", "adamwtorch"):
            raise ValueError(f"only AdamW is supported, not {value!r}")
        return "AdamW"

    @_te_model_validator(mode="after")
    def _eval_needs_split(self):
        if self.evaluation_strategy not in (None, "no") and not self.dataset_val_split:
            raise ValueError(f"evaluation_strategy {self.evaluation_strategy!r} needs dataset_val_split")
        if self.min_lr > 0 and self.lr_scheduler != "cosine":  # found here, before the model and data load
            raise ValueError(f"min_lr {self.min_lr} needs lr_scheduler cosine (got {self.lr_scheduler})")
        return self


class EvaluateConfig(_TeBase):
    """An evaluation (`gradmatch evaluate`): metrics and predictions of a model on one split, or — with
    ``method: sequence_classification_squared_gradients`` — the model's diagonal Fisher on that split."""

    dataset_test_split: str = "test"
    metric_output_file: str | None = None
    prediction_output_file: str | None = None
    output_dir: str | None = None
    fisher_estimator: _TeLiteral["sampled", "empirical"] = "sampled"
    fisher_batch_size: int = _TeField(default=16, gt=0)
    fisher_max_examples: int | None = _TeField(default=None, gt=0)

    @_te_field_validator("method")
    @classmethod
    def _eval_method(cls, value: str) -> str:
        if value not in (*TRAIN_METHODS, FISHER_METHOD):
            raise ValueError(f"unknown method {value!r} (expected one of {', '.join((*TRAIN_METHODS, FISHER_METHOD))})")
        return value

    @_te_model_validator(mode="after")
    def _outputs(self):
        if self.method == FISHER_METHOD:
            if not self.output_dir:
                raise ValueError(f"method {FISHER_METHOD} needs output_dir (the Fisher goes to <output_dir>/hessian)")
        elif not (self.metric_output_file or self.output_dir):
            raise ValueError("give metric_output_file (and prediction_output_file) or output_dir")
        return self

    def is_fisher(self) -> bool:
        return self.method == FISHER_METHOD

    def metric_path(self) -> Path:
        return Path(self.metric_output_file) if self.metric_output_file else Path(self.output_dir) / "metrics.json"

    def prediction_path(self) -> Path:
        if self.prediction_output_file:
            return Path(self.prediction_output_file)
        if self.output_dir:
            return Path(self.output_dir) / "predictions.json"
        return self.metric_path().with_name(self.metric_path().stem + ".predictions.json")


#: Training keys an evaluate config may carry (the original reused one dict for both): ignored there.
_TRAIN_ONLY_KEYS = set(TrainConfig.model_fields) - set(EvaluateConfig.model_fields) - {"output_dir"}
#: Evaluate keys a train config may carry: ignored there.
_EVAL_ONLY_KEYS = set(EvaluateConfig.model_fields) - set(TrainConfig.model_fields) - {"output_dir"}
_ALIASES = {"lr_scheduler_type": "lr_scheduler", "eval_strategy": "evaluation_strategy", "adam_beta1": "beta1",
            "adam_beta2": "beta2", "adam_epsilon": "eps", "optim": "optimizer_name"}


def _load_te_config(config, schema, other_keys: set[str], what: str):
    if isinstance(config, schema):
        return config
    if isinstance(config, _TeBaseModel):
        config = config.model_dump()
    if isinstance(config, (str, Path)):
        source = str(config)
        data = read_config_file(config)
    elif isinstance(config, dict):
        source = f"{what} config"
        data = dict(config)
    else:
        raise UserError(f"a {what} config must be a file path or a mapping, not {type(config).__name__}")
    for alias, key in _ALIASES.items():
        if alias in data:
            if key in data:
                raise UserError(f"{source}: give {key} or {alias}, not both")
            data[key] = data.pop(alias)
    data.pop("ignored_keys", None)
    known = set(schema.model_fields) - {"ignored_keys"}
    unknown = sorted(k for k in data if k not in known and k not in ORIGINAL_IGNORED_KEYS and k not in other_keys)
    if unknown:
        raise UserError(f"{source}: unknown key{'s' if len(unknown) > 1 else ''}: {', '.join(unknown)}")
    ignored = sorted(k for k in data if k not in known)
    for key in ignored:
        reason = ORIGINAL_IGNORED_KEYS.get(key) or ("a training key" if what == "evaluate" else "an evaluation key")
        _te_log.warning("note: %s: key %s is ignored (%s)", source, key, reason)
        data.pop(key)
    try:
        cfg = schema.model_validate(data)
    except _TeValidationError as exc:
        raise UserError(validation_message(exc, source)) from exc
    cfg.ignored_keys = ignored
    return cfg


def load_train_config(config) -> TrainConfig:
    """A TrainConfig from a TrainConfig, a mapping or a JSON/YAML file (original keys accepted)."""
    return _load_te_config(config, TrainConfig, _EVAL_ONLY_KEYS, "train")


def load_evaluate_config(config) -> EvaluateConfig:
    """An EvaluateConfig from an EvaluateConfig, a mapping or a JSON/YAML file (original keys accepted)."""
    return _load_te_config(config, EvaluateConfig, _TRAIN_ONLY_KEYS, "evaluate")


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

    @_model_validator(mode="after")
    def _check_parameters(self):
        """The method's parameters are checked now, not when the merge job runs hours later (kept as given: they
        enter the job's hash)."""
        try:
            METHOD_PARAMETERS[self.method].model_validate(self.parameters)
        except _ValidationError as exc:
            first = exc.errors()[0]
            key = ".".join(str(p) for p in first.get("loc", ())) or "(top level)"
            msg = f"not a parameter of {self.method}" if first.get("type") == "extra_forbidden" else first.get("msg")
            raise ValueError(f"parameters.{key}: {msg}") from None
        return self

    @_field_validator("name")
    @classmethod
    def _safe_name(cls, value: str | None) -> str | None:
        if value is not None and not _NAME_RE.match(value):  # it names the folder merges/<name> of the run
            raise ValueError("a merge name may hold only letters, digits, '_', '.' and '-' (it names a folder)")
        return value

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


#: Built-in resources per kind of job (under what an experiment's ``resources`` says).
DEFAULT_JOB_RESOURCES: dict[str, dict[str, int]] = {
    "prepare": {"mem_mb": 2000, "runtime": 30},
    "train": {"threads": 2, "mem_mb": 8000, "runtime": 240},
    "fisher": {"threads": 2, "mem_mb": 8000, "runtime": 120},
    "evaluate": {"threads": 2, "mem_mb": 6000, "runtime": 60},
    "merge": {"threads": 2, "mem_mb": 8000, "runtime": 120},
    "report": {"mem_mb": 2000, "runtime": 10},
}


class ResourcesConfig(_Strict):
    """Resources per kind of job. Precedence, lowest first: built-in ``Resources()`` defaults, the
    built-in per-kind defaults (:data:`DEFAULT_JOB_RESOURCES`), the experiment's ``default``, its per-kind entry."""

    default: _PartialResources = _Field(default_factory=_PartialResources)
    prepare: _PartialResources = _Field(default_factory=_PartialResources)
    train: _PartialResources = _Field(default_factory=_PartialResources)
    fisher: _PartialResources = _Field(default_factory=_PartialResources)
    evaluate: _PartialResources = _Field(default_factory=_PartialResources)
    merge: _PartialResources = _Field(default_factory=_PartialResources)
    report: _PartialResources = _Field(default_factory=_PartialResources)

    def for_kind(self, kind: str) -> Resources:
        values = Resources().model_dump()
        values.update(DEFAULT_JOB_RESOURCES[kind])
        for given in (self.default, getattr(self, kind)):
            values.update({k: v for k, v in given.model_dump().items() if v is not None})
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

    @_field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        if not _NAME_RE.match(value):  # it names the default run folder runs/<name>
            raise ValueError("an experiment name may hold only letters, digits, '_', '.' and '-' (it names a folder)")
        return value

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
