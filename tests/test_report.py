"""The report: table values, best α per method, JSON and plots, from known metrics."""

from __future__ import annotations

import json

import pytest

from gradmatch.pipeline.report import alpha_table, collect, markdown_table, report_run, write_report

TASKS = ["a", "b"]


def _metrics(acc_a: float, acc_b: float) -> dict:
    return {"a": {"accuracy": acc_a, "macro_f1": acc_a, "num_examples": 10},
            "b": {"accuracy": acc_b, "macro_f1": acc_b, "num_examples": 10}}


@pytest.fixture
def run_inputs(tmp_path):
    """Folders as the evaluate and merge jobs leave them, and the report job's parameters."""
    def put(name, value):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "metrics.json").write_text(json.dumps(value))
        return str(folder)

    inputs = {
        "model/parent": put("p", {"label": "parent", "kind": "model", "tasks": _metrics(0.9, 0.5)}),
        "model/child-b": put("c", {"label": "child-b", "kind": "model", "tasks": _metrics(0.6, 0.95)}),
        "merge/gradient_matching": put("gm", {"kind": "merge", "method": "gradient_matching", "alphas": [
            {"alpha": 0.5, "tasks": _metrics(0.85, 0.7)}, {"alpha": 1.0, "tasks": _metrics(0.8, 0.9)}]}),
        "merge/task_arithmetic": put("ta", {"kind": "merge", "method": "task_arithmetic", "alphas": [
            {"alpha": 0.5, "tasks": _metrics(0.8, 0.8)}, {"alpha": 1.0, "tasks": _metrics(0.3, 0.2)}]}),
        "merge/average": put("avg", {"kind": "merge", "method": "average", "alphas": [
            {"alpha": 1.0, "tasks": _metrics(0.7, 0.7)}]}),
    }
    entries = [{"key": k, "label": k.split("/", 1)[1], "kind": k.split("/", 1)[0]} for k in inputs]
    entries.append({"key": "model/multitask", "label": "multitask", "kind": "model"})  # not finished
    return {"experiment": "toy", "tasks": TASKS, "entries": entries}, inputs


def test_rows_averages_and_best_alpha(run_inputs):
    params, inputs = run_inputs
    results = collect(params, inputs)
    labels = [r["label"] for r in results["rows"]]
    assert labels == ["parent", "child-b", "gradient_matching α=0.5", "gradient_matching α=1",
                      "task_arithmetic α=0.5", "task_arithmetic α=1", "average α=1"]
    assert results["rows"][3]["average"] == pytest.approx(0.85)
    assert results["best"]["gradient_matching"]["alpha"] == 1.0
    assert results["best"]["task_arithmetic"] == {"alpha": 0.5, "average": pytest.approx(0.8),
                                                  "values": {"a": 0.8, "b": 0.8}, "average_sd": None}
    assert results["missing"] == ["multitask"]
    table = markdown_table(results)
    assert table.splitlines()[0] == "| model | a | b | average |"
    assert "| parent | 90.0 | 50.0 | 70.0 |" in table
    assert "| **gradient_matching α=1** | 80.0 | 90.0 | **85.0** |" in table
    assert "| task_arithmetic α=1 | 30.0 | 20.0 | 25.0 |" in table
    robustness = alpha_table(results)
    assert robustness.splitlines()[0] == "| method | α=0.5 | α=1 |"
    assert "| task_arithmetic | 80.0 | 25.0 |" in robustness and "| average | — | 70.0 |" in robustness


def test_files_written_and_plots_are_pngs(run_inputs, tmp_path):
    params, inputs = run_inputs
    out = tmp_path / "report"
    out.mkdir()
    write_report(collect(params, inputs), out)
    for name in ("alpha_average.png", "alpha_per_task.png", "best_per_task.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and 5_000 < len(data) < 400_000
    saved = json.loads((out / "report.json").read_text())
    assert saved["best"]["gradient_matching"]["alpha"] == 1.0
    text = (out / "report.md").read_text()
    assert "Not finished yet: multitask." in text and "![accuracy against α](alpha_average.png)" in text


def test_report_run_needs_a_run_folder(tmp_path):
    from gradmatch.errors import UserError

    with pytest.raises(UserError, match="not a gradmatch run folder"):
        report_run(tmp_path)


def test_partial_report_with_one_child_only(run_inputs, tmp_path):
    """`gradmatch report` on a run where only one child has been evaluated still draws every plot."""
    params, inputs = run_inputs
    only = {"model/child-b": inputs["model/child-b"]}
    results = collect(params, only)
    assert [r["label"] for r in results["rows"]] == ["child-b"] and results["best"] == {}
    assert "parent" in results["missing"] and "gradient_matching" in results["missing"]
    out = tmp_path / "partial"
    out.mkdir()
    write_report(results, out)
    assert (out / "alpha_per_task.png").stat().st_size > 0 and (out / "best_per_task.png").stat().st_size > 0


def test_seeds_give_means_standard_deviations_and_paired_differences(tmp_path):
    """Three seeds of two merges: the report's means, sample sds and the paired GM − TA interval, against numpy."""
    import numpy as np

    gm = {0.5: [(0.80, 0.70), (0.84, 0.74), (0.78, 0.70)], 1.0: [(0.80, 0.90), (0.70, 0.92), (0.75, 0.85)]}
    ta = {0.5: [(0.80, 0.80), (0.82, 0.76), (0.70, 0.74)], 1.0: [(0.30, 0.20), (0.40, 0.30), (0.35, 0.25)]}
    inputs, entries = {}, []
    for seed in range(3):
        for method, curve in (("gradient_matching", gm), ("task_arithmetic", ta)):
            folder = tmp_path / f"{method}-{seed}"
            folder.mkdir()
            points = [{"alpha": a, "tasks": _metrics(*curve[a][seed])} for a in (0.5, 1.0)]
            (folder / "metrics.json").write_text(json.dumps({"kind": "merge", "alphas": points}))
            key = f"merge/{method}@{seed}"
            inputs[key] = str(folder)
            entries.append({"key": key, "label": method, "kind": "merge", "seed": seed})
    results = collect({"experiment": "toy", "tasks": TASKS, "entries": entries, "seeds": [0, 1, 2]}, inputs)
    row = {r["label"]: r for r in results["rows"]}["gradient_matching α=1"]
    averages = np.mean(gm[1.0], axis=1)
    assert row["average"] == pytest.approx(averages.mean()) and row["average_sd"] == pytest.approx(averages.std(ddof=1))
    assert row["values"]["b"] == pytest.approx(np.mean([v[1] for v in gm[1.0]]))
    assert row["sd"]["b"] == pytest.approx(np.std([v[1] for v in gm[1.0]], ddof=1))
    paired = {p["what"]: p for p in results["paired"]}
    diffs = np.mean(gm[1.0], axis=1) - np.mean(ta[1.0], axis=1)
    half = 4.302652729911275 * diffs.std(ddof=1) / np.sqrt(3)  # t(0.975, 2 degrees of freedom)
    assert paired["α = 1"]["mean"] == pytest.approx(diffs.mean())
    assert paired["α = 1"]["ci95"] == pytest.approx([diffs.mean() - half, diffs.mean() + half])
    best = paired["each at its best α (1, 0.5)"]
    assert best["mean"] == pytest.approx((np.mean(gm[1.0], axis=1) - np.mean(ta[0.5], axis=1)).mean())
    table = markdown_table(results)
    assert f"| **gradient_matching α=1** | {100 * np.mean([v[0] for v in gm[1.0]]):.1f} ± " in table
    out = tmp_path / "report"
    out.mkdir()
    write_report(results, out)
    text = (out / "report.md").read_text()
    assert "Mean ± standard deviation over 3 seeds" in text and "paired by seed" in text
