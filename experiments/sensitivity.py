"""Run experiments/demo-sensitivity.yaml once per number of Fisher examples (the other settings in the run with
the demo's 600) and write the tables of docs/merge.md "Choosing parameters": each setting's average accuracy
(mean ± sd over the seeds) at every α, and its paired difference from gradient matching at the demo's
settings (mean over seeds with a 95% t-interval).

    python experiments/sensitivity.py --workdir runs/demo-sensitivity [--cores 2]

Every run shares one run folder, so models are trained once; each run's report is kept in
WORKDIR/sensitivity/, the tables in WORKDIR/sensitivity/sensitivity.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
EXPERIMENT = HERE / "demo-sensitivity.yaml"
FISHER_EXAMPLES = [50, 200, 600, None]  # None: all of each model's training data
BASELINE = "gradient_matching"


def run(workdir: Path, cores: int) -> dict[str, dict]:
    base = yaml.safe_load(EXPERIMENT.read_text())
    reports = {}
    keep = workdir / "sensitivity"
    for examples in FISHER_EXAMPLES:
        exp = dict(base, fisher=dict(base["fisher"], max_examples=examples))
        if examples != 600:  # the other settings only with the demo's number of examples
            exp["merges"] = [m for m in base["merges"] if m.get("name") is None]
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as fh:
            yaml.safe_dump(exp, fh, sort_keys=False)
        cmd = [sys.executable, "-m", "gradmatch", "run", fh.name, "--workdir", str(workdir), "--cores", str(cores), "-q"]
        print(" ".join(cmd[2:]), flush=True)
        subprocess.run(cmd, check=True)
        label = f"fisher-{examples or 'all'}"
        keep.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(workdir / "report" / "report.json", keep / f"{label}.json")
        reports[label] = json.loads((keep / f"{label}.json").read_text())
    return reports


def _t(n: int) -> float:
    from scipy.stats import t

    return float(t.ppf(0.975, n - 1))


def _rows(report: dict) -> dict[tuple[str, float], dict]:
    return {(r["method_label"] if "method_label" in r else r["label"].split(" α=")[0], r["alpha"]): r
            for r in report["rows"] if r["kind"] == "merge"}


def tables(reports: dict[str, dict]) -> str:
    main = reports["fisher-600"]
    alphas = sorted({r["alpha"] for r in main["rows"] if r["kind"] == "merge"})
    baseline = _rows(main)
    settings = [("demo settings (N_0 = 1,800, δ = 1e-12, 600 Fisher examples)", "fisher-600", BASELINE),
                ("N_0 × 0.1 (180)", "fisher-600", "n0-x0.1"), ("N_0 × 10 (18,000)", "fisher-600", "n0-x10"),
                ("δ = 0.01", "fisher-600", "delta-0.01"), ("δ = 1", "fisher-600", "delta-1"),
                ("H_0 = prior (N_0·c·I)", "fisher-600", "prior"),
                ("Fisher on 50 examples", "fisher-50", BASELINE), ("Fisher on 200 examples", "fisher-200", BASELINE),
                ("Fisher on all (1,050 / 1,800)", "fisher-all", BASELINE),
                ("task arithmetic", "fisher-600", "task_arithmetic")]
    head = "| setting | " + " | ".join(f"α={a:g}" for a in alphas) + " |"
    out = ["Average accuracy (%) over the five domains, mean ± sd over seeds "
           f"{', '.join(map(str, main['seeds']))}:", "", head, "|---|" + "---|" * len(alphas)]
    diffs = ["Paired difference from the demo settings at the same α and seed, in points (mean, 95% t-interval; "
             "an interval containing 0 is noise):", "", head, "|---|" + "---|" * len(alphas)]
    for title, report, method in settings:
        rows = _rows(reports[report])
        cells, dcells = [], []
        for a in alphas:
            row = rows.get((method, a))
            if row is None or row.get("average") is None:
                cells.append("—")
                dcells.append("—")
                continue
            sd = row.get("average_sd")
            cells.append(f"{100 * row['average']:.1f}" + (f" ± {100 * sd:.1f}" if sd is not None else ""))
            ref = baseline[(BASELINE, a)]["per_seed"]
            d = [100 * (row["per_seed"][s] - ref[s]) for s in ref if s in row["per_seed"]]
            if method == BASELINE and report == "fisher-600":
                dcells.append("0")
            elif len(d) > 1:
                half = _t(len(d)) * statistics.stdev(d) / len(d) ** 0.5
                dcells.append(f"{statistics.fmean(d):+.1f} [{statistics.fmean(d) - half:+.1f}, {statistics.fmean(d) + half:+.1f}]")
            else:
                dcells.append(f"{statistics.fmean(d):+.1f}")
        out.append(f"| {title} | " + " | ".join(cells) + " |")
        diffs.append(f"| {title} | " + " | ".join(dcells) + " |")
    return "\n".join(out + [""] + diffs) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("runs/demo-sensitivity"))
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--tables-only", action="store_true", help="rebuild the tables from the kept reports")
    args = parser.parse_args()
    keep = args.workdir / "sensitivity"
    if args.tables_only:
        reports = {p.stem: json.loads(p.read_text()) for p in keep.glob("fisher-*.json")}
    else:
        reports = run(args.workdir, args.cores)
    text = tables(reports)
    (keep / "sensitivity.md").write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
