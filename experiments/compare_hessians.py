"""Compare the same merges across runs that differ only in where their Hessians come from (`hessian: fisher | adam |
ivon`): average accuracy per method and α, paired by seed, with 95% t-intervals over the seeds.

    python experiments/compare_hessians.py fisher=runs/demo-fisher adam=runs/demo-adam [ivon=runs/demo-ivon] \\
        [--method gradient_matching] [--against task_arithmetic]

Prints markdown tables: each arm's mean ± sd per α; each free arm minus the first arm (paired by seed); each arm's
method minus its own `--against` method; and every model row (parent, children) whose numbers differ between arms.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

#: Two-sided 95% quantiles of Student's t by degrees of freedom.
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def _rows(run: Path) -> dict[tuple, dict]:
    report = json.loads((run / "report" / "report.json").read_text())
    return {(r["label"] if r.get("method") is None else r["method"], r.get("alpha")): r for r in report["rows"]}


def _interval(diffs: list[float]) -> str:
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return f"{mean:+.1f}"
    half = _T95.get(len(diffs) - 1, 1.96) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return f"{mean:+.1f} [{mean - half:+.1f}, {mean + half:+.1f}]"


def _per_seed(row: dict) -> dict[str, float]:
    return {s: 100 * v for s, v in row["per_seed"].items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("arms", nargs="+", help="NAME=RUN_FOLDER; the first is the reference")
    parser.add_argument("--method", default="gradient_matching")
    parser.add_argument("--against", default="task_arithmetic")
    args = parser.parse_args()
    arms = {a.split("=", 1)[0]: _rows(Path(a.split("=", 1)[1])) for a in args.arms}
    names = list(arms)
    alphas = sorted({alpha for rows in arms.values() for (m, alpha) in rows if m == args.method and alpha is not None})

    print(f"| {args.method} | " + " | ".join(f"α={a:g}" for a in alphas) + " |")
    print("|---|" + "---|" * len(alphas))
    for name, rows in arms.items():
        for method in (args.method, args.against):
            cells = []
            for a in alphas:
                row = rows.get((method, a))
                cells.append("—" if row is None else f"{100 * row['average']:.1f} ± {100 * row['average_sd']:.1f}")
            print(f"| {method} ({name}) | " + " | ".join(cells) + " |")

    print(f"\n{args.method}: each arm minus {names[0]}, paired by seed (points; mean [95% t-interval]; per seed)\n")
    print("| arm | " + " | ".join(f"α={a:g}" for a in alphas) + " |")
    print("|---|" + "---|" * len(alphas))
    for name in names[1:]:
        cells = []
        for a in alphas:
            ref, row = arms[names[0]].get((args.method, a)), arms[name].get((args.method, a))
            if ref is None or row is None:
                cells.append("—")
                continue
            x, y = _per_seed(ref), _per_seed(row)
            diffs = [y[s] - x[s] for s in sorted(x) if s in y]
            cells.append(_interval(diffs) + " (" + ", ".join(f"{d:+.1f}" for d in diffs) + ")")
        print(f"| {name} − {names[0]} | " + " | ".join(cells) + " |")

    print(f"\n{args.method} minus {args.against} within each arm, paired by seed\n")
    print("| arm | " + " | ".join(f"α={a:g}" for a in alphas) + " |")
    print("|---|" + "---|" * len(alphas))
    for name, rows in arms.items():
        cells = []
        for a in alphas:
            gm, ta = rows.get((args.method, a)), rows.get((args.against, a))
            if gm is None or ta is None:
                cells.append("—")
                continue
            x, y = _per_seed(ta), _per_seed(gm)
            diffs = [y[s] - x[s] for s in sorted(x) if s in y]
            cells.append(_interval(diffs) + f" (min {min(diffs):+.1f})")
        print(f"| {name} | " + " | ".join(cells) + " |")

    print("\nModels (average over tasks, mean ± sd over seeds; own-task accuracy of each child)\n")
    print("| model | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for key in [k for k in arms[names[0]] if k[1] is None and arms[names[0]][k].get("kind") == "model"]:
        label = key[0]
        cells = []
        for name in names:
            row = arms[name].get(key)
            if row is None:
                cells.append("—")
                continue
            own = label.split("child-", 1)[1] if label.startswith("child-") else None
            extra = f"; own {100 * row['values'][own]:.1f}" if own in row.get("values", {}) else ""
            cells.append(f"{100 * row['average']:.1f} ± {100 * row['average_sd']:.1f}{extra}")
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
