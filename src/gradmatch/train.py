"""Fine-tuning (`gradmatch train`): Hugging Face `Trainer` with AdamW or IVON, a warmup schedule and optional LoRA, for
any kind of model (the kind says how examples are encoded and batched), writing a self-contained model
folder with ``training_metadata.json`` atomically."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from gradmatch.errors import UserError

log = logging.getLogger(__name__)

#: Written at the root of every trained model folder; merge reads ``num_train_examples`` as N_t.
METADATA_FILE = "training_metadata.json"


def read_training_metadata(model_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The training metadata of a model folder written by `gradmatch train`, or None if it has none."""
    path = Path(model_dir) / METADATA_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from exc


def _training_arguments(cfg, output_dir: Path, *, quiet: bool, has_eval: bool):
    from transformers import TrainingArguments

    scheduler, scheduler_kwargs = cfg.lr_scheduler, None
    if cfg.min_lr > 0:
        if cfg.lr_scheduler != "cosine":
            raise UserError(f"min_lr {cfg.min_lr} needs lr_scheduler cosine (got {cfg.lr_scheduler})")
        scheduler, scheduler_kwargs = "cosine_with_min_lr", {"min_lr": cfg.min_lr}
    eval_strategy = cfg.evaluation_strategy or ("epoch" if has_eval else "no")
    return TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        per_device_eval_batch_size=cfg.per_device_eval_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps,
        warmup_steps=cfg.warmup_steps,
        lr_scheduler_type=scheduler,
        lr_scheduler_kwargs=scheduler_kwargs or {},
        optim="adamw_torch",
        adam_beta1=cfg.beta1,
        adam_beta2=cfg.beta2,
        adam_epsilon=cfg.eps,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        seed=cfg.seed,
        data_seed=cfg.seed,
        logging_strategy=cfg.logging_strategy,
        logging_steps=cfg.logging_steps,
        eval_strategy=eval_strategy,
        eval_steps=cfg.eval_steps,
        save_strategy="no",
        report_to="none",
        disable_tqdm=quiet,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
    )


def _with_lora(model, lora, kind):
    from peft import LoraConfig, get_peft_model

    peft_config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                             target_modules=lora.target_modules, **kind.lora_settings())
    try:
        return get_peft_model(model, peft_config)
    except ValueError as exc:
        raise UserError(f"lora: {' '.join(str(exc).split())[:300]}") from exc


def train(config, *, data_dir: str | os.PathLike | None = None, overwrite: bool = False, quiet: bool = False) -> Path:
    """Fine-tune ``config.model_name_or_path`` on ``config.dataset_train_split`` and write a model folder.

    ``config`` is a :class:`~gradmatch.config.TrainConfig`, a mapping of its keys (the original's
    names) or a JSON/YAML file. The folder at ``output_dir`` holds config.json, model.safetensors, the
    tokenizer or image processor, and ``training_metadata.json`` (number of training examples, data,
    splits, seed, parent, the config). It appears atomically; an existing one is replaced only with
    ``overwrite`` (or ``overwrite_output_dir: true``). Returns the folder.
    """
    from gradmatch.config.run import load_train_config
    from gradmatch.data import load_split
    from gradmatch.finite import dumps
    from gradmatch.fsutil import atomic_dir, check_not_input, check_output_dir
    from gradmatch.models import kind_of, load_config

    cfg = load_train_config(config)
    out = Path(cfg.output_dir)
    overwrite = overwrite or cfg.overwrite_output_dir
    check_output_dir(out, overwrite)
    check_not_input(out, {"the model": cfg.model_name_or_path, "the data": cfg.dataset_name}, "output_dir")

    kind = kind_of(cfg.model_name_or_path, cfg.kind)
    config = load_config(cfg.model_name_or_path)
    kind.check_trainable(cfg.model_name_or_path, config)  # a model of another kind: refused before the data loads
    if cfg.prompt is not None and kind.name != "causal-lm":
        raise UserError(f"prompt: model {cfg.model_name_or_path} is a {kind.name} model; training on an lm-eval "
                        "task's template needs a causal language model")
    where = f"{cfg.dataset_name} ({cfg.dataset_train_split})"
    train_data = load_split(cfg.dataset_name, cfg.dataset_train_split, config_name=cfg.dataset_config_name,
                            data_dir=data_dir, cache_dir=cfg.cache_dir, filters=cfg.dataset_filter_dict)
    if cfg.prompt is None:  # with a prompt the task's template says which columns it reads
        kind.check_data(train_data, where, cfg.model_name_or_path)
    train_labels = list(train_data["label"]) if kind.needs_labels else None
    num_labels = kind.num_labels(config, train_labels, cfg.num_labels)
    if num_labels is not None:
        kind.check_labels(train_data, where, num_labels)
    if cfg.prompt is not None:  # the task and its template on these rows: checked before the model loads
        train_data = _prompted(cfg.prompt, train_data)
    val_data = None
    if cfg.dataset_val_split:
        val_data = load_split(cfg.dataset_name, cfg.dataset_val_split, config_name=cfg.dataset_config_name,
                              data_dir=data_dir, cache_dir=cfg.cache_dir, filters=cfg.dataset_filter_dict)
        if cfg.prompt is None:
            kind.check_data(val_data, f"{cfg.dataset_name} ({cfg.dataset_val_split})", cfg.model_name_or_path)
        if num_labels is not None:
            kind.check_labels(val_data, f"{cfg.dataset_name} ({cfg.dataset_val_split})", num_labels)
        if cfg.prompt is not None:
            val_data = _prompted(cfg.prompt, val_data)

    with atomic_dir(out, overwrite) as tmp:
        metadata = _fit(cfg, tmp, train_data, val_data, num_labels, kind, quiet=quiet)
        (tmp / METADATA_FILE).write_text(dumps(metadata, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    log.info("trained model written to %s", out)
    return out


def _fit(cfg, folder: Path, train_data, val_data, num_labels: int | None, kind, *, quiet: bool) -> dict:
    """Train in ``folder`` (a temporary folder) and save the final model there; return the metadata."""
    import shutil

    import transformers
    from transformers import Trainer

    from gradmatch import __version__
    from gradmatch.checkpoints import HEAD_INIT
    from gradmatch.models import load_model, model_max_length, resolve_model

    transformers.set_seed(cfg.seed)
    new_tensors: list[str] = []
    model, processor = load_model(cfg.model_name_or_path, kind=kind, num_labels=num_labels, dropout=cfg.dropout,
                                  from_scratch=cfg.from_scratch, seed=cfg.seed, new_tensors=new_tensors)
    head_init = _initial_values(model, new_tensors)
    max_length = model_max_length(model, cfg.max_input_length)
    if cfg.prompt is not None:
        train_encoded = kind.encode_pairs(train_data, processor, max_length, loss=cfg.prompt.loss)
        val_encoded = kind.encode_pairs(val_data, processor, max_length, loss=cfg.prompt.loss) if val_data else None
    else:
        train_encoded = kind.encode(train_data, processor, max_length, desc="preparing training data")
        val_encoded = kind.encode(val_data, processor, max_length, desc="preparing validation data") if val_data else None
    if cfg.lora is not None:
        model = _with_lora(model, cfg.lora, kind)
    work = folder / ".trainer"
    args = _training_arguments(cfg, work, quiet=quiet, has_eval=val_encoded is not None)
    trainer_class, extra = Trainer, {}
    if cfg.optimizer_name == "IVON":  # a posterior sample per micro-batch; the posterior mean is what is saved
        from gradmatch.fisher.ivon import IVONTrainer

        trainer_class, extra = IVONTrainer, {"train_config": cfg, "num_train_examples": len(train_encoded)}
    trainer = trainer_class(
        **extra,
        model=model,
        args=args,
        data_collator=kind.collator(processor),
        train_dataset=train_encoded,
        eval_dataset=val_encoded,
        processing_class=processor,
        compute_metrics=kind.trainer_metrics() if val_encoded is not None else None,
    )
    hessian = None
    if cfg.save_hessian == "adam":
        from gradmatch.fisher.optimizer import SaveHessianCallback

        hessian = SaveHessianCallback(trainer, num_train_examples=len(train_encoded)).defer_writing()
        trainer.add_callback(hessian)
    if quiet:  # with the progress bar off, Trainer prints every log line instead
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    result = trainer.train()
    _check_converged(trainer, result)
    final_eval = trainer.evaluate() if val_encoded is not None else None
    model = trainer.model
    if cfg.lora is not None:
        model = model.merge_and_unload()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    if head_init:
        _save_head_init(head_init, folder / HEAD_INIT)
    if cfg.save_hessian:  # after the weights, whose fingerprint it records; the model is not used after this
        from gradmatch.checkpoints import folder_fingerprint

        where = {"model": str(cfg.output_dir), "dataset": cfg.dataset_name, "split": cfg.dataset_train_split,
                 "seed": cfg.seed, "kind": kind.name, "weights_fingerprint": folder_fingerprint(folder)}
        if hessian is not None:
            hessian.write(folder / "hessian", weights_fingerprint=where.pop("weights_fingerprint"), in_place=True,
                          extra=where)
        else:
            _write_ivon_hessian(trainer, model, folder / "hessian", len(train_encoded), where)
    shutil.rmtree(work, ignore_errors=True)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    parent = cfg.model_name_or_path
    try:
        parent_path = resolve_model(parent) if not cfg.from_scratch else None
    except UserError:
        parent_path = None
    return {
        "gradmatch_version": __version__,
        "num_train_examples": len(train_encoded),
        "dataset_name": cfg.dataset_name,
        "dataset_filter_dict": cfg.dataset_filter_dict,
        "dataset_config_name": cfg.dataset_config_name,
        "train_split": cfg.dataset_train_split,
        "val_split": cfg.dataset_val_split,
        "seed": cfg.seed,
        "parent": parent,
        "parent_path": parent_path,
        "from_scratch": cfg.from_scratch or parent in _builtin_names(),
        "num_labels": num_labels,
        "kind": kind.name,
        "lora": cfg.lora is not None,
        "hessian": cfg.save_hessian,
        "global_step": trainer.state.global_step,
        "epochs": float(trainer.state.epoch or 0.0),
        "train_loss": float(result.training_loss) if not math.isnan(result.training_loss) else None,
        "loss_history": losses,
        "eval": final_eval,
        "log_history": trainer.state.log_history,
        "ignored_keys": cfg.ignored_keys,
        "head_init": sorted(head_init) or None,
        "config": cfg.model_dump(mode="json"),
    }


def _check_converged(trainer, result) -> None:
    """Refuse a run that diverged — a training loss or a weight that is NaN or ±Inf — before anything is saved: the
    one line names the first step whose logged loss was not finite and the first tensor that is not."""
    from gradmatch.finite import describe, non_finite

    steps = [(entry.get("step"), entry["loss"]) for entry in trainer.state.log_history if "loss" in entry]
    bad_step = next(((step, loss) for step, loss in steps if not math.isfinite(float(loss))), None)
    final = float(result.training_loss)
    found = non_finite(trainer.model.named_parameters())
    if not found and bad_step is None and (math.isfinite(final) or not steps):
        return
    reasons = []
    if bad_step is not None:
        reasons.append(f"the loss was {float(bad_step[1])} at step {bad_step[0]}")
    elif not math.isfinite(final):
        reasons.append(f"the mean training loss is {final}")
    if found:
        reasons.append(f"the weights hold {describe(found)}")
    raise UserError(f"training diverged after {trainer.state.global_step} steps: {' and '.join(reasons)}; lower "
                    "learning_rate, keep max_grad_norm on, or check the data; nothing was written")


def _prompted(prompt, data) -> list[tuple[str, str]]:
    """The rows of a split as the lm-eval task ``prompt.task`` renders them: (context, correct continuation)."""
    from gradmatch import harness

    return harness.training_pairs(prompt.task, [dict(row) for row in data], include_path=prompt.include_path)


def _write_ivon_hessian(trainer, model, folder: Path, num_train_examples: int, where: dict) -> None:
    """IVON's Hessian state under the model's parameter names as ``folder`` (replaces the model's parameters)."""
    from gradmatch.fisher.files import model_fingerprint, write_hessian
    from gradmatch.fisher.ivon import ivon_hessian, ivon_metadata

    fisher = ivon_hessian(trainer.optimizer, model)
    record = {**ivon_metadata(trainer.optimizer, trainer.state.global_step, num_train_examples),
              "model_fingerprint": model_fingerprint(model), **where}
    write_hessian(model, fisher, folder, record)


def _initial_values(model, names: list[str]) -> dict[str, Any]:
    """The values the tensors ``names`` (new in the model: its head) start from, under their checkpoint names.

    A merge from the pretrained base merges the children's heads relative to this common start (when every
    child recorded the same one, i.e. was trained with the same seed)."""
    from gradmatch.models import checkpoint_names

    params = dict(model.named_parameters())
    names = [name for name in names if name in params]
    if not names:
        return {}
    disk = checkpoint_names(model, names, "its initial value cannot be recorded under the checkpoint's name")
    return {disk[name]: params[name].detach().to("cpu", copy=True).contiguous() for name in names}


def _save_head_init(values: dict[str, Any], folder: Path) -> None:
    from safetensors.torch import save_file

    folder.mkdir()
    save_file(values, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _builtin_names() -> set[str]:
    from gradmatch.models import BUILTIN_SPECS

    return set(BUILTIN_SPECS)
