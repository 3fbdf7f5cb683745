"""Evaluation (`gradmatch evaluate`): accuracy, macro-F1 and per-example predictions of a classifier on
one split; a config with the original's Fisher method computes the model's diagonal Fisher instead."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from gradmatch.errors import UserError

log = logging.getLogger(__name__)


def _check_output_file(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise UserError(f"output {path} already exists (pass --overwrite to replace it)")
    if path.is_dir():
        raise UserError(f"output {path} is a folder, not a file")
    parent = path.absolute().parent
    if parent.exists() and not parent.is_dir():
        raise UserError(f"cannot create {path}: {parent} is not a folder")


def _run_fisher(cfg, data_dir, overwrite: bool, quiet: bool) -> dict[str, Any]:
    try:
        from gradmatch.fisher import run_fisher
    except ImportError as exc:  # pragma: no cover - fisher.py ships with the package
        raise UserError(f"the Fisher estimator is not available: {exc}") from exc
    out = run_fisher(
        cfg.model_name_or_path,
        cfg.dataset_name,
        cfg.dataset_test_split,
        out=cfg.output_dir,
        estimator=cfg.fisher_estimator,
        batch_size=cfg.fisher_batch_size,
        max_examples=cfg.fisher_max_examples,
        max_length=cfg.max_input_length,
        seed=cfg.seed,
        data_dir=data_dir,
        overwrite=overwrite,
        config_name=cfg.dataset_config_name,
        progress=not quiet,
    )
    return {"method": cfg.method, "model": cfg.model_name_or_path, "dataset": cfg.dataset_name,
            "split": cfg.dataset_test_split, "fisher": str(out if out is not None else cfg.output_dir)}


def classification_metrics(labels, predictions) -> dict[str, float]:
    """Accuracy and macro-F1 (sklearn: mean F1 over the classes present in labels or predictions)."""
    import numpy as np
    from sklearn.metrics import f1_score

    labels, predictions = np.asarray(labels), np.asarray(predictions)
    return {
        "accuracy": float(np.mean(labels == predictions)),
        "macro_f1": float(f1_score(labels, predictions, average="macro", zero_division=0)),
    }


def predict(model, processor, dataset, *, batch_size: int = 8, max_length: int = 128, quiet: bool = False):
    """Logits of ``model`` on a loaded split (Hugging Face ``Trainer.predict``), in row order."""
    from transformers import Trainer, TrainingArguments

    from gradmatch.data import collator, encode, model_max_length

    encoded = encode(dataset, processor, model_max_length(model, max_length), desc="preparing evaluation data")
    with tempfile.TemporaryDirectory(prefix="gradmatch-eval-") as work:
        args = TrainingArguments(output_dir=work, per_device_eval_batch_size=batch_size, report_to="none",
                                 disable_tqdm=quiet, dataloader_num_workers=0, save_strategy="no",
                                 dataloader_pin_memory=False)
        trainer = Trainer(model=model, args=args, data_collator=collator(processor), processing_class=processor)
        output = trainer.predict(encoded)
    logits = output.predictions[0] if isinstance(output.predictions, tuple) else output.predictions
    return logits, output.metrics.get("test_loss")


def evaluate(config, *, data_dir: str | os.PathLike | None = None, overwrite: bool = False,
             quiet: bool = False) -> dict[str, Any]:
    """Evaluate a model on ``dataset_test_split`` and write metrics and predictions JSON; return the metrics.

    ``config`` is an :class:`~gradmatch.config.EvaluateConfig`, a mapping of its keys or a JSON/YAML
    file. Metrics (``accuracy``, ``macro_f1``, ``num_examples``, ``loss``, data set, split, model) go
    to ``metric_output_file`` (default ``<output_dir>/metrics.json``), predictions (per example: index,
    label, prediction, probabilities) to ``prediction_output_file``; both appear atomically.
    With ``method: sequence_classification_squared_gradients`` the model's diagonal Fisher is
    written to ``<output_dir>/hessian`` instead (as `gradmatch fisher` does).
    """
    from gradmatch.config.run import load_evaluate_config

    cfg = load_evaluate_config(config)
    if cfg.is_fisher():
        return _run_fisher(cfg, data_dir, overwrite, quiet)

    import numpy as np
    import torch

    from gradmatch.data import load_split, split_kind
    from gradmatch.fsutil import atomic_file
    from gradmatch.models import load_for_classification, model_kind

    metric_path, prediction_path = cfg.metric_path(), cfg.prediction_path()
    if metric_path.absolute() == prediction_path.absolute():
        raise UserError(f"metric_output_file and prediction_output_file are the same file: {metric_path}")
    for path in (metric_path, prediction_path):
        _check_output_file(path, overwrite)
    kind = model_kind(cfg.model_name_or_path)
    data = load_split(cfg.dataset_name, cfg.dataset_test_split, config_name=cfg.dataset_config_name,
                      data_dir=data_dir, cache_dir=cfg.cache_dir)
    if split_kind(data) != kind:
        raise UserError(f"{cfg.dataset_name} holds {split_kind(data)} examples but {cfg.model_name_or_path} "
                        f"is a{'n' if kind == 'image' else ''} {kind} model")
    model, processor = load_for_classification(cfg.model_name_or_path)
    num_labels = int(model.config.num_labels)
    labels = [int(v) for v in data["label"]]
    if max(labels) >= num_labels:
        raise UserError(f"data set {cfg.dataset_name} ({cfg.dataset_test_split}): label {max(labels)} is outside "
                        f"0..{num_labels - 1} (the model has {num_labels} labels)")

    logits, loss = predict(model, processor, data, batch_size=cfg.per_device_eval_batch_size,
                           max_length=cfg.max_input_length, quiet=quiet)
    probabilities = torch.softmax(torch.as_tensor(np.asarray(logits), dtype=torch.float64), dim=-1).numpy()
    predictions = probabilities.argmax(axis=-1).tolist()
    metrics: dict[str, Any] = {
        **classification_metrics(labels, predictions),
        "num_examples": len(labels),
        "loss": float(loss) if loss is not None else None,
        "model": cfg.model_name_or_path,
        "dataset": cfg.dataset_name,
        "dataset_config_name": cfg.dataset_config_name,
        "split": cfg.dataset_test_split,
        "num_labels": num_labels,
    }
    records = [
        {"index": i, "label": y, "prediction": p, "probabilities": [round(float(q), 6) for q in probs]}
        for i, (y, p, probs) in enumerate(zip(labels, predictions, probabilities))
    ]
    with atomic_file(prediction_path) as fh:
        json.dump({"model": cfg.model_name_or_path, "dataset": cfg.dataset_name, "split": cfg.dataset_test_split,
                   "predictions": records}, fh)
        fh.write("\n")
    with atomic_file(metric_path) as fh:
        json.dump(metrics, fh, indent=2)
        fh.write("\n")
    log.info("accuracy %.4f on %d examples; metrics in %s", metrics["accuracy"], len(labels), metric_path)
    return metrics
