"""The experiment report: a markdown table, JSON, and plots of accuracy against α and of each method's best.

Rows are the parent, each child, each merge at each α and the multitask model; columns are the tasks
and their average (accuracy, in percent in the table).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from gradmatch.errors import UserError
from gradmatch.fsutil import atomic_dir, write_text

#: The files a report folder holds.
REPORT_FILES = ("report.md", "report.json", "alpha_average.png", "alpha_per_task.png", "best_per_task.png")


def _read_metrics(folder: str | Path) -> dict[str, Any] | None:
    path = Path(folder) / "metrics.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from exc


def _row(label: str, kind: str, tasks: list[str], metrics: dict[str, dict], method: str | None = None,
         alpha: float | None = None) -> dict[str, Any]:
    acc = {t: float(metrics[t]["accuracy"]) for t in tasks if t in metrics}
    average = sum(acc.values()) / len(acc) if len(acc) == len(tasks) else None
    return {"label": label, "kind": kind, "method": method, "alpha": alpha, "accuracy": acc, "average": average,
            "macro_f1": {t: metrics[t].get("macro_f1") for t in tasks if t in metrics}}


def collect(params: dict[str, Any], inputs: dict[str, str]) -> dict[str, Any]:
    """Read every evaluation and merge result named in the report job's parameters (missing ones skipped)."""
    tasks = list(params["tasks"])
    rows, missing = [], []
    for entry in params["entries"]:
        metrics = _read_metrics(inputs[entry["key"]]) if entry["key"] in inputs else None
        if metrics is None:
            missing.append(entry["label"])
            continue
        if entry["kind"] == "model":
            rows.append(_row(entry["label"], "model", tasks, metrics["tasks"]))
        else:
            for point in metrics["alphas"]:
                rows.append(_row(f"{entry['label']} α={point['alpha']:g}", "merge", tasks, point["tasks"],
                                 method=entry["label"], alpha=float(point["alpha"])))
    return {"experiment": params.get("experiment", "experiment"), "tasks": tasks, "rows": rows, "missing": missing,
            "best": best_settings(rows)}


def best_settings(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """For each merge method, the α with the best average accuracy (ties: the smaller α)."""
    best: dict[str, dict[str, Any]] = {}
    for row in rows:
        if row["kind"] != "merge" or row["average"] is None:
            continue
        current = best.get(row["method"])
        if current is None or row["average"] > current["average"]:
            best[row["method"]] = {"alpha": row["alpha"], "average": row["average"], "accuracy": row["accuracy"]}
    return best


def markdown_table(results: dict[str, Any]) -> str:
    """Rows: models and merges; columns: every task and the average; accuracy in percent."""
    tasks = results["tasks"]
    head = "| model | " + " | ".join(tasks) + " | average |"
    lines = [head, "|" + "---|" * (len(tasks) + 2)]
    best = {m: b["alpha"] for m, b in results["best"].items()}
    for row in results["rows"]:
        cells = [f"{100 * row['accuracy'][t]:.1f}" if t in row["accuracy"] else "—" for t in tasks]
        avg = f"{100 * row['average']:.1f}" if row["average"] is not None else "—"
        label = row["label"]
        if row["kind"] == "merge" and best.get(row["method"]) == row["alpha"]:
            label, avg = f"**{label}**", f"**{avg}**"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {avg} |")
    return "\n".join(lines)


def alpha_table(results: dict[str, Any]) -> str:
    """Average accuracy (%) of each merge method (rows) at each α (columns): the robustness in numbers."""
    curves = _merge_curves(results)
    alphas = sorted({r["alpha"] for rows in curves.values() for r in rows})
    lines = ["| method | " + " | ".join(f"α={a:g}" for a in alphas) + " |", "|" + "---|" * (len(alphas) + 1)]
    for method, rows in curves.items():
        by_alpha = {r["alpha"]: r["average"] for r in rows}
        cells = [f"{100 * by_alpha[a]:.1f}" if by_alpha.get(a) is not None else "—" for a in alphas]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    refs = [r for r in results["rows"] if r["kind"] == "model" and r["label"] in ("parent", "multitask")]
    if refs:
        lines += ["", "For reference: " + ", ".join(
            f"{r['label']} {100 * r['average']:.1f}" for r in refs if r["average"] is not None) + "."]
    return "\n".join(lines)


def _text(results: dict[str, Any]) -> str:
    parts = [f"# {results['experiment']}: accuracy (%) of every model on every task", "",
             markdown_table(results), "",
             "Bold: each merge method's best α by average accuracy.", ""]
    if any(r["kind"] == "merge" for r in results["rows"]):
        parts += ["## Average accuracy (%) against α", "", alpha_table(results), ""]
    if results["missing"]:
        parts += [f"Not finished yet: {', '.join(results['missing'])}.", ""]
    parts += ["![accuracy against α](alpha_average.png)", "", "![accuracy against α per task](alpha_per_task.png)", "",
              "![best setting of each method per task](best_per_task.png)", ""]
    return "\n".join(parts)


# --------------------------------------------------------------------------- plots


def _merge_curves(results: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    curves: dict[str, list[dict[str, Any]]] = {}
    for row in results["rows"]:
        if row["kind"] == "merge":
            curves.setdefault(row["method"], []).append(row)
    for rows in curves.values():
        rows.sort(key=lambda r: r["alpha"])
    return curves


def _reference_rows(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["label"]: r for r in results["rows"] if r["kind"] == "model" and r["label"] in ("parent", "multitask")}


def _plot_alpha(ax, curves, refs, value, title: str) -> None:
    alphas = sorted({r["alpha"] for rows in curves.values() for r in rows}) or [0.0, 1.0]
    lo, hi = min(alphas), max(alphas)
    if lo == hi:
        lo, hi = lo - 0.5, hi + 0.5
    for method, rows in curves.items():
        points = [(r["alpha"], value(r)) for r in rows if value(r) is not None]
        if not points:
            continue
        xs, ys = zip(*points)
        if len(points) == 1:  # a method without α (e.g. plain averaging): a level line
            ax.plot([lo, hi], [ys[0], ys[0]], linestyle=":", label=method)
        else:
            ax.plot(xs, ys, marker="o", label=method)
    for label, style in (("parent", "--"), ("multitask", "-.")):
        if label in refs and value(refs[label]) is not None:
            ax.axhline(value(refs[label]), color="gray", linestyle=style, linewidth=1, label=label)
    ax.set_title(title)
    ax.set_xlabel("α (scale of every task vector)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)


def write_plots(results: dict[str, Any], out: Path, dpi: int = 100) -> list[Path]:
    """accuracy against α (average; per task) and each method's best α per task, as PNG files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = results["tasks"]
    curves, refs = _merge_curves(results), _reference_rows(results)
    written = []

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    _plot_alpha(ax, curves, refs, lambda r: r["average"], f"{results['experiment']}: average accuracy against α")
    if ax.get_legend_handles_labels()[1]:
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(out / "alpha_average.png", dpi=dpi)
    plt.close(fig)
    written.append(out / "alpha_average.png")

    cols = min(3, len(tasks))
    nrows = -(-len(tasks) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.2 * nrows), squeeze=False)
    for ax, task in zip(axes.flat, tasks):
        _plot_alpha(ax, curves, refs, lambda r, t=task: r["accuracy"].get(t), task)
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if labels:
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 5), fontsize=8)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(out / "alpha_per_task.png", dpi=dpi)
    plt.close(fig)
    written.append(out / "alpha_per_task.png")

    import numpy as np

    groups = tasks + ["average"]
    bars: list[tuple[str, list[float]]] = []
    by_label = {r["label"]: r for r in results["rows"] if r["kind"] == "model"}

    def values(acc: dict[str, float], average: float | None) -> list[float]:
        return [acc.get(t, np.nan) for t in tasks] + [np.nan if average is None else average]

    if "parent" in by_label:
        bars.append(("parent", values(by_label["parent"]["accuracy"], by_label["parent"]["average"])))
    # each task's own expert: the child trained on it (the parent for the parent's task)
    experts = {t: by_label.get(f"child-{t}", by_label.get("parent")) for t in tasks}
    if all(experts.values()):
        acc = {t: experts[t]["accuracy"].get(t, np.nan) for t in tasks}
        bars.append(("own-task model", values(acc, float(np.mean(list(acc.values()))))))
    for method, best in results["best"].items():
        bars.append((f"{method} (α={best['alpha']:g})", values(best["accuracy"], best["average"])))
    if "multitask" in by_label:
        bars.append(("multitask", values(by_label["multitask"]["accuracy"], by_label["multitask"]["average"])))
    fig, ax = plt.subplots(figsize=(max(6.4, 1.3 * len(groups) + 2) + 2.2, 4.2))
    width = 0.8 / max(1, len(bars))
    x = np.arange(len(groups))
    for i, (label, ys) in enumerate(bars):
        ax.bar(x + (i - (len(bars) - 1) / 2) * width, ys, width, label=label)
    ax.set_xticks(x, groups)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title(f"{results['experiment']}: best setting of each method, per task")
    ax.grid(axis="y", alpha=0.3)
    if bars:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(out / "best_per_task.png", dpi=dpi)
    plt.close(fig)
    written.append(out / "best_per_task.png")
    return written


def write_report(results: dict[str, Any], out: str | os.PathLike) -> Path:
    """Write report.md, report.json and the PNG plots into the folder ``out`` (which must exist)."""
    out = Path(out)
    write_text(out / "report.json", json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    write_text(out / "report.md", _text(results))
    write_plots(results, out)
    return out


def report_run(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> tuple[Path, dict[str, Any]]:
    """Build the report of a run folder from whatever has finished; written atomically to ``out``.

    ``out`` defaults to ``RUN_DIR/report`` (replacing what is there, which is derived data).
    """
    run_dir = Path(run_dir)
    plan_path = run_dir / "plan.json"
    if not plan_path.is_file():
        raise UserError(f"{run_dir} is not a gradmatch run folder (no plan.json)")
    try:
        plan = json.loads(plan_path.read_text())
        report_jobs = [j for j in plan["jobs"] if j["kind"] == "report"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{plan_path} is not a readable gradmatch plan: {' '.join(str(exc).split())[:200]}") from None
    if not report_jobs:
        raise UserError(f"{plan_path} has no report job")
    try:
        spec_path = Path(report_jobs[-1]["spec"])
        if not spec_path.is_file():
            spec_path = run_dir / "jobs" / spec_path.name
        spec = json.loads(spec_path.read_text())
        results = collect(spec["params"], spec["inputs"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"the report job of {run_dir} (its spec in {run_dir / 'jobs'} or a metrics.json) cannot be read: "
                        f"{' '.join(str(exc).split())[:200]}") from None
    if not results["rows"]:
        raise UserError(f"nothing in {run_dir} has finished yet: no evaluation to report")
    if out and Path(out).is_dir() and any(Path(out).iterdir()) and not (Path(out) / "report.json").is_file():
        raise UserError(f"output {out} already exists and is not a report folder (choose another --out)")
    out = Path(out) if out else run_dir / "report"
    if out.is_symlink():
        out.unlink()
    with atomic_dir(out, overwrite=True) as tmp:
        write_report(results, tmp)
    return out, results
