"""Train and evaluate configs (`gradmatch train`, `gradmatch evaluate`): the original code's keys and meanings."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from gradmatch.config import Seed, read_config_file, validate
from gradmatch.config.fisher import Estimator
from gradmatch.errors import UserError

log = logging.getLogger("gradmatch.config")

#: Keys of the original code's config files that have no meaning here: accepted, ignored with a note.
ORIGINAL_IGNORED_KEYS: dict[str, str] = {
    "max_output_length": "generation length: set generation.max_new_tokens",
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
    "predict_with_generate": "a causal LM generates when the evaluate config has a generation block",
    "dataset_data_files": "give a local file or folder as dataset_name",
    "dataset_transformations": "not supported", "dataset_lowercase_entities": "not supported",
    "generation_max_len": "use the generation block (generation.max_new_tokens, do_sample, num_samples)", "generation_beam_size": "use the generation block (generation.max_new_tokens, do_sample, num_samples)",
    "generation_do_sample": "use the generation block (generation.max_new_tokens, do_sample, num_samples)",
    "generation_length_penalty": "use the generation block (generation.max_new_tokens, do_sample, num_samples)",
    "generation_uid_regularization": "use the generation block (generation.max_new_tokens, do_sample, num_samples)",
    "generation_no_repeat_ngram_size": "use the generation block (generation.max_new_tokens, do_sample, num_samples)",
    "num_return_sequences": "use the generation block (generation.max_new_tokens, do_sample, num_samples)", "num_sequences_to_keep": "use the generation block (generation.max_new_tokens, do_sample, num_samples)",
    "history_max_tokens": "dialogue-only key", "history_max_utterances": "dialogue-only key",
    "knowledge_max_tokens": "dialogue-only key", "knowledge_truncation_strategy": "dialogue-only key",
    "user_token": "dialogue-only key", "agent_token": "dialogue-only key", "system_token": "dialogue-only key",
    "knowledge_sep_token": "dialogue-only key", "knowledge_tag_token": "dialogue-only key",
    "test_documents_faiss_index_path": "retrieval-only key",
}

#: Methods of the original code this project runs.
TRAIN_METHODS = ("sequence_classification", "image_classification")
FISHER_METHOD = "sequence_classification_squared_gradients"


class LoraSettings(BaseModel):
    """LoRA fine-tuning (peft); the adapters are folded into full weights when the model is saved."""

    model_config = ConfigDict(extra="forbid")

    r: int = Field(default=8, gt=0, description="rank of the adapters")
    alpha: float = Field(default=16.0, gt=0, description="lora_alpha: the adapters are scaled by alpha / r")
    dropout: float = Field(default=0.0, ge=0, lt=1, description="dropout on the adapters' input")
    target_modules: list[str] | str | None = Field(
        default=None, description="module names to adapt (default: peft's choice for the architecture, e.g. query, value)"
    )


class IvonSettings(BaseModel):
    """IVON (Shen et al., ICML 2024; the ivon-opt package): its hyperparameters (learning_rate, beta1, beta2 and
    weight_decay come from the train config's own keys)."""

    model_config = ConfigDict(extra="forbid")

    ess: float | None = Field(default=None, gt=0, description="effective sample size (default: the number of "
                              "training examples); the posterior's noise has precision ess·(hess + weight_decay)")
    # 1.0 and 0.99 measured on the demo (benchmarks/ivon_hessian.py): with ess = N a smaller start draws noise of
    # std 1/√(N·hess_init) that wrecks the model (1e-3: 12% accuracy against AdamW's 87%), and with ivon-opt's
    # beta2 0.99999 a ~100-step fine-tune leaves the Hessian where it started (0.1% of the way).
    hess_init: float = Field(default=1.0, gt=0, description="the Hessian estimate's starting value")
    beta2: float | None = Field(default=None, gt=0, lt=1, description="the Hessian's EMA rate (default: the "
                                "train config's beta2 when set, else 0.99)")
    mc_samples: int = Field(default=1, gt=0, description="parameter samples per training step")
    clip_radius: float = Field(default=float("inf"), gt=0, description="clip the update's elementwise size")


class PromptSettings(BaseModel):
    """Causal LMs: train on an lm-evaluation-harness task's own template — each row becomes the task's zero-shot
    context and its correct choice (after the task's target_delimiter), as the harness scores it."""

    model_config = ConfigDict(extra="forbid")

    task: str = Field(description="a multiple-choice lm-eval task: the packaged sentiment_<set>, lm-eval's own or one "
                      "in include_path")
    include_path: str | None = Field(default=None, description="a folder of more task YAMLs")
    loss: Literal["answer", "text"] = Field(
        default="answer", description="answer: the loss on the answer's tokens only (what the task scores); text: on "
        "every token of context and answer (the model also learns the reviews' language)")

    @field_validator("task")
    @classmethod
    def _task(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must name a task")
        return value


class _TeBase(BaseModel):
    """Keys shared by train and evaluate configs (the original's names and meanings)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    method: str = "sequence_classification"
    model_name_or_path: str
    dataset_name: str
    dataset_config_name: str | None = None
    max_input_length: int = Field(default=384, gt=0)
    per_device_eval_batch_size: int = Field(default=8, gt=0)
    seed: Seed = 42
    cache_dir: str | None = None
    kind: str | None = Field(default=None, description="kind of model (text-classification, image-classification, "
                             "causal-lm); default: read from the model's config")
    dataset_filter_dict: dict[str, Any] | None = Field(
        default=None, description="keep only rows whose column holds the value (or one of the list), e.g. {label: 0}")
    #: keys of the original files that were accepted and ignored (filled in on loading; not a user key)
    ignored_keys: list[str] = Field(default_factory=list, exclude=True)

    @field_validator("model_name_or_path", "dataset_name")
    @classmethod
    def _not_empty(cls, value: str) -> str:
        if not str(value).strip():
            raise ValueError("must not be empty")
        return value

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, value: str | None) -> str | None:
        from gradmatch.kinds import kind_names

        if value is not None and value not in kind_names():
            raise ValueError(f"unknown kind {value!r} (choose from {', '.join(kind_names())})")
        return value


class TrainConfig(_TeBase):
    """A fine-tuning run (`gradmatch train`): model, data, AdamW hyperparameters, schedule, output folder."""

    output_dir: str
    dataset_train_split: str = "train"
    dataset_val_split: str | None = None
    num_labels: int | None = Field(default=None, ge=1)
    from_scratch: bool = False
    per_device_train_batch_size: int = Field(default=16, gt=0)
    gradient_accumulation_steps: int = Field(default=1, gt=0)
    learning_rate: float = Field(default=5e-5, gt=0)
    num_train_epochs: float = Field(default=1.0, gt=0)
    max_steps: int = -1
    warmup_steps: int = Field(default=0, ge=0)
    lr_scheduler: Literal["linear", "cosine", "constant"] = "linear"
    min_lr: float = Field(default=0.0, ge=0)
    optimizer_name: str = Field(default="AdamW", description="AdamW, or IVON (the ivon-opt package; settings in "
                                "the ivon block)")
    save_hessian: Literal["adam", "ivon"] | None = Field(
        default=None, description="write the optimizer's Hessian estimate as OUT/hessian/: adam (AdamW's second "
        "moment, converted to a Fisher's scale) or ivon (IVON's Hessian); see docs/fisher.md")
    ivon: IvonSettings | None = None
    beta1: float = Field(default=0.9, ge=0, lt=1)
    beta2: float = Field(default=0.999, ge=0, lt=1)
    eps: float = Field(default=1e-8, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    max_grad_norm: float = Field(default=1.0, ge=0)
    dropout: float | None = Field(default=None, ge=0, lt=1)
    logging_strategy: Literal["no", "steps", "epoch"] = "steps"
    logging_steps: float = Field(default=10, gt=0)
    evaluation_strategy: Literal["no", "steps", "epoch"] | None = None
    eval_steps: float | None = Field(default=None, gt=0)
    overwrite_output_dir: bool = False
    lora: LoraSettings | None = None
    prompt: PromptSettings | None = Field(default=None, description="causal LMs: train on an lm-eval task's template "
                                          "(context and correct answer; the loss on the answer by default)")

    @field_validator("method")
    @classmethod
    def _train_method(cls, value: str) -> str:
        if value == FISHER_METHOD:
            raise ValueError(f"{FISHER_METHOD} computes a Fisher: run it with `gradmatch evaluate` or `gradmatch fisher`")
        if value not in TRAIN_METHODS:
            raise ValueError(f"unknown method {value!r} (expected one of {', '.join(TRAIN_METHODS)})")
        return value

    @field_validator("optimizer_name")
    @classmethod
    def _known_optimizer(cls, value: str) -> str:
        key = value.lower().replace("_", "")
        if key in ("adamw", "adamwtorch"):
            return "AdamW"
        if key == "ivon":
            return "IVON"
        raise ValueError(f"unknown optimizer {value!r} (choose AdamW or IVON)")

    @model_validator(mode="after")
    def _eval_needs_split(self):
        if self.evaluation_strategy not in (None, "no") and not self.dataset_val_split:
            raise ValueError(f"evaluation_strategy {self.evaluation_strategy!r} needs dataset_val_split")
        if self.min_lr > 0 and self.lr_scheduler != "cosine":  # found here, before the model and data load
            raise ValueError(f"min_lr {self.min_lr} needs lr_scheduler cosine (got {self.lr_scheduler})")
        wanted = {"adam": "AdamW", "ivon": "IVON"}.get(self.save_hessian or "")
        if wanted and wanted != self.optimizer_name:
            raise ValueError(f"save_hessian {self.save_hessian} needs optimizer_name {wanted} (got {self.optimizer_name})")
        if self.ivon is not None and self.optimizer_name != "IVON":
            raise ValueError("the ivon block needs optimizer_name IVON")
        if self.save_hessian and self.lora is not None:
            raise ValueError(f"save_hessian {self.save_hessian} with lora: the optimizer holds state for the adapters "
                             "only, not the full weights a merge reads; run `gradmatch fisher` on the trained model")
        return self


class GenerationSettings(BaseModel):
    """Continuations of prompts by a causal LM, scored by an attribute classifier (the paper's toxicity setup)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    prompts: list[str] | str = Field(description="the prompts, or a file: JSON Lines with 'prompt' or 'text', "
                                     "or plain text with one prompt per line")
    num_samples: int = Field(default=1, gt=0, le=1000, description="continuations per prompt")
    max_new_tokens: int = Field(default=32, gt=0, le=4096)
    do_sample: bool = Field(default=True, description="sample (seeded) or greedy")
    top_p: float = Field(default=1.0, gt=0, le=1)
    temperature: float = Field(default=1.0, gt=0, le=100)
    seed: Seed = 0
    batch_size: int = Field(default=16, gt=0, description="prompts generated at once (results depend on it when sampling)")
    classifier: str | None = Field(default=None, description="a sequence-classifier folder that scores the continuations")
    unwanted_label: int | str = Field(default=0, description="the classifier's label counted as unwanted (id or name)")
    score_text: Literal["continuation", "full"] = Field(
        default="continuation", description="what the classifier reads: the continuation alone or prompt + continuation")
    output_file: str | None = Field(default=None, description="generations JSON Lines (default beside the metrics)")

    @field_validator("prompts")
    @classmethod
    def _some_prompts(cls, value):
        if isinstance(value, list) and (not value or any(not isinstance(p, str) or not p.strip() for p in value)):
            raise ValueError("give at least one prompt, none of them empty")
        if isinstance(value, str) and not value.strip():
            raise ValueError("must name a prompts file (or be a list of prompts)")
        return value

    @model_validator(mode="after")
    def _greedy_is_one_continuation(self):
        """Settings that contradict each other, refused with the config (before any model work): greedy decoding
        gives one continuation per prompt and has no temperature or nucleus."""
        if self.do_sample:
            return self
        if self.num_samples > 1:
            raise ValueError(f"num_samples {self.num_samples} with do_sample false: greedy decoding gives one "
                             "continuation per prompt (set do_sample true, or num_samples 1)")
        for key in ("top_p", "temperature"):
            if key in self.model_fields_set and getattr(self, key) != 1.0:
                raise ValueError(f"{key} {getattr(self, key)} applies to sampling, and do_sample is false (drop "
                                 f"{key}, or set do_sample true)")
        return self


class LmEvalSettings(BaseModel):
    """lm-evaluation-harness tasks run on a causal LM (its Python API, as the ``lm_eval`` command line runs them)."""

    model_config = ConfigDict(extra="forbid")

    tasks: list[str] = Field(min_length=1, description="task, group or tag names: lm-eval's own, include_path's, or "
                             "the packaged sentiment_<set> tasks (documents from the data root)")
    include_path: str | None = Field(default=None, description="a folder of more task YAMLs")
    num_fewshot: int | None = Field(default=0, ge=0, description="examples in the context (null: each task's default)")
    batch_size: int = Field(default=16, gt=0)
    limit: int | None = Field(default=None, gt=0, description="at most this many documents per task")
    data_files: dict[str, str] | None = Field(
        default=None, description="task → a JSON Lines file that replaces the task's test documents")

    @field_validator("tasks")
    @classmethod
    def _names(cls, value: list[str]) -> list[str]:
        if any(not isinstance(t, str) or not t.strip() for t in value):
            raise ValueError("task names must not be empty")
        if len(set(value)) != len(value):
            raise ValueError("tasks must not repeat")
        return value


class EvaluateConfig(_TeBase):
    """An evaluation (`gradmatch evaluate`): metrics and predictions of a model on one split, or — with
    ``method: sequence_classification_squared_gradients`` — the model's diagonal Fisher on that split."""

    dataset_test_split: str = "test"
    metric_output_file: str | None = None
    prediction_output_file: str | None = None
    output_dir: str | None = None
    fisher_estimator: Estimator = "sampled"
    fisher_batch_size: int = Field(default=16, gt=0)
    fisher_max_examples: int | None = Field(default=None, gt=0)
    generation: GenerationSettings | None = None
    dataset_name: str | None = Field(default=None, description="the data set whose test split is evaluated (optional "
                                     "with lm_eval: without it no perplexity is computed)")
    lm_eval: LmEvalSettings | None = None

    @field_validator("method")
    @classmethod
    def _eval_method(cls, value: str) -> str:
        if value not in (*TRAIN_METHODS, FISHER_METHOD):
            raise ValueError(f"unknown method {value!r} (expected one of {', '.join((*TRAIN_METHODS, FISHER_METHOD))})")
        return value

    @model_validator(mode="after")
    def _outputs(self):
        if self.method == FISHER_METHOD:
            if not self.output_dir:
                raise ValueError(f"method {FISHER_METHOD} needs output_dir (the Fisher goes to <output_dir>/hessian)")
        elif not (self.metric_output_file or self.output_dir):
            raise ValueError("give metric_output_file (and prediction_output_file) or output_dir")
        if self.dataset_name is None and self.lm_eval is None:
            raise ValueError("dataset_name: missing (it is optional only with an lm_eval block)")
        if self.dataset_name is None and self.generation is not None:
            raise ValueError("generation needs dataset_name (the split whose perplexity comes with it)")
        if self.lm_eval is not None and self.method == FISHER_METHOD:
            raise ValueError(f"lm_eval does not apply to method {FISHER_METHOD}")
        return self

    def is_fisher(self) -> bool:
        return self.method == FISHER_METHOD

    def metric_path(self) -> Path:
        return Path(self.metric_output_file) if self.metric_output_file else Path(self.output_dir) / "metrics.json"

    def prediction_path(self) -> Path | None:
        if self.dataset_name is None:
            return None
        if self.prediction_output_file:
            return Path(self.prediction_output_file)
        if self.output_dir:
            return Path(self.output_dir) / "predictions.json"
        return self.metric_path().with_name(self.metric_path().stem + ".predictions.json")

    def generation_path(self) -> Path | None:
        if self.generation is None:
            return None
        if self.generation.output_file:
            return Path(self.generation.output_file)
        if self.output_dir:
            return Path(self.output_dir) / "generations.jsonl"
        return self.metric_path().with_name(self.metric_path().stem + ".generations.jsonl")


#: Training keys an evaluate config may carry (the original reused one dict for both): ignored there.
_TRAIN_ONLY_KEYS = set(TrainConfig.model_fields) - set(EvaluateConfig.model_fields) - {"output_dir"}
#: Evaluate keys a train config may carry: ignored there.
_EVAL_ONLY_KEYS = set(EvaluateConfig.model_fields) - set(TrainConfig.model_fields) - {"output_dir"}
_ALIASES = {"lr_scheduler_type": "lr_scheduler", "eval_strategy": "evaluation_strategy", "adam_beta1": "beta1",
            "adam_beta2": "beta2", "adam_epsilon": "eps", "optim": "optimizer_name"}


def _load_te_config(config, schema, other_keys: set[str], what: str):
    if isinstance(config, schema):
        return config
    if isinstance(config, BaseModel):
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
        log.warning("note: %s: key %s is ignored (%s)", source, key, reason)
        data.pop(key)
    cfg = validate(schema, data, source)
    cfg.ignored_keys = ignored
    return cfg


def load_train_config(config) -> TrainConfig:
    """A TrainConfig from a TrainConfig, a mapping or a JSON/YAML file (original keys accepted)."""
    return _load_te_config(config, TrainConfig, _EVAL_ONLY_KEYS, "train")


def load_evaluate_config(config) -> EvaluateConfig:
    """An EvaluateConfig from an EvaluateConfig, a mapping or a JSON/YAML file (original keys accepted)."""
    return _load_te_config(config, EvaluateConfig, _TRAIN_ONLY_KEYS, "evaluate")


