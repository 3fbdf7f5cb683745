"""The experiment report: a markdown table, JSON, and plots of the kind's metric against α, of each method's
best, and — when generations were scored — of the unwanted-attribute rate against perplexity.

Rows are the parent, each child, each merge at each α and the multitask model; columns are the tasks and
their average of the run's metric (accuracy in percent for classifiers, perplexity for causal LMs; in a run whose
tasks name lm-eval tasks, those tasks' primary metric, with the perplexities in a table of their own), the shared
lm-eval tasks, and the generation scores when the run has them.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from gradmatch.errors import UserError
from gradmatch.fsutil import atomic_dir, write_text

#: The files a report folder always holds (``tradeoff.png`` too when generations were scored).
REPORT_FILES = ("report.md", "report.json", "alpha_average.png", "alpha_per_task.png", "best_per_task.png")


def _read_metrics(folder: str | Path) -> dict[str, Any] | None:
    path = Path(folder) / "metrics.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from exc


#: lm-eval metrics that are proportions (shown in percent, as accuracy); any other is shown as it is.
PROPORTIONS = ("acc", "acc_norm", "exact_match", "f1", "mcc", "acc_mutual_info")


def _lm_scores(source: dict[str, Any], names: dict[str, str]) -> tuple[dict[str, float], dict[str, float]]:
    """Column → the primary metric of its lm-eval task (``names``: column → lm-eval task), and its standard error,
    from an evaluation's ``lm_eval`` block (what gradmatch.harness.evaluate_tasks returned)."""
    scores = (source.get("lm_eval") or {}).get("tasks") or {}
    values, stderr = {}, {}
    for column, name in names.items():
        task = scores.get(name) or {}
        primary = task.get("primary")
        if primary in task and task[primary] is not None:
            values[column] = float(task[primary])
            if task.get(f"{primary}_stderr") is not None:
                stderr[column] = float(task[f"{primary}_stderr"])
    return values, stderr


def _row(label: str, kind: str, tasks: list[str], source: dict[str, Any], metric: str, method: str | None = None,
         alpha: float | None = None, generation: dict | None = None, statistics: dict | None = None,
         lm_eval: dict[str, Any] | None = None) -> dict[str, Any]:
    """One row of the table from one evaluation (``source``: its ``tasks`` metrics and, with lm-eval tasks, its
    ``lm_eval`` scores). With each task's own lm-eval task (``lm_eval["tasks"]``) the row's values are those tasks'
    primary metrics and its perplexities a separate block; shared lm-eval tasks are a block of their own."""
    metrics = source.get("tasks") or {}
    own = (lm_eval or {}).get("tasks") or {}
    stderr: dict[str, float] = {}
    if own:
        values, stderr = _lm_scores(source, {t: own[t] for t in tasks})
    else:
        values = {t: float(metrics[t][metric]) for t in tasks if t in metrics and metric in metrics[t]}
    average = sum(values.values()) / len(values) if values and len(values) == len(tasks) else None
    row = {"label": label, "kind": kind, "method": method, "alpha": alpha, "values": values, "average": average}
    if lm_eval:
        row["stderr"] = stderr
        # the average of k tasks on disjoint documents: its standard error is sqrt(sum of s.e.²) / k
        row["average_stderr"] = (math.sqrt(sum(v * v for v in stderr.values())) / len(stderr)
                                 if average is not None and own and len(stderr) == len(tasks) else None)
        row["shared"], row["shared_stderr"] = _lm_scores(source, {n: n for n in lm_eval.get("shared") or []})
        if own:
            row["perplexity"] = {t: float(m["perplexity"]) for t, m in metrics.items() if m.get("perplexity") is not None}
    if generation:  # the scoring classifier is the report's `classifier` (its folder is this machine's path)
        row["generation"] = {k: v for k, v in generation.items() if k != "classifier"}
    if statistics:
        row["statistics"] = {k: v.get("fraction") for k, v in statistics.items() if isinstance(v, dict)}
    return row


def _mean_sd(values: list[float]) -> tuple[float, float | None]:
    import statistics

    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def _aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from the same row of several seeds: means, sample standard deviations, and each seed's average."""
    first = runs[0]
    tasks = sorted(set.intersection(*(set(r["values"]) for r in runs)), key=list(first["values"]).index)
    row = {k: first[k] for k in ("label", "kind", "method", "alpha")}
    row["values"], row["sd"] = {}, {}
    for t in tasks:
        row["values"][t], row["sd"][t] = _mean_sd([r["values"][t] for r in runs])
    averages = [r["average"] for r in runs if r["average"] is not None]
    row["average"], row["average_sd"] = _mean_sd(averages) if len(averages) == len(runs) else (None, None)
    row["seeds"] = [r["seed"] for r in runs]
    row["per_seed"] = {str(r["seed"]): r["average"] for r in runs}
    for block in ("shared", "perplexity"):  # lm-eval runs: the shared tasks' scores and the perplexities
        if block in first:
            names = [n for n in first[block] if all(n in r.get(block, {}) for r in runs)]
            pairs = {n: _mean_sd([r[block][n] for r in runs]) for n in names}
            row[block] = {n: m for n, (m, _) in pairs.items()}
            row[f"{block}_sd"] = {n: sd for n, (_, sd) in pairs.items()}
    for block in ("stderr", "shared_stderr"):  # the harness's standard errors, averaged over the seeds
        if block in first:
            names = [n for n in first[block] if all(n in r.get(block, {}) for r in runs)]
            row[block] = {n: _mean_sd([r[block][n] for r in runs])[0] for n in names}
    if "average_stderr" in first:
        given = [r["average_stderr"] for r in runs if r.get("average_stderr") is not None]
        row["average_stderr"] = _mean_sd(given)[0] if given and len(given) == len(runs) else None
    gens = [r["generation"] for r in runs if r.get("generation")]
    if len(gens) == len(runs):
        generation = {}
        for key, value in gens[0].items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                generation[key], sd = _mean_sd([g[key] for g in gens])
                if key == "unwanted_rate" and sd is not None:
                    generation["unwanted_rate_sd"] = sd
            else:
                generation[key] = value
        row["generation"] = generation
    stats = [r["statistics"] for r in runs if r.get("statistics")]
    if stats:
        row["statistics"] = {k: _mean_sd([s[k] for s in stats])[0] for k in stats[0]}
    return row


def collect(params: dict[str, Any], inputs: dict[str, str]) -> dict[str, Any]:
    """Read every evaluation and merge result named in the report job's parameters (missing ones skipped);
    rows of several seeds become one row with means and standard deviations."""
    lm_eval = params.get("lm_eval")
    all_tasks = list(params["tasks"])
    # with each task's own lm-eval task, the table's tasks are those judged by one (the others: perplexity only)
    tasks = [t for t in all_tasks if t in lm_eval["tasks"]] if lm_eval and lm_eval.get("tasks") else all_tasks
    metric = params.get("metric", "accuracy")
    primaries: dict[str, str] = {}
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    missing, classifiers = [], []
    hessians: dict[str, dict[str, Any]] = {}
    for entry in params["entries"]:
        metrics = _read_metrics(inputs[entry["key"]]) if entry["key"] in inputs else None
        seed = entry.get("seed", 0)
        if metrics is None:
            if entry["label"] not in missing:
                missing.append(entry["label"])
            continue
        if entry["kind"] == "classifier":
            classifiers.append({"label": entry["label"], "seed": seed, **next(iter(metrics["tasks"].values()), {})})
            continue
        if entry["kind"] == "merge" and metrics.get("hessians"):
            hessians.setdefault(entry["label"], metrics["hessians"])
        points = ([(entry["label"], None, metrics)] if entry["kind"] == "model" else
                  [(f"{entry['label']} α={p['alpha']:g}", p, p) for p in metrics["alphas"]])
        for label, point, source in points:
            row = _row(label, entry["kind"], tasks, source, metric,
                       method=None if point is None else entry["label"],
                       alpha=None if point is None else float(point["alpha"]), generation=source.get("generation"),
                       statistics=None if point is None else point.get("statistics"), lm_eval=lm_eval)
            for name, scores in ((source.get("lm_eval") or {}).get("tasks") or {}).items():
                if scores.get("primary"):
                    primaries.setdefault(name, scores["primary"])
            runs.setdefault((entry["kind"], label), []).append({**row, "seed": seed})
    rows = [_aggregate(group) for group in runs.values()]
    higher = bool(params.get("higher_is_better", True))
    seeds = params.get("seeds") or sorted({r["seed"] for group in runs.values() for r in group}) or [0]
    classifier = None
    if classifiers:
        classifier = {"label": classifiers[0]["label"], "num_examples": classifiers[0].get("num_examples")}
        for key in ("accuracy", "macro_f1"):
            if all(key in c for c in classifiers):
                classifier[key], classifier[f"{key}_sd"] = _mean_sd([c[key] for c in classifiers])
    best = best_settings(rows, higher)
    # a removal run's "best" α by fluency is the one that removes least: its pairing would say nothing
    removal = any(r.get("generation") for r in rows)
    results = {"experiment": params.get("experiment", "experiment"), "tasks": tasks, "metric": metric,
               "higher_is_better": higher, "fluency_task": params.get("fluency_task"), "seeds": seeds, "rows": rows,
               "missing": missing, "classifier": classifier, "best": best,
               "paired": paired_differences(runs, {} if removal else best),
               "hessian_estimators": hessian_estimators(hessians), "hessians": hessians}
    if lm_eval:
        own = lm_eval.get("tasks") or {}
        results["lm_eval"] = {"tasks": own, "shared": list(lm_eval.get("shared") or []),
                              "primary": {n: primaries[n] for n in [*own.values(), *(lm_eval.get("shared") or [])]
                                          if n in primaries}}
        if own:
            results["perplexity_tasks"] = all_tasks
    return results


#: What each estimator a Hessian's fisher.json names means (the report's Hessian line).
ESTIMATOR_NOTES = {
    "sampled": "a Fisher job, labels sampled from the model", "empirical": "a Fisher job, the data's labels",
    "generated": "a data-free Fisher on sequences the model generated",
    "adam": "AdamW's second moment, saved in training",
    "ivon": "IVON's Hessian, saved in training", "prior": "base_hessian: prior, N_0·c·I",
    "unrecorded": "its fisher.json names no estimator",
}


def _estimators_of(read: dict[str, Any], role: str) -> list[str]:
    """The estimators one merge's Hessians of ``role`` (``parent``, ``children``) came from; ``unrecorded`` for a
    Hessian whose fisher.json names none (the original code's)."""
    if role == "parent":
        return [read["parent"] or "unrecorded"] if "parent" in read else []
    return [estimator or "unrecorded" for estimator in (read.get("children") or {}).values()]


def hessian_estimators(hessians: dict[str, dict[str, Any]]) -> dict[str, list[str]]:
    """The estimators of the Hessians the merges read, per role (``parent``, ``children``), sorted."""
    found = {role: sorted({e for read in hessians.values() for e in _estimators_of(read, role)})
             for role in ("parent", "children")}
    return {role: names for role, names in found.items() if names}


def hessian_line(results: dict[str, Any]) -> str | None:
    """One sentence naming where the merges' Hessians came from (None: no merge read one)."""
    summary = results.get("hessian_estimators") or {}
    by_merge = results.get("hessians") or {}
    parts = []
    for role, what in (("parent", "the parent's (H_0)"), ("children", "the children's")):
        names = []
        for estimator in summary.get(role, []):
            text = f"`{estimator}` ({ESTIMATOR_NOTES.get(estimator, estimator)})"
            if len(summary[role]) > 1:  # which merge read which
                text += " in " + ", ".join(label for label, read in by_merge.items()
                                           if estimator in _estimators_of(read, role))
            names.append(text)
        if names:
            parts.append(f"{what} from {', '.join(names)}")
    return "Hessians read by the merges: " + "; ".join(parts) + "." if parts else None


def _t_quantile(n: int) -> float:
    """The 97.5% quantile of Student's t with n − 1 degrees of freedom (a 95% two-sided interval)."""
    from scipy.stats import t

    return float(t.ppf(0.975, n - 1))


def paired_differences(runs: dict[tuple[str, str], list[dict[str, Any]]], best: dict[str, dict[str, Any]],
                       a: str = "gradient_matching", b: str = "task_arithmetic") -> list[dict[str, Any]]:
    """Method ``a`` minus method ``b`` in average metric, paired by seed: at every α both have, and at each one's
    best α. Mean difference, the per-seed differences and a 95% t interval (with two or more seeds)."""
    def by_seed(method: str, alpha: float) -> dict[int, float]:
        group = runs.get(("merge", f"{method} α={alpha:g}"), [])
        return {r["seed"]: r["average"] for r in group if r["average"] is not None}

    alphas = sorted({r[0]["alpha"] for (kind, _), r in runs.items() if kind == "merge" and r[0]["method"] == a}
                    & {r[0]["alpha"] for (kind, _), r in runs.items() if kind == "merge" and r[0]["method"] == b})
    pairs = [(alpha, alpha, f"α = {alpha:g}") for alpha in alphas]
    if a in best and b in best:
        pairs.append((best[a]["alpha"], best[b]["alpha"], f"each at its best α ({best[a]['alpha']:g}, {best[b]['alpha']:g})"))
    out = []
    for alpha_a, alpha_b, what in pairs:
        x, y = by_seed(a, alpha_a), by_seed(b, alpha_b)
        common = sorted(set(x) & set(y))
        if not common:
            continue
        diffs = [x[s] - y[s] for s in common]
        mean, sd = _mean_sd(diffs)
        half = _t_quantile(len(diffs)) * sd / len(diffs) ** 0.5 if sd is not None else None
        out.append({"a": a, "b": b, "alpha_a": alpha_a, "alpha_b": alpha_b, "what": what, "n": len(diffs),
                    "mean": mean, "ci95": [mean - half, mean + half] if half is not None else None,
                    "per_seed": {str(s): d for s, d in zip(common, diffs)}})
    return out


def best_settings(rows: list[dict[str, Any]], higher_is_better: bool = True) -> dict[str, dict[str, Any]]:
    """For each merge method, the α with the best (mean) average of the metric (ties: the smaller α)."""
    best: dict[str, dict[str, Any]] = {}
    sign = 1 if higher_is_better else -1
    for row in rows:
        if row["kind"] != "merge" or row["average"] is None:
            continue
        current = best.get(row["method"])
        if current is None or sign * row["average"] > sign * current["average"]:
            best[row["method"]] = {"alpha": row["alpha"], "average": row["average"], "values": row["values"],
                                   "average_sd": row.get("average_sd")}
    return best


def _fmt(value: float | None, metric: str, sd: float | None = None) -> str:
    """A value of the metric (accuracy in percent), with ``± sd`` when several seeds gave it."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if metric == "accuracy":
        text = f"{100 * value:.1f}" + (f" ± {100 * sd:.1f}" if sd is not None else "")
    else:
        text = f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"
        if sd is not None:
            text += f" ± {sd:,.0f}" if abs(sd) >= 1000 else f" ± {sd:.2g}"
    return text


def _has_generation(results: dict[str, Any]) -> bool:
    return any(row.get("generation") for row in results["rows"])


def _unwanted(row: dict[str, Any]) -> str:
    """The unwanted rate ± its spread: the standard deviation over seeds, else the binomial standard error."""
    g = row.get("generation") or {}
    if "unwanted_rate" not in g:
        return "—"
    spread = g.get("unwanted_rate_sd", g["unwanted_rate_se"])
    return f"{100 * g['unwanted_rate']:.1f} ± {100 * spread:.1f}"


def _shared_tasks(results: dict[str, Any]) -> list[str]:
    return list((results.get("lm_eval") or {}).get("shared") or [])


def _shared_metric(results: dict[str, Any], name: str) -> str:
    """How a shared lm-eval task's column is shown: ``accuracy`` (percent) for a proportion, else its metric."""
    primary = ((results.get("lm_eval") or {}).get("primary") or {}).get(name, "acc")
    return "accuracy" if primary in PROPORTIONS else primary


def _spread(results: dict[str, Any], sd: float | None, stderr: float | None) -> float | None:
    """What follows ``±``: the sd over seeds, or — in a run of one seed — the harness's standard error."""
    if sd is not None:
        return sd
    return stderr if len(results.get("seeds") or [0]) == 1 else None


def _perplexity(row: dict[str, Any], task: str) -> float | None:
    """A row's perplexity on a task: its perplexity block in an lm-eval run, else its values (the run's metric)."""
    return row["perplexity"].get(task) if "perplexity" in row else row["values"].get(task)


def markdown_table(results: dict[str, Any]) -> str:
    """Rows: models and merges; columns: every task and the average of the run's metric (then the shared lm-eval
    tasks, and generation scores)."""
    tasks, metric = results["tasks"], results["metric"]
    shared = _shared_tasks(results)
    generation = _has_generation(results)
    head = (f"| model | {' | '.join(tasks)} | average |" + "".join(f" {n} |" for n in shared)
            + (" unwanted % | distinct-2 |" if generation else ""))
    lines = [head, "|" + "---|" * (len(tasks) + 2 + len(shared) + 2 * generation)]
    best = {m: b["alpha"] for m, b in results["best"].items()}
    for row in results["rows"]:
        sd, se = row.get("sd") or {}, row.get("stderr") or {}
        cells = [_fmt(row["values"].get(t), metric, _spread(results, sd.get(t), se.get(t))) for t in tasks]
        avg = _fmt(row["average"], metric, _spread(results, row.get("average_sd"), row.get("average_stderr")))
        label = row["label"]
        if row["kind"] == "merge" and best.get(row["method"]) == row["alpha"] and not generation:
            label, avg = f"**{label}**", f"**{avg}**"
        line = f"| {label} | " + " | ".join(cells) + f" | {avg} |"
        values, sds, ses = (row.get(k) or {} for k in ("shared", "shared_sd", "shared_stderr"))
        for n in shared:
            line += f" {_fmt(values.get(n), _shared_metric(results, n), _spread(results, sds.get(n), ses.get(n)))} |"
        if generation:
            g = row.get("generation") or {}
            line += f" {_unwanted(row)} | {g['distinct_2']:.3f} |" if g else " — | — |"
        lines.append(line)
    return "\n".join(lines)


def alpha_table(results: dict[str, Any]) -> str:
    """The average metric of each merge method (rows) at each α (columns): the robustness in numbers."""
    curves = _merge_curves(results)
    metric = results["metric"]
    alphas = sorted({r["alpha"] for rows in curves.values() for r in rows})
    lines = ["| method | " + " | ".join(f"α={a:g}" for a in alphas) + " |", "|" + "---|" * (len(alphas) + 1)]
    for method, rows in curves.items():
        by_alpha = {r["alpha"]: r for r in rows}
        cells = [_fmt(by_alpha[a]["average"], metric, by_alpha[a].get("average_sd")) if a in by_alpha else "—"
                 for a in alphas]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    refs = [r for r in results["rows"] if r["kind"] == "model" and r["label"] in ("parent", "multitask")]
    if refs:
        lines += ["", "For reference: " + ", ".join(
            f"{r['label']} {_fmt(r['average'], metric, r.get('average_sd'))}" for r in refs
            if r["average"] is not None) + "."]
    return "\n".join(lines)


def paired_table(results: dict[str, Any]) -> str:
    """Gradient matching minus task arithmetic, paired by seed: mean difference and its 95% interval."""
    metric, scale = results["metric"], (100 if results["metric"] == "accuracy" else 1)
    unit = " points" if metric == "accuracy" else ""
    lines = [f"| comparison | seeds | mean difference{unit} | 95% interval | per seed |", "|---|---|---|---|---|"]
    for p in results.get("paired", []):
        ci = "—" if p["ci95"] is None else f"[{scale * p['ci95'][0]:+.2f}, {scale * p['ci95'][1]:+.2f}]"
        per_seed = ", ".join(f"{scale * d:+.2f}" for d in p["per_seed"].values())
        lines.append(f"| {p['a']} − {p['b']}, {p['what']} | {p['n']} | {scale * p['mean']:+.2f} | {ci} | {per_seed} |")
    return "\n".join(lines)


def perplexity_table(results: dict[str, Any]) -> str:
    """An lm-eval run's perplexities: rows as the main table, columns every task's test split."""
    tasks = results.get("perplexity_tasks") or []
    lines = [f"| model | {' | '.join(tasks)} |", "|" + "---|" * (len(tasks) + 1)]
    for row in results["rows"]:
        sd = row.get("perplexity_sd") or {}
        lines.append(f"| {row['label']} | " + " | ".join(_fmt(_perplexity(row, t), "perplexity", sd.get(t))
                                                        for t in tasks) + " |")
    return "\n".join(lines)


def lm_eval_line(results: dict[str, Any]) -> str | None:
    """What the columns of an lm-eval run are: each task's lm-eval task and metric, the shared ones, the ±."""
    info = results.get("lm_eval")
    if not info:
        return None
    primary = info.get("primary") or {}

    def named(name: str) -> str:
        return f"`{name}`" + (f" ({primary[name]})" if name in primary else "")

    parts = []
    if info.get("tasks"):
        parts.append("Each task's column is its lm-evaluation-harness task on that task's test rows: "
                     + ", ".join(f"{t}: {named(n)}" for t, n in info["tasks"].items()) + "; the average is theirs.")
    if info.get("shared"):
        parts.append("Shared lm-eval tasks (on their own data; not in the average): "
                     + ", ".join(named(n) for n in info["shared"]) + ".")
    if len(results.get("seeds") or [0]) == 1:
        parts.append("± is the harness's standard error (the average's: sqrt(Σ s.e.²) / number of tasks).")
    return " ".join(parts)


def tradeoff_table(results: dict[str, Any]) -> str:
    """Removal: the unwanted-attribute rate against fluency (perplexity on the fluency task), per model and α."""
    fluency = results.get("fluency_task") or results["tasks"][0]
    lines = [f"| model | unwanted % (± s.e.) | perplexity on {fluency} | mean new tokens |", "|---|---|---|---|"]
    for row in results["rows"]:
        g = row.get("generation")
        if g:
            lines.append(f"| {row['label']} | {_unwanted(row)} | {_fmt(_perplexity(row, fluency), 'perplexity')} | "
                         f"{g['mean_new_tokens']:.1f} |")
    return "\n".join(lines)


def _text(results: dict[str, Any]) -> str:
    metric = results["metric"]
    what = "accuracy (%)" if metric == "accuracy" else metric
    if results.get("lm_eval", {}).get("tasks"):
        what = "lm-eval " + what
    seeds = results.get("seeds") or [0]
    parts = [f"# {results['experiment']}: {what} of every model on every task", ""]
    if len(seeds) > 1:
        parts += [f"Mean ± standard deviation over {len(seeds)} seeds ({', '.join(map(str, seeds))}): every training, "
                  "data subset, Fisher and merge was run once per seed.", ""]
    parts += [markdown_table(results), ""]
    if lm_eval_line(results):
        parts += [lm_eval_line(results), ""]
    if results.get("perplexity_tasks"):
        parts += ["## Perplexity on each task's test split", "", perplexity_table(results), ""]
    if _has_generation(results):
        parts += ["Unwanted %: share of the generations the attribute classifier labels unwanted, with its binomial "
                  "standard error; distinct-2: unique bigrams over all bigrams of the continuations.", ""]
        if results.get("classifier"):
            c = results["classifier"]
            parts += [f"Attribute classifier `{c['label']}`: accuracy "
                      f"{_fmt(c.get('accuracy'), 'accuracy', c.get('accuracy_sd'))}% on {c.get('num_examples', '?')} "
                      "held-out examples.", ""]
        parts += ["## Removal: unwanted attribute against fluency", "", tradeoff_table(results), "",
                  "![unwanted rate against perplexity](tradeoff.png)", ""]
    else:
        parts += ["Bold: each merge method's best α by the average.", ""]
    if hessian_line(results):  # where the merges' H_0 and H_t came from
        parts += [hessian_line(results), ""]
    if any(r["kind"] == "merge" for r in results["rows"]):
        parts += [f"## Average {metric} against α", "", alpha_table(results), ""]
    if results.get("paired"):
        parts += ["## Gradient matching against task arithmetic, paired by seed", "", paired_table(results), "",
                  "An interval that contains 0 says the difference is not distinguishable from seed-to-seed noise.", ""]
    if results["missing"]:
        parts += [f"Not finished yet: {', '.join(results['missing'])}.", ""]
    parts += [f"![{metric} against α](alpha_average.png)", "", f"![{metric} against α per task](alpha_per_task.png)", "",
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


def _plot_alpha(ax, curves, refs, value, title: str, metric: str, spread=lambda r: None) -> None:
    alphas = sorted({r["alpha"] for rows in curves.values() for r in rows}) or [0.0, 1.0]
    lo, hi = min(alphas), max(alphas)
    if lo == hi:
        lo, hi = lo - 0.5, hi + 0.5
    for method, rows in curves.items():
        points = [(r["alpha"], value(r), spread(r)) for r in rows if value(r) is not None]
        if not points:
            continue
        xs, ys, sds = zip(*points)
        if len(points) == 1:  # a method without α (e.g. plain averaging): a level line
            line = ax.plot([lo, hi], [ys[0], ys[0]], linestyle=":", label=method)[0]
            xs, ys, sds = (lo, hi), (ys[0], ys[0]), (sds[0], sds[0])
        else:
            line = ax.plot(xs, ys, marker="o", label=method)[0]
        if all(sd is not None for sd in sds):  # several seeds: mean ± sd as a band
            ax.fill_between(xs, [y - sd for y, sd in zip(ys, sds)], [y + sd for y, sd in zip(ys, sds)],
                            color=line.get_color(), alpha=0.15, linewidth=0)
    for label, style in (("parent", "--"), ("multitask", "-.")):
        if label in refs and value(refs[label]) is not None:
            ax.axhline(value(refs[label]), color="gray", linestyle=style, linewidth=1, label=label)
    ax.set_title(title)
    ax.set_xlabel("α (scale of every task vector)")
    ax.set_ylabel(metric)
    if metric == "accuracy":
        ax.set_ylim(0, 1)
    elif ax.get_lines():
        ax.set_yscale("log")
    ax.grid(alpha=0.3)


def _plot_tradeoff(results: dict[str, Any], path: Path, dpi: int) -> None:
    """Unwanted rate against perplexity on the fluency task: one curve per method, points labelled by α."""
    import matplotlib.pyplot as plt

    fluency = results.get("fluency_task") or results["tasks"][0]
    fig, ax = plt.subplots(figsize=(6.6, 4.6))

    def point(row):
        g = row.get("generation") or {}
        x = _perplexity(row, fluency)
        return (x, g["unwanted_rate"], g["unwanted_rate_se"]) if "unwanted_rate" in g and x is not None else None

    curves = {method: [(r, point(r)) for r in rows if point(r)] for method, rows in _merge_curves(results).items()}
    models = [(row, point(row)) for row in results["rows"] if row["kind"] == "model" and point(row)]
    xs_all = [p[0] for pts in curves.values() for _, p in pts] + [p[0] for _, p in models]
    # a wrecked merge (perplexity 1e5 and beyond) would squash every other point into the left edge: the axis
    # ends at 50x the lowest perplexity and points beyond it sit on that edge as triangles, labelled with their value
    cap = 50 * min(xs_all) if xs_all and max(xs_all) > 50 * min(xs_all) else None

    def shown(x):
        return x if cap is None or x <= cap else cap

    for method, pts in curves.items():
        if not pts:
            continue
        xs, ys, es = zip(*(p for _, p in pts))
        line = ax.errorbar([shown(x) for x in xs], [100 * y for y in ys], yerr=[100 * e for e in es], marker="o",
                           capsize=2, label=method)
        for (row, (x, y, _)) in pts:
            beyond = cap is not None and x > cap
            if beyond:
                ax.plot([cap], [100 * y], marker=">", markersize=8, color=line[0].get_color())
            ax.annotate(f"{row['alpha']:g}" + (f" (ppl {x:.2g})" if beyond else ""), (shown(x), 100 * y),
                        textcoords="offset points", xytext=(-60 if beyond else 4, 3), fontsize=7,
                        color=line[0].get_color())
    for row, (x, y, e) in models:
        ax.errorbar([shown(x)], [100 * y], yerr=[100 * e], marker="s", color="black", capsize=2)
        ax.annotate(row["label"], (shown(x), 100 * y), textcoords="offset points", xytext=(5, -9), fontsize=8)
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))  # 100, 200, 500, 1000, ...: no crowding
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    if cap is not None:
        ax.set_xlim(right=cap * 1.15)
    ax.set_xlabel(f"perplexity on {fluency} (lower: more fluent)" + (f"; ▶ beyond {cap:.3g}" if cap else ""))
    ax.set_ylabel("unwanted generations (%)")
    ax.set_title(f"{results['experiment']}: removal trade-off (numbers: α)")
    ax.grid(alpha=0.3, which="both")
    if ax.get_legend_handles_labels()[1]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def write_plots(results: dict[str, Any], out: Path, dpi: int = 100) -> list[Path]:
    """The metric against α (average; per task), each method's best α per task, and the removal trade-off."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    tasks, metric = results["tasks"], results["metric"]
    curves, refs = _merge_curves(results), _reference_rows(results)
    written = []

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    _plot_alpha(ax, curves, refs, lambda r: r["average"], f"{results['experiment']}: average {metric} against α",
                metric, spread=lambda r: r.get("average_sd"))
    if ax.get_legend_handles_labels()[1]:
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(out / "alpha_average.png", dpi=dpi)
    plt.close(fig)
    written.append(out / "alpha_average.png")

    panels = [(task, task, "values", "sd", metric) for task in tasks]
    panels += [(name, f"{name} (shared)", "shared", "shared_sd", _shared_metric(results, name))
               for name in _shared_tasks(results)]
    cols = min(3, len(panels))
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.2 * nrows), squeeze=False)
    for ax, (task, title, block, spread, shown) in zip(axes.flat, panels):
        _plot_alpha(ax, curves, refs, lambda r, t=task, b=block: (r.get(b) or {}).get(t), title, shown,
                    spread=lambda r, t=task, b=spread: (r.get(b) or {}).get(t))
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if labels:
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 5), fontsize=8)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(out / "alpha_per_task.png", dpi=dpi)
    plt.close(fig)
    written.append(out / "alpha_per_task.png")

    groups = tasks + ["average"]
    bars: list[tuple[str, list[float]]] = []
    by_label = {r["label"]: r for r in results["rows"] if r["kind"] == "model"}

    def values(vals: dict[str, float], average: float | None) -> list[float]:
        return [vals.get(t, np.nan) for t in tasks] + [np.nan if average is None else average]

    if "parent" in by_label:
        bars.append(("parent", values(by_label["parent"]["values"], by_label["parent"]["average"])))
    # each task's own expert: the child trained on it (the parent for the parent's task)
    experts = {t: by_label.get(f"child-{t}", by_label.get("parent")) for t in tasks}
    if all(experts.values()):
        own = {t: experts[t]["values"].get(t, np.nan) for t in tasks}
        bars.append(("own-task model", values(own, float(np.mean(list(own.values()))))))
    for method, best in results["best"].items():
        bars.append((f"{method} (α={best['alpha']:g})", values(best["values"], best["average"])))
    if "multitask" in by_label:
        bars.append(("multitask", values(by_label["multitask"]["values"], by_label["multitask"]["average"])))
    fig, ax = plt.subplots(figsize=(max(6.4, 1.3 * len(groups) + 2) + 2.2, 4.2))
    width = 0.8 / max(1, len(bars))
    x = np.arange(len(groups))
    for i, (label, ys) in enumerate(bars):
        ax.bar(x + (i - (len(bars) - 1) / 2) * width, ys, width, label=label)
    ax.set_xticks(x, groups)
    if metric == "accuracy":
        ax.set_ylim(0, 1)
    ax.set_ylabel(metric)
    ax.set_title(f"{results['experiment']}: best setting of each method, per task")
    ax.grid(axis="y", alpha=0.3)
    if bars:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(out / "best_per_task.png", dpi=dpi)
    plt.close(fig)
    written.append(out / "best_per_task.png")

    if _has_generation(results):
        _plot_tradeoff(results, out / "tradeoff.png", dpi)
        written.append(out / "tradeoff.png")
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
    from gradmatch.pipeline.graph import read_run_specs

    run_dir = Path(run_dir)
    specs = read_run_specs(run_dir, "report")
    if not specs:
        raise UserError(f"{run_dir / 'plan.json'} has no report job")
    try:
        results = collect(specs[-1]["params"], specs[-1]["inputs"])
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
