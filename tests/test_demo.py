"""`gradmatch demo`: its experiment ships in the package, validates, and lists the full job graph."""

from __future__ import annotations

import yaml

from gradmatch.cli import main
from gradmatch.config.experiment import load_experiment
from gradmatch.demo import DEMO_EXPERIMENT
from gradmatch.pipeline.graph import build_jobs


def test_demo_experiment_is_packaged_and_complete():
    import gradmatch

    assert DEMO_EXPERIMENT.is_file()
    assert DEMO_EXPERIMENT.parent.parent == __import__("pathlib").Path(gradmatch.__file__).parent
    exp = load_experiment(DEMO_EXPERIMENT)
    assert exp.model == "vit-digits"
    assert [c.dataset for c in exp.children] == ["digits-rot90", "digits-inverted", "digits-hflip", "digits-shift"]
    assert {m.method for m in exp.merges} == {"gradient_matching", "task_arithmetic", "average", "fisher_average",
                                             "ties", "dare", "regmean"}
    assert exp.multitask.enabled and exp.seeds == [0, 1, 2]
    kinds = [j.kind for j in build_jobs(exp)]
    # per seed: 6 models trained (parent, 4 children, multitask), 5 Fishers, 4 Grams, 6 evaluations, 7 merges;
    # the 11 data slices (5 test splits, 6 training sets) have no seeded subset, so every seed shares them
    per_seed = {"train": 6, "fisher": 5, "gram": 4, "evaluate": 6, "merge": 7}
    assert {k: kinds.count(k) for k in per_seed} == {k: 3 * n for k, n in per_seed.items()}
    assert kinds.count("prepare") == 11 and kinds.count("report") == 1 and len(kinds) == 3 * 28 + 12


def test_demo_print_config_and_dry_run(tmp_path, capsys):
    assert main(["demo", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["name"] == "digits-demo"
    out_dir = tmp_path / "demo"
    assert main(["demo", "--out", str(out_dir), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "96 jobs in" in out and "seed-2/merges/regmean" in out and "seed-0/models/child-shift" in out
    assert not (out_dir / "work").exists()


def test_demo_bad_flags_one_line_exit_2(tmp_path, capsys):
    assert main(["demo", "--cores", "-1", "--out", str(tmp_path / "d")]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert not (tmp_path / "d").exists()
