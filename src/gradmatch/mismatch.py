"""The paper's gradient mismatch of a merge: each task's loss gradient at the merged parameters
against the gradient at its child's own parameters, weighted as in the merge (Daheim et al., §3)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gradmatch.errors import UserError


@dataclass
class TaskMismatch:
    """One task t of a merge: α_t‖∇L_t(θ̄) − ∇L_t(θ_t)‖ and the merged model's error on that task."""

    task: str
    child: str
    alpha: float
    num_examples: int
    mismatch: float  # ‖α_t (∇L_t(θ̄) − ∇L_t(θ_t))‖₂
    grad_norm_merged: float  # ‖∇L_t(θ̄)‖₂
    grad_norm_child: float  # ‖∇L_t(θ_t)‖₂
    loss_merged: float
    accuracy_merged: float

    @property
    def error_merged(self) -> float:
        return 1.0 - self.accuracy_merged


@dataclass
class MergeMismatch:
    """The gradient mismatch of one merged model over all its tasks."""

    merged: str
    split: str
    tasks: list[TaskMismatch] = field(default_factory=list)
    total_mismatch: float = 0.0  # ‖Σ_t α_t (∇L_t(θ̄) − ∇L_t(θ_t))‖₂

    @property
    def mean_error(self) -> float:
        return sum(t.error_merged for t in self.tasks) / len(self.tasks)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for task, row in zip(self.tasks, data["tasks"]):
            row["error_merged"] = task.error_merged
        data["mean_error"] = self.mean_error
        return data


def loss_gradient(model, batches: Iterable[Mapping[str, Any]]) -> tuple[dict[str, Any], float, float, int]:
    """∇ of the mean cross-entropy over all examples of ``batches`` (true labels, eval mode, float64 sums).

    Returns (gradient by parameter name, mean loss, accuracy, number of examples).
    """
    import torch

    model.eval()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    sums = {n: torch.zeros(p.shape, dtype=torch.float64) for n, p in params.items()}
    total_loss, correct, count = 0.0, 0, 0
    for batch in batches:
        labels = batch["labels"]
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        model.zero_grad(set_to_none=True)
        logits = model(**inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.float(), labels, reduction="sum")
        loss.backward()
        for n, p in params.items():
            if p.grad is not None:
                sums[n] += p.grad.detach().to(torch.float64)
        total_loss += float(loss.detach())
        correct += int((logits.argmax(-1) == labels).sum())
        count += int(labels.numel())
    model.zero_grad(set_to_none=True)
    if count == 0:
        raise UserError("no examples to measure the gradient mismatch on")
    return {n: s / count for n, s in sums.items()}, total_loss / count, correct / count, count


def _norm(tensors: Iterable[Any]) -> float:
    return math.sqrt(sum(float((t * t).sum()) for t in tensors))


def _batches(model_path: str, data: str, split: str, *, max_length: int, batch_size: int, data_dir, cache: dict):
    """Load the model at ``model_path`` and the encoded examples of ``data`` for it (encodings cached by processor)."""
    import torch

    from gradmatch import data as gdata
    from gradmatch.models import load_for_classification

    model, processor = load_for_classification(model_path)
    key = (data, type(processor).__name__, getattr(processor, "name_or_path", None))
    if key not in cache:
        raw = gdata.load_split(data, split, data_dir=data_dir, num_labels=model.config.num_labels)
        cache[key] = gdata.encode(raw, processor, gdata.model_max_length(model, max_length))
    loader = torch.utils.data.DataLoader(cache[key], batch_size=batch_size, shuffle=False,
                                         collate_fn=gdata.collator(processor))
    return model, loader


def merge_sources(merged: str | os.PathLike) -> tuple[list[str], list[float]]:
    """The children and α_t recorded in a merged folder's ``merge.json`` (written by gradmatch merge)."""
    record = Path(merged) / "merge.json"
    if not record.is_file():
        raise UserError(f"{merged} has no merge.json: give the children and alphas explicitly")
    try:
        info = json.loads(record.read_text(encoding="utf-8"))
        models = info["models"]
        return [str(m["model"]) for m in models], [float(m["weight"]) for m in models]
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{record} is not a merge record gradmatch can read: {exc}") from None


def child_task(child: str | os.PathLike) -> str:
    """The data set a child was trained on, from its ``training_metadata.json``."""
    from gradmatch.train import read_training_metadata

    meta = read_training_metadata(child)
    if not meta or not meta.get("dataset_name"):
        raise UserError(f"child {child} has no training_metadata.json naming its data set: pass --data")
    return str(meta["dataset_name"])


def gradient_mismatch(
    merged: str | os.PathLike,
    *,
    children: Sequence[str] | None = None,
    data: Sequence[str] | None = None,
    alphas: Sequence[float] | None = None,
    split: str = "test",
    max_length: int = 128,
    batch_size: int = 16,
    data_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> MergeMismatch:
    """Measure the gradient mismatch of ``merged`` on held-out data of each child's task.

    For task t with child θ_t, weight α_t and mean loss L_t on ``split`` of its data set:
    mismatch_t = ‖α_t (∇L_t(θ̄) − ∇L_t(θ_t))‖ and total = ‖Σ_t α_t (∇L_t(θ̄) − ∇L_t(θ_t))‖, the term
    whose size bounds how far the merge θ̄ is from a model trained on all tasks. Children and α_t
    default to the merge's own record (``merge.json``); data sets to each child's training data set.
    """
    import torch
    from tqdm.auto import tqdm

    if children is None or alphas is None:
        recorded_children, recorded_alphas = merge_sources(merged)
        children = list(children) if children is not None else recorded_children
        alphas = list(alphas) if alphas is not None else recorded_alphas
    children, alphas = list(children), [float(a) for a in alphas]
    if len(alphas) != len(children):
        raise UserError(f"{len(alphas)} alphas given for {len(children)} children")
    data = list(data) if data is not None else [child_task(c) for c in children]
    if len(data) != len(children):
        raise UserError(f"{len(data)} data sets given for {len(children)} children")
    if batch_size <= 0 or max_length <= 0:
        raise UserError("batch size and max length must be positive")

    result = MergeMismatch(merged=str(merged), split=split)
    total: dict[str, torch.Tensor] | None = None
    cache: dict = {}
    bar = tqdm(list(zip(children, data, alphas)), desc="gradient mismatch", unit="task", disable=None if progress else True)
    for child, task, alpha in bar:
        grads = {}
        stats = {}
        for role, path in (("merged", str(merged)), ("child", child)):
            model, loader = _batches(path, task, split, max_length=max_length, batch_size=batch_size,
                                     data_dir=data_dir, cache=cache)
            grads[role], loss, acc, n = loss_gradient(model, loader)
            stats[role] = (loss, acc, n)
            del model
        if grads["merged"].keys() != grads["child"].keys():
            raise UserError(f"{merged} and {child} have different parameters")
        diff = {k: alpha * (grads["merged"][k] - grads["child"][k]) for k in grads["merged"]}
        loss, acc, n = stats["merged"]
        result.tasks.append(TaskMismatch(
            task=task, child=child, alpha=alpha, num_examples=n, mismatch=_norm(diff.values()),
            grad_norm_merged=_norm(grads["merged"].values()), grad_norm_child=_norm(grads["child"].values()),
            loss_merged=loss, accuracy_merged=acc))
        if total is None:
            total = diff
        else:
            for k in total:
                total[k] += diff[k]
    bar.close()
    result.total_mismatch = _norm(total.values()) if total else 0.0
    return result
