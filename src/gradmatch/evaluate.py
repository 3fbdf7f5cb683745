"""Evaluation (`gradmatch evaluate`): a model's metrics on one split (accuracy and macro-F1 for classifiers,
perplexity for causal LMs), per-example records, lm-evaluation-harness tasks on a causal LM, and — for a causal LM
given prompts — generations scored by an attribute classifier. A config with the original's Fisher method
estimates the model's Fisher instead."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gradmatch.errors import UserError

log = logging.getLogger(__name__)


def _check_output_file(path: Path, overwrite: bool) -> None:
    if len(path.name.encode()) > 255:  # first: stat() of such a name is an OSError
        raise UserError(f"cannot create {path}: its name is longer than the 255 bytes a file name may have")
    if path.exists() and not overwrite:
        raise UserError(f"output {path} already exists (pass --overwrite to replace it)")
    if path.is_dir():
        raise UserError(f"output {path} is a folder, not a file")
    ancestor = path.absolute().parent
    while not ancestor.exists() and ancestor != ancestor.parent:  # the folder that would hold the new folders
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"cannot create {path}: {ancestor} is not a folder")


def _run_fisher(cfg, data_dir, overwrite: bool, quiet: bool) -> dict[str, Any]:
    from gradmatch.fisher import run_fisher

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
        kind=cfg.kind,
        filters=cfg.dataset_filter_dict,
    )
    return {"method": cfg.method, "model": cfg.model_name_or_path, "dataset": cfg.dataset_name,
            "split": cfg.dataset_test_split, "fisher": str(out if out is not None else cfg.output_dir)}


# --------------------------------------------------------------------------- generation scored by a classifier


def read_prompts(prompts: Sequence[str] | str) -> list[str]:
    """Prompts given inline, or read from a file: JSON Lines with ``prompt`` or ``text``, else one per line."""
    if not isinstance(prompts, str):
        return list(prompts)
    path = Path(prompts).expanduser()
    if not path.is_file():
        raise UserError(f"prompts file {path} does not exist")
    try:
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read prompts file {path}: {exc}") from exc
    if path.suffix.lower() in (".jsonl", ".json"):
        out = []
        for n, line in enumerate(lines, start=1):
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise UserError(f"prompts file {path}, line {n}: not JSON ({exc})") from None
            text = row.get("prompt", row.get("text")) if isinstance(row, dict) else None
            if not isinstance(text, str) or not text.strip():
                raise UserError(f"prompts file {path}, line {n}: no 'prompt' or 'text' string")
            out.append(text)
        lines = out
    if not lines:
        raise UserError(f"prompts file {path} holds no prompts")
    return lines


class AttributeClassifier:
    """A sequence classifier that scores texts for one unwanted label (e.g. negative sentiment, toxicity)."""

    def __init__(self, name: str, unwanted_label: int | str):
        from gradmatch.kinds import get_kind
        from gradmatch.models import kind_of, load_config

        self.kind = get_kind("text-classification")
        found = kind_of(name)
        config = load_config(name)
        if found is not self.kind:
            raise UserError(f"attribute classifier {name} is a {found.name} model, not a text classifier")
        self.kind.check_head(name, config, "scoring generations")
        self.label = self._label_id(name, config, unwanted_label)
        self.name = name
        self._model = None

    @staticmethod
    def _label_id(name: str, config, unwanted: int | str) -> int:
        id2label = {int(k): str(v) for k, v in (getattr(config, "id2label", None) or {}).items()}
        n = int(config.num_labels)
        if isinstance(unwanted, int) or str(unwanted).lstrip("-").isdigit():
            label = int(unwanted)
            if not 0 <= label < n:
                raise UserError(f"unwanted_label {label} is not a label of the classifier {name} "
                                f"(it has {n} labels: {', '.join(id2label.get(i, str(i)) for i in range(n))})")
            return label
        matches = [i for i, v in id2label.items() if v.lower() == str(unwanted).lower()]
        if not matches:
            raise UserError(f"unwanted_label {unwanted!r} is not a label of the classifier {name} "
                            f"(its labels: {', '.join(id2label.get(i, str(i)) for i in range(n))})")
        return matches[0]

    def probabilities(self, texts: list[str], *, batch_size: int, max_length: int, progress: bool) -> list[float]:
        """The probability of the unwanted label for every text."""
        import datasets

        from gradmatch.models import load_model

        if self._model is None:
            self._model = load_model(self.name, kind=self.kind)
        model, tokenizer = self._model
        data = datasets.Dataset.from_dict({"text": texts, "label": [0] * len(texts)})
        _, records = self.kind.evaluate(model, tokenizer, data, batch_size=batch_size, max_length=max_length,
                                        progress=progress)
        return [float(r["probabilities"][self.label]) for r in records]


def generate_and_score(model, tokenizer, kind, settings, *, max_length: int, progress: bool
                       ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Continuations of the prompts and, with a classifier, the rate of the unwanted label and distinct-n."""
    from gradmatch.kinds.causal_lm import distinct_n

    prompts = read_prompts(settings.prompts)
    classifier = AttributeClassifier(settings.classifier, settings.unwanted_label) if settings.classifier else None
    records = kind.generate(model, tokenizer, prompts, num_samples=settings.num_samples,
                            max_new_tokens=settings.max_new_tokens, do_sample=settings.do_sample, top_p=settings.top_p,
                            temperature=settings.temperature, seed=settings.seed, batch_size=settings.batch_size,
                            progress=progress)
    ids = [r["token_ids"] for r in records]
    metrics: dict[str, Any] = {
        "num_prompts": len(prompts), "num_generations": len(records),
        "mean_new_tokens": sum(map(len, ids)) / max(1, len(ids)),
        **{f"distinct_{n}": distinct_n(ids, n) for n in (1, 2, 3)},
    }
    if classifier is not None:
        texts = [(r["prompt"] + r["continuation"]) if settings.score_text == "full" else r["continuation"]
                 for r in records]
        probs = classifier.probabilities(texts, batch_size=64, max_length=max_length, progress=progress)
        for r, p in zip(records, probs):
            r["unwanted_probability"] = round(p, 6)
            r["unwanted"] = p > 0.5
        rate = sum(r["unwanted"] for r in records) / len(records)
        metrics.update({"unwanted_rate": rate, "unwanted_rate_se": (rate * (1 - rate) / len(records)) ** 0.5,
                        "unwanted_probability": sum(probs) / len(probs), "classifier": classifier.name,
                        "unwanted_label": classifier.label, "score_text": settings.score_text})
    for r in records:
        del r["token_ids"]
    return metrics, records


# --------------------------------------------------------------------------- the command


def evaluate(config, *, data_dir: str | os.PathLike | None = None, overwrite: bool = False,
             quiet: bool = False) -> dict[str, Any]:
    """Evaluate a model on ``dataset_test_split`` and write metrics and per-example records; return the metrics.

    ``config`` is an :class:`~gradmatch.config.run.EvaluateConfig`, a mapping of its keys or a JSON/YAML
    file. Metrics (the kind's: ``accuracy``/``macro_f1`` for classifiers, ``perplexity`` for causal LMs;
    ``num_examples``, data set, split, model) go to ``metric_output_file`` (default
    ``<output_dir>/metrics.json``), per-example records to ``prediction_output_file``; a ``generation``
    block adds generation metrics (``generation.*``) and a generations JSON Lines file; an ``lm_eval`` block
    (a causal LM) adds lm-evaluation-harness task metrics with their standard errors (``lm_eval.tasks.*``; without
    ``dataset_name`` they are the only metrics). Every file
    appears atomically. With ``method: sequence_classification_squared_gradients`` the model's diagonal
    Fisher is written to ``<output_dir>/hessian`` instead (as `gradmatch fisher` does).
    """
    from gradmatch.config.run import load_evaluate_config

    cfg = load_evaluate_config(config)
    if cfg.is_fisher():
        return _run_fisher(cfg, data_dir, overwrite, quiet)

    from gradmatch.data import load_split
    from gradmatch.finite import check_model, dumps
    from gradmatch.fsutil import atomic_files, check_distinct_outputs, check_not_input
    from gradmatch.models import BUILTIN_SPECS, kind_of, load_config, load_model, load_processor

    outputs = [p for p in (cfg.metric_path(), cfg.prediction_path(), cfg.generation_path()) if p is not None]
    check_distinct_outputs({"the metrics file": cfg.metric_path(), "the predictions file": cfg.prediction_path(),
                            "the generations file": cfg.generation_path()}, "outputs of this evaluation")
    inputs = {"the model": cfg.model_name_or_path}
    if cfg.dataset_name is not None:
        inputs["the data"] = cfg.dataset_name
    if cfg.generation is not None:
        inputs["the classifier"] = cfg.generation.classifier
        if isinstance(cfg.generation.prompts, str):
            inputs["the prompts file"] = cfg.generation.prompts
    if cfg.lm_eval is not None:
        inputs.update({f"the data of lm-eval task {t}": f for t, f in (cfg.lm_eval.data_files or {}).items()})
    for path in outputs:
        _check_output_file(path, overwrite)
        check_not_input(path, inputs)
    name = cfg.model_name_or_path
    kind = kind_of(name, cfg.kind)
    config = load_config(name)
    if name not in BUILTIN_SPECS:
        kind.check_head(name, config, "evaluation")
    if cfg.lm_eval is not None:  # the tasks, their files and the model's kind: checked before any model work
        from gradmatch import harness

        harness.check_model(name)
        harness.check_tasks(cfg.lm_eval.tasks, include_path=cfg.lm_eval.include_path, data_root=data_dir,
                            data_files=cfg.lm_eval.data_files)
    metrics: dict[str, Any] = {"model": name, "kind": kind.name}
    records = generations = None
    if cfg.dataset_name is not None:
        where = f"{cfg.dataset_name} ({cfg.dataset_test_split})"
        data = load_split(cfg.dataset_name, cfg.dataset_test_split, config_name=cfg.dataset_config_name,
                          data_dir=data_dir, cache_dir=cfg.cache_dir, filters=cfg.dataset_filter_dict)
        kind.check_data(data, where, name)
        if kind.needs_labels:
            kind.check_labels(data, where, int(config.num_labels))
        if cfg.generation is not None:  # check the prompts, their length and the classifier before any model work
            prompts = read_prompts(cfg.generation.prompts)
            tokenizer = load_processor(name, kind=kind) if kind.generates else None
            kind.check_generation(name, config, tokenizer, prompts, cfg.generation.max_new_tokens)
            if cfg.generation.classifier:
                AttributeClassifier(cfg.generation.classifier, cfg.generation.unwanted_label)
        model, processor = load_model(name, kind=kind)
        check_model(model, name, "an evaluation")  # a classifier of NaN predicts class 0 and looks plausible
        split_metrics, records = kind.evaluate(model, processor, data, batch_size=cfg.per_device_eval_batch_size,
                                               max_length=cfg.max_input_length, progress=not quiet)
        metrics = {**split_metrics, **metrics, "dataset": cfg.dataset_name,
                   "dataset_config_name": cfg.dataset_config_name, "split": cfg.dataset_test_split,
                   "filters": cfg.dataset_filter_dict}
        if cfg.generation is not None:
            generation_metrics, generations = generate_and_score(model, processor, kind, cfg.generation,
                                                                 max_length=cfg.max_input_length, progress=not quiet)
            metrics["generation"] = generation_metrics
        del model
    if cfg.lm_eval is not None:
        from gradmatch import harness

        settings = cfg.lm_eval
        metrics["lm_eval"] = harness.evaluate_tasks(
            name, settings.tasks, include_path=settings.include_path, data_root=data_dir,
            data_files=settings.data_files, num_fewshot=settings.num_fewshot, batch_size=settings.batch_size,
            limit=settings.limit, progress=not quiet)
    # The outputs as one set: every text made first, then all written to temporaries and moved into place together,
    # the metrics last (a failure leaves none of them). Non-finite numbers are strings (gradmatch.finite).
    texts = {cfg.metric_path(): dumps(metrics, indent=2) + "\n"}
    if records is not None:
        texts[cfg.prediction_path()] = dumps({"model": name, "dataset": cfg.dataset_name,
                                              "split": cfg.dataset_test_split, "predictions": records}) + "\n"
    if generations is not None:
        texts[cfg.generation_path()] = "".join(dumps(r, ensure_ascii=False) + "\n" for r in generations)
    with atomic_files(list(texts), encoding="utf-8") as files:
        for fh, text in zip(files, texts.values()):
            fh.write(text)
    if cfg.dataset_name is not None:
        log.info("%s %.4f on %d examples; metrics in %s", kind.primary_metric, metrics[kind.primary_metric],
                 metrics["num_examples"], cfg.metric_path())
    for task, row in (metrics.get("lm_eval") or {}).get("tasks", {}).items():
        primary = row.get("primary")
        if primary is not None and row.get(primary) is not None:
            stderr = row.get(f"{primary}_stderr")
            log.info("lm-eval %s: %s %.4f%s on %s documents", task, primary, row[primary],
                     f" ± {stderr:.4f}" if stderr is not None else "", row.get("num_documents", "?"))
    return metrics
