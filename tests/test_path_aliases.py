"""Class 12 of round four: two spellings of one file (``a/../b``, a linked folder, ``./x``) are one output — refused
where two outputs must differ, and where an output must not be an input."""

from __future__ import annotations

import os

import pytest

from conftest import write_jsonl
from gradmatch import UserError
from gradmatch.evaluate import evaluate
from gradmatch.fsutil import canonical, check_distinct_outputs


def test_canonical_spellings_of_one_file_agree(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    os.symlink(tmp_path / "a", tmp_path / "link")
    spellings = [tmp_path / "a" / "m.json", tmp_path / "a" / "b" / ".." / "m.json", tmp_path / "link" / "m.json",
                 tmp_path / "a" / "." / "m.json", tmp_path / "link" / "b" / ".." / "m.json"]
    assert len({canonical(p) for p in spellings}) == 1
    os.symlink(tmp_path / "a" / "b", tmp_path / "deep")  # `deep/..` is a/, not tmp_path: the link is followed first
    assert canonical(tmp_path / "deep" / ".." / "m.json") == canonical(tmp_path / "a" / "m.json")
    with pytest.raises(UserError, match="two outputs are the same file"):
        check_distinct_outputs({"one": spellings[0], "other": spellings[2]})
    check_distinct_outputs({"one": tmp_path / "a" / "m.json", "other": tmp_path / "a" / "n.json", "none": None})


@pytest.mark.parametrize("alias", ["dotdot", "link"])
def test_evaluate_refuses_two_outputs_that_are_one_file(tiny_bert, tmp_path, alias):
    data = write_jsonl(tmp_path / "toy" / "test.jsonl", [{"text": f"text {i}", "label": i % 2} for i in range(6)])
    (tmp_path / "out" / "sub").mkdir(parents=True)
    os.symlink(tmp_path / "out", tmp_path / "same")
    other = (tmp_path / "out" / "sub" / ".." / "m.json") if alias == "dotdot" else (tmp_path / "same" / "m.json")
    config = {"model_name_or_path": str(tiny_bert), "dataset_name": str(data.parent),
              "metric_output_file": str(tmp_path / "out" / "m.json"), "prediction_output_file": str(other)}
    with pytest.raises(UserError, match="two outputs of this evaluation are the same file"):
        evaluate(config, quiet=True)
    assert not (tmp_path / "out" / "m.json").exists()


def test_an_input_spelled_with_a_tilde_is_still_an_input(tmp_path, monkeypatch):
    """`--model '~/m' --out $HOME/m`: the input is found where the system opens it, so the output is refused."""
    from gradmatch.fsutil import check_not_input

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "m").mkdir()
    with pytest.raises(UserError, match="is the model ~/m: writing it would replace the model"):
        check_not_input(tmp_path / "m", {"the model": "~/m"}, "--out")
    with pytest.raises(UserError, match="lies inside the model ~/m"):
        check_not_input(tmp_path / "m" / "child", {"the model": "~/m"}, "output_dir")
