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
                                             "ties", "dare"}
    assert exp.multitask.enabled
    kinds = [j.kind for j in build_jobs(exp)]
    assert len(kinds) == 35 and kinds.count("merge") == 6 and kinds.count("evaluate") == 6


def test_demo_print_config_and_dry_run(tmp_path, capsys):
    assert main(["demo", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["name"] == "digits-demo"
    out_dir = tmp_path / "demo"
    assert main(["demo", "--out", str(out_dir), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "35 jobs in" in out and "merges/fisher_average" in out and "models/child-shift" in out
    assert not (out_dir / "work").exists()


def test_demo_bad_flags_one_line_exit_2(tmp_path, capsys):
    assert main(["demo", "--cores", "-1", "--out", str(tmp_path / "d")]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert not (tmp_path / "d").exists()
