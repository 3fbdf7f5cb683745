"""What text and image classifiers share: a label head, log p(y|x) from logits, accuracy and macro-F1."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from gradmatch.errors import UserError
from gradmatch.kinds.base import LABEL_KEYS, Kind, model_max_length

#: Architecture name endings of a checkpoint with a classification head.
HEAD_SUFFIXES = ("ForSequenceClassification", "ForImageClassification")


def example_uniforms(seed: int, index: int, n: int = 1):
    """``n`` uniform numbers in [0, 1) that decide example ``index``'s sampled labels under ``seed``.

    They depend only on (seed, index), never on the batch size, the batch order or the number of processes.
    """
    import numpy as np

    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(seed) >> 32, int(index)]).random(n)


def example_uniform(seed: int, index: int) -> float:
    """The uniform number in [0, 1) that decides example ``index``'s sampled label under ``seed``."""
    return float(example_uniforms(seed, index, 1)[0])


def sample_labels(logits, indices: Iterable[int], seed: int):
    """Draw y_b ~ softmax(logits_b) by inverse CDF with each example's own uniform number."""
    import torch

    probs = torch.softmax(logits.detach().to(device="cpu", dtype=torch.float64), dim=-1)
    cdf = probs.cumsum(-1)
    u = torch.tensor([example_uniform(seed, i) for i in indices], dtype=torch.float64).unsqueeze(1)
    labels = (cdf <= u).sum(-1).clamp_(max=probs.shape[-1] - 1)
    return labels.to(logits.device)


def classification_metrics(labels, predictions) -> dict[str, float]:
    """Accuracy and macro-F1 (sklearn: mean F1 over the classes present in labels or predictions)."""
    import numpy as np
    from sklearn.metrics import f1_score

    labels, predictions = np.asarray(labels), np.asarray(predictions)
    return {
        "accuracy": float(np.mean(labels == predictions)),
        "macro_f1": float(f1_score(labels, predictions, average="macro", zero_division=0)),
    }


def _accuracy(eval_prediction) -> dict[str, float]:
    import numpy as np

    logits = eval_prediction.predictions[0] if isinstance(eval_prediction.predictions, tuple) else eval_prediction.predictions
    return {"accuracy": float(np.mean(np.argmax(logits, axis=-1) == eval_prediction.label_ids))}


class ClassifierKind(Kind):
    """A model with a classification head over ``num_labels`` classes: log p(y|x) = log softmax(logits)_y."""

    needs_labels = True
    primary_metric = "accuracy"
    higher_is_better = True

    def prepare_config(self, config, *, num_labels=None, id2label=None) -> bool:
        resize = num_labels is not None and int(num_labels) != config.num_labels
        if num_labels is not None:
            config.num_labels = int(num_labels)
        if id2label:
            config.id2label = {int(k): str(v) for k, v in id2label.items()}
            config.label2id = {v: k for k, v in config.id2label.items()}
        return resize

    def check_head(self, name: str, config, purpose: str, alternatives: str = "fine-tune it first") -> None:
        archs = list(getattr(config, "architectures", None) or [])
        if archs and not any(a.endswith(HEAD_SUFFIXES) for a in archs):
            raise UserError(f"model {name} has no classification head (its architecture is {', '.join(archs)}): "
                            f"{purpose} of a {self.name} model needs a trained classifier; {alternatives}")

    def check_trainable(self, name: str, config) -> None:
        from gradmatch.kinds import kind_of_config

        own = kind_of_config(config)
        if own.generates and not self.generates:  # its tokenizer, head and data are a text generator's
            archs = list(getattr(config, "architectures", None) or []) or [str(getattr(config, "model_type", "?"))]
            article = "an" if self.name[0] in "aeiou" else "a"
            raise UserError(f"model {name} is a {own.name} model ({', '.join(archs)}), not {article} {self.name} model: "
                            f"training it as one needs a classifier or an encoder checkpoint; train it as a "
                            f"{own.name} model (drop kind, or set kind: {own.name})")

    def num_labels(self, config, labels, given):
        if given is not None:
            return int(given)
        archs = getattr(config, "architectures", None) or []
        if any(a.endswith(HEAD_SUFFIXES) for a in archs):
            return int(config.num_labels)
        return max(2, max(labels) + 1) if labels else 2

    def check_labels(self, dataset, label: str, num_labels: int) -> None:
        labels = dataset["label"]
        labels = list(labels.to_pylist() if hasattr(labels, "to_pylist") else labels)
        if labels and max(labels) >= num_labels:
            raise UserError(f"data set {label}: label {max(labels)} is outside 0..{num_labels - 1} "
                            f"(the model has {num_labels} labels)")

    # ------------------------------------------------------------------ likelihoods

    def _logits(self, model, batch: Mapping[str, Any]):
        device = next(model.parameters()).device
        logits = model(**self.model_inputs(batch, device)).logits
        B = self.batch_size(batch)
        if logits.dim() != 2 or logits.shape[0] != B:
            raise UserError(f"the model's logits have shape {tuple(logits.shape)}; expected (batch, classes)")
        return logits

    @staticmethod
    def _labels(batch, device, num_classes: int):
        import torch

        labels = next((batch[k] for k in LABEL_KEYS if k in batch), None)
        if labels is None:
            raise UserError("the data has no labels (the empirical Fisher and the loss need them)")
        y = torch.as_tensor(labels).to(device=device, dtype=torch.long).reshape(-1)
        bad = (y < 0) | (y >= num_classes)
        if bool(bad.any()):
            raise UserError(f"label {int(y[bad][0])} is outside the model's {num_classes} classes")
        return y

    def log_likelihood(self, model, batch, *, targets, seed, index):
        import torch

        from gradmatch.fisher.estimators import Targets

        logits = self._logits(model, batch)
        if targets is Targets.DATA:
            y = self._labels(batch, logits.device, logits.shape[1])
        elif targets is Targets.MODEL:
            y = sample_labels(logits, index, seed)
        else:
            raise TypeError(f"targets must be a Targets member, not {targets!r}")
        dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        return torch.log_softmax(logits.to(dtype), dim=-1).gather(1, y.unsqueeze(1)).sum()

    def loss(self, model, batch):
        import torch

        logits = self._logits(model, batch)
        y = self._labels(batch, logits.device, logits.shape[1])
        loss = torch.nn.functional.cross_entropy(logits.float(), y, reduction="sum")
        return loss, int(y.numel()), {"correct": float((logits.argmax(-1) == y).sum())}

    def loss_metrics(self, sums, count, loss_sum):
        return {"accuracy": sums.get("correct", 0.0) / max(1, count)}

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, model, processor, dataset, *, batch_size, max_length, progress):
        """Accuracy, macro-F1 and the loss (Hugging Face ``Trainer.predict``); per example: label,
        prediction, probabilities."""
        import tempfile

        import numpy as np
        import torch
        from transformers import Trainer, TrainingArguments


        num_labels = int(model.config.num_labels)
        self.check_labels(dataset, "given", num_labels)
        labels = [int(v) for v in dataset["label"]]
        encoded = self.encode(dataset, processor, model_max_length(model, max_length), desc="preparing evaluation data")
        with tempfile.TemporaryDirectory(prefix="gradmatch-eval-") as work:
            args = TrainingArguments(output_dir=work, per_device_eval_batch_size=batch_size, report_to="none",
                                     disable_tqdm=not progress, dataloader_num_workers=0, save_strategy="no",
                                     dataloader_pin_memory=False)
            trainer = Trainer(model=model, args=args, data_collator=self.collator(processor), processing_class=processor)
            output = trainer.predict(encoded)
        logits = output.predictions[0] if isinstance(output.predictions, tuple) else output.predictions
        probabilities = torch.softmax(torch.as_tensor(np.asarray(logits), dtype=torch.float64), dim=-1).numpy()
        predictions = probabilities.argmax(axis=-1).tolist()
        loss = output.metrics.get("test_loss")
        metrics = {**classification_metrics(labels, predictions), "num_examples": len(labels),
                   "loss": float(loss) if loss is not None else None, "num_labels": num_labels}
        records = [{"index": i, "label": y, "prediction": p, "probabilities": [round(float(q), 6) for q in probs]}
                   for i, (y, p, probs) in enumerate(zip(labels, predictions, probabilities))]
        return metrics, records

    def trainer_metrics(self):
        return _accuracy
