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
    accuracy_merged: float | None  # classifiers; None for kinds without accuracy
    metrics_merged: dict = field(default_factory=dict)  # the kind's metrics of the loss (accuracy, perplexity, ...)

    @property
    def error_merged(self) -> float | None:
        return None if self.accuracy_merged is None else 1.0 - self.accuracy_merged


@dataclass
class MergeMismatch:
    """The gradient mismatch of one merged model over all its tasks."""

    merged: str
    split: str
    tasks: list[TaskMismatch] = field(default_factory=list)
    total_mismatch: float = 0.0  # ‖Σ_t α_t (∇L_t(θ̄) − ∇L_t(θ_t))‖₂

    @property
    def mean_error(self) -> float | None:
        errors = [t.error_merged for t in self.tasks]
        return None if None in errors else sum(errors) / len(errors)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for task, row in zip(self.tasks, data["tasks"]):
            row["error_merged"] = task.error_merged
        data["mean_error"] = self.mean_error
        return data


def loss_gradient(model, batches: Iterable[Mapping[str, Any]], kind=None
                  ) -> tuple[dict[str, Any], float, dict[str, float], int]:
    """∇ of the mean per-example loss over all examples of ``batches`` (the kind's loss: cross-entropy of the
    true label for classifiers, the summed next-token NLL of a sequence for causal LMs; eval mode, float64 sums).

    Returns (gradient by parameter name, mean loss, the kind's metrics of the loss, number of examples).
    """
    import torch

    if kind is None:
        from gradmatch.kinds import kind_of_config

        kind = kind_of_config(getattr(model, "config", None))
    model.eval()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    sums = {n: torch.zeros(p.shape, dtype=torch.float64) for n, p in params.items()}
    total_loss, count, extra = 0.0, 0, {}
    for batch in batches:
        model.zero_grad(set_to_none=True)
        loss, n, more = kind.loss(model, batch)
        loss.backward()
        for name, p in params.items():
            if p.grad is not None:
                sums[name] += p.grad.detach().to(torch.float64)
        total_loss += float(loss.detach())
        count += n
        for key, value in more.items():
            extra[key] = extra.get(key, 0.0) + value
    model.zero_grad(set_to_none=True)
    if count == 0:
        raise UserError("no examples to measure the gradient mismatch on")
    return {n: s / count for n, s in sums.items()}, total_loss / count, kind.loss_metrics(extra, count, total_loss), count


def _norm(tensors: Iterable[Any]) -> float:
    return math.sqrt(sum(float((t * t).sum()) for t in tensors))


def _batches(model_path: str, data: str, split: str, *, max_length: int, batch_size: int, data_dir,
             max_examples: int | None, cache: dict):
    """Load the model at ``model_path`` and the encoded examples of ``data`` for it (encodings cached by processor)."""
    import torch

    from gradmatch.data import load_split
    from gradmatch.models import kind_of, load_model, model_max_length

    kind = kind_of(model_path)
    model, processor = load_model(model_path, kind=kind)
    key = (data, kind.name, type(processor).__name__, getattr(processor, "name_or_path", None))
    if key not in cache:
        raw = load_split(data, split, data_dir=data_dir)
        kind.check_data(raw, f"{data} ({split})", str(model_path))
        if kind.needs_labels:
            kind.check_labels(raw, f"{data} ({split})", int(model.config.num_labels))
        if max_examples is not None:
            raw = raw.select(range(min(max_examples, len(raw))))
        cache[key] = kind.encode(raw, processor, model_max_length(model, max_length))
    loader = torch.utils.data.DataLoader(cache[key], batch_size=batch_size, shuffle=False,
                                         collate_fn=kind.collator(processor))
    return model, loader, kind


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
    max_examples: int | None = None,
    child_gradients: dict | None = None,
    progress: bool = True,
) -> MergeMismatch:
    """Measure the gradient mismatch of ``merged`` on held-out data of each child's task.

    For task t with child θ_t, weight α_t and mean loss L_t on ``split`` of its data set:
    mismatch_t = ‖α_t (∇L_t(θ̄) − ∇L_t(θ_t))‖ and total = ‖Σ_t α_t (∇L_t(θ̄) − ∇L_t(θ_t))‖, the term
    whose size bounds how far the merge θ̄ is from a model trained on all tasks. Children and α_t
    default to the merge's own record (``merge.json``); data sets to each child's training data set.
    ``max_examples`` caps the examples per task; ``child_gradients``, a dict kept by the caller, caches
    ∇L_t(θ_t) across calls (the children's gradients do not depend on the merge).
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
    if batch_size <= 0 or max_length <= 0 or (max_examples is not None and max_examples <= 0):
        raise UserError("batch size, max length and max examples must be positive")
    if child_gradients is None:
        child_gradients = {}

    result = MergeMismatch(merged=str(merged), split=split)
    total: dict[str, torch.Tensor] | None = None
    cache: dict = {}
    bar = tqdm(list(zip(children, data, alphas)), desc="gradient mismatch", unit="task", disable=None if progress else True)
    for child, task, alpha in bar:
        grads = {}
        stats = {}
        child_key = (str(child), task, split, max_length, max_examples)
        for role, path in (("merged", str(merged)), ("child", child)):
            if role == "child" and child_key in child_gradients:
                grads[role], stats[role] = child_gradients[child_key]
                continue
            model, loader, kind = _batches(path, task, split, max_length=max_length, batch_size=batch_size,
                                           data_dir=data_dir, max_examples=max_examples, cache=cache)
            grads[role], loss, metrics, n = loss_gradient(model, loader, kind)
            stats[role] = (loss, metrics, n)
            del model
        child_gradients[child_key] = (grads["child"], stats["child"])
        if grads["merged"].keys() != grads["child"].keys():
            raise UserError(f"{merged} and {child} have different parameters")
        diff = {k: alpha * (grads["merged"][k] - grads["child"][k]) for k in grads["merged"]}
        loss, metrics, n = stats["merged"]
        result.tasks.append(TaskMismatch(
            task=task, child=child, alpha=alpha, num_examples=n, mismatch=_norm(diff.values()),
            grad_norm_merged=_norm(grads["merged"].values()), grad_norm_child=_norm(grads["child"].values()),
            loss_merged=loss, accuracy_merged=metrics.get("accuracy"), metrics_merged=metrics))
        if total is None:
            total = diff
        else:
            for k in total:
                total[k] += diff[k]
    bar.close()
    result.total_mismatch = _norm(total.values()) if total else 0.0
    return result


# --------------------------------------------------------------------------- every merge of a pipeline run


def _finished_merge_jobs(run_dir: Path) -> list[dict[str, Any]]:
    """The job specs of the run's finished merge jobs, in the order of the run's plan (relocated into ``run_dir``)."""
    from gradmatch.pipeline.graph import read_run_specs

    specs = read_run_specs(run_dir, "merge")
    finished = [s for s in specs if (Path(s["out"]) / "metrics.json").is_file()]
    if not finished:
        raise UserError(f"run {run_dir} has no finished merge jobs yet")
    return finished


def run_mismatch(
    run_dir: str | os.PathLike,
    *,
    max_examples: int | None = 100,
    max_length: int = 128,
    batch_size: int = 16,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """The gradient mismatch of every merge (each method at each α) of a finished pipeline run.

    Each merge is rebuilt from the YAML its job kept (``configs/alpha-*.yaml``) into a temporary folder
    (or read from ``models/`` when kept), measured on the first ``max_examples`` examples of each
    child's test set as the run prepared it, and set beside its test error from the run's metrics.
    """
    import tempfile

    import yaml
    from tqdm.auto import tqdm

    from gradmatch.merge import merge

    run_dir = Path(run_dir)
    rows: list[dict[str, Any]] = []
    cache: dict = {}
    jobs = _finished_merge_jobs(run_dir)
    work = [(spec, entry) for spec in jobs
            for entry in json.loads((Path(spec["out"]) / "metrics.json").read_text(encoding="utf-8"))["alphas"]]
    bar = tqdm(work, desc="mismatch of each merge", unit="merge", disable=None if progress else True)
    with tempfile.TemporaryDirectory(prefix="gradmatch-mismatch-", dir=run_dir) as tmp:
        for spec, entry in bar:
            params, inputs, out = spec["params"], spec["inputs"], Path(spec["out"])
            tag = f"alpha-{entry['alpha']:g}"
            children = params["children"]
            model = out / "models" / tag
            if not model.is_dir():
                config = yaml.safe_load((out / "configs" / f"{tag}.yaml").read_text(encoding="utf-8"))
                model = merge(config, Path(tmp) / f"{params['label']}-{tag}", progress=False)
            result = gradient_mismatch(
                model, data=[str(Path(inputs[f"test/{c}"]) / "data") for c in children], split="test",
                max_examples=max_examples, max_length=max_length, batch_size=batch_size,
                child_gradients=cache, progress=False)
            errors = {c: 1.0 - float(entry["tasks"][c]["accuracy"]) for c in children}
            rows.append({
                "method": params["method"], "label": params["label"], "alpha": float(entry["alpha"]),
                "total_mismatch": result.total_mismatch,
                "mismatch": {c: t.mismatch for c, t in zip(children, result.tasks)},
                "test_error": errors, "mean_test_error": sum(errors.values()) / len(errors),
                "examples_per_task": result.tasks[0].num_examples,
            })
            if model.parent == Path(tmp):
                import shutil

                shutil.rmtree(model)
    bar.close()
    return rows


def plot_mismatch(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike, title: str = "") -> Path:
    """Test error against gradient mismatch, one colour per method, α written beside each point (Fig. 1, right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=100)
    for label in dict.fromkeys(r["label"] for r in rows):
        mine = sorted((r for r in rows if r["label"] == label), key=lambda r: r["alpha"])
        xs = [r["total_mismatch"] for r in mine]
        ys = [100 * r["mean_test_error"] for r in mine]
        ax.plot(xs, ys, "o-", label=label, alpha=0.85)
        for r, x, y in zip(mine, xs, ys):
            ax.annotate(f"{r['alpha']:g}", (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
    ax.set_xlabel(r"gradient mismatch $\|\sum_t \alpha_t(\nabla L_t(\bar\theta) - \nabla L_t(\theta_t))\|$")
    ax.set_ylabel("mean test error of the merged tasks (%)")
    ax.set_title(title or "test error against gradient mismatch (numbers: α)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def write_run_mismatch(run_dir: str | os.PathLike, out: str | os.PathLike | None = None, *, overwrite: bool = False,
                       **kwargs) -> Path:
    """Measure every merge of a run (:func:`run_mismatch`) and write ``mismatch.json`` and the plot to ``out``
    (default ``RUN_DIR/mismatch``), atomically."""
    from gradmatch.fsutil import atomic_dir, check_output_dir

    out = Path(out) if out is not None else Path(run_dir) / "mismatch"
    check_output_dir(out, overwrite)
    rows = run_mismatch(run_dir, **kwargs)
    with atomic_dir(out, overwrite) as tmp:
        (tmp / "mismatch.json").write_text(json.dumps({"run": str(run_dir), "merges": rows}, indent=2) + "\n",
                                           encoding="utf-8")
        plot_mismatch(rows, tmp / "mismatch_vs_error.png")
    return out
