"""The run options of a merge (gradmatch.config.options.MergeOptions): the flags of `gradmatch merge` are generated
from them, merge.json records every one, and the command that merge.json and the card record rebuilds the same merge
bit for bit — with the options that turn a check off too; where each Hessian scale N of the original flags came from."""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
from pathlib import Path

import pytest
import yaml
from test_merge import load_folder
from test_newcomer import _config, family  # noqa: F401 - the fixture: a tiny BERT, two children, their Fishers

import gradmatch
from gradmatch.cli import build_parser, main
from gradmatch.errors import UserError

DOCS = Path(__file__).resolve().parents[1] / "docs" / "merge.md"


def _swapped(fam) -> list:
    """The parent's Hessian and the first child's swapped: refused unless the check is turned off."""
    return [fam["fishers"][1], fam["fishers"][0], fam["fishers"][2]]


def _relu_child(fam, root: Path) -> Path:
    """A child whose activation is not the parent's: refused unless --allow-config-mismatch."""
    child = root / "relu-child"
    shutil.copytree(fam["children"][0], child)
    config = json.loads((child / "config.json").read_text())
    config["hidden_act"] = "relu"
    (child / "config.json").write_text(json.dumps(config))
    return child


def _original_flags(fam, hessians, out: Path) -> list[str]:
    return ["--pretrained_model_name_or_path", str(fam["parent"]), "--pretrained_hessian_path", str(hessians[0]),
            "--ft_model_name_or_paths", ",".join(map(str, fam["children"])),
            "--ft_hessian_paths", ",".join(map(str, hessians[1:])), "--delta_0", "1e-12", "--out_model_path", str(out)]


def _yaml_case(fam, root: Path, name: str) -> tuple[list[str], list[str]]:
    """(the command line after `merge`, the flags the record's command must carry) of one case."""
    if name == "no-check-hessians":
        config, flags = _config(fam, _swapped(fam)), ["--no-check-hessians"]
    elif name == "allow-config-mismatch":
        config = {"method": "task_arithmetic", "base": str(fam["parent"]),
                  "models": [{"model": str(_relu_child(fam, root)), "weight": 0.7}, {"model": str(fam["children"][1])}]}
        flags = ["--allow-config-mismatch"]
    else:
        raise AssertionError(name)
    (root / "asked.yaml").write_text(yaml.safe_dump(config))
    return ["asked.yaml", str(root / "out"), "-q", *flags], flags


CASES = ["no-check-hessians", "allow-config-mismatch", "original flags"]


@pytest.mark.parametrize("case", CASES)
def test_the_recorded_command_run_again_rebuilds_the_merge_bit_for_bit(family, tmp_path, monkeypatch, case):  # noqa: F811
    """Merge with an option that turns a check off (and, with the original flags, more non-default options); then run
    the command merge.json records — in a fresh folder holding the config it names, as the card gives it — and
    compare the two folders file by file."""
    asked, rebuild = tmp_path / "asked", tmp_path / "rebuild"
    asked.mkdir()
    rebuild.mkdir()
    monkeypatch.chdir(asked)
    if case == "original flags":
        flags = ["--no-check-hessians", "--block-rows", "3", "--max-shard-size", "3KB", "--no-card"]
        argv = ["merge", "-q", *_original_flags(family, _swapped(family), asked / "out"), *flags]
    else:
        rest, flags = _yaml_case(family, asked, case)
        argv = ["merge", *rest]
        assert main(["merge", rest[0], str(asked / "refused"), "-q"]) == 2  # the check the flag turns off
    assert main(argv) == 0
    out = asked / "out"
    record = json.loads((out / "merge.json").read_text())
    command = shlex.split(record["command"])
    assert command[:2] == ["gradmatch", "merge"] and command[3] == "OUT"
    if "--no-card" not in flags:
        assert record["command"] in (out / "README.md").read_text()

    monkeypatch.chdir(rebuild)
    (rebuild / command[2]).write_text((out / "merge.yaml").read_text())  # the config beside merge.json
    assert main(["merge", command[2], str(rebuild / "out"), "-q", *command[4:]]) == 0, record["command"]
    assert all(flag in command for flag in flags), (flags, record["command"])

    again = rebuild / "out"
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in again.iterdir())
    for path in out.iterdir():
        if path.name != "merge.json":
            assert path.read_bytes() == (again / path.name).read_bytes(), path.name
    first, second = record, json.loads((again / "merge.json").read_text())
    for r in (first, second):  # the original flags' scales are written into the config: "config" when rebuilt
        r.pop("scale_sources")
    assert first == second
    assert len(list(out.glob("*.safetensors"))) > (1 if case == "original flags" else 0)  # 3KB shards: several


def test_merge_json_records_every_option(family, tmp_path):  # noqa: F811
    """Defaults included, so a reader need not know them; the values as given, not as resolved."""
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(_config(family)))
    assert main(["merge", str(tmp_path / "m.yaml"), str(tmp_path / "out"), "-q", "--kernel", "reference",
                 "--out-dtype", "float16", "--threads", "2"]) == 0
    record = json.loads((tmp_path / "out" / "merge.json").read_text())
    assert record["options"] == {"device": "cpu", "precision": "float32", "out_dtype": "float16",
                                 "max_shard_size": "5GB", "block_rows": None, "threads": 2, "kernel": "reference",
                                 "check_hessians": True, "allow_config_mismatch": False, "card": True}
    assert record["command"] == "gradmatch merge m.yaml OUT --out-dtype float16 --threads 2 --kernel reference"


def test_the_original_flags_record_where_each_n_came_from(family, tmp_path):  # noqa: F811
    """Not given, N_0 and every N_t are the original script's default 1.0 — recorded so, not as "config"."""
    assert main(["merge", "-q", *_original_flags(family, family["fishers"], tmp_path / "default")]) == 0
    record = json.loads((tmp_path / "default" / "merge.json").read_text())
    assert record["base_hessian_scale"] == 1.0 and [m["hessian_scale"] for m in record["models"]] == [1.0, 1.0]
    assert record["scale_sources"] == {"base": "default of the original flags (--scaling_factor_pt 1.0)",
                                       "models[0]": "default of the original flags (--scaling_factors_ft 1.0 each)",
                                       "models[1]": "default of the original flags (--scaling_factors_ft 1.0 each)"}
    given = _original_flags(family, family["fishers"], tmp_path / "given")
    assert main(["merge", "-q", *given, "--scaling_factor_pt", "20", "--scaling_factors_ft", "8,9"]) == 0
    record = json.loads((tmp_path / "given" / "merge.json").read_text())
    assert record["scale_sources"] == {"base": "--scaling_factor_pt", "models[0]": "--scaling_factors_ft",
                                       "models[1]": "--scaling_factors_ft"}
    assert record["base_hessian_scale"] == 20.0 and [m["hessian_scale"] for m in record["models"]] == [8.0, 9.0]


def _execution_flags() -> dict[str, list[str] | None]:
    """Each flag of `gradmatch merge`'s execution group and its choices (None: any value, or none)."""
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    group = next(g for g in commands.choices["merge"]._action_groups if g.title == "execution")
    return {a.option_strings[0]: a.choices and list(a.choices) for a in group._group_actions
            if a.help != argparse.SUPPRESS}


def _documented_options() -> dict[str, str]:
    """docs/merge.md's table of execution options: flag -> its row."""
    section = DOCS.read_text(encoding="utf-8").split("## Execution options", 1)[1].split("\n#", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    return {row.split("|")[1].strip().strip("`").split()[0]: row for row in rows}


def test_the_flags_are_the_documented_ones_with_their_choices():
    """What `gradmatch merge --help` offers, written out here, and as docs/merge.md lists it."""
    flags = _execution_flags()
    assert flags == {
        "--overwrite": None, "--device": None, "--precision": ["float32", "float64"],
        "--out-dtype": ["float32", "float16", "bfloat16", "float64"], "--max-shard-size": None, "--block-rows": None,
        "--threads": None, "--kernel": ["auto", "fused", "reference"], "--no-check-hessians": None,
        "--allow-config-mismatch": None, "--no-card": None}
    documented = _documented_options()
    assert sorted(documented) == sorted(flags), "docs/merge.md's table of execution options"
    for flag, choices in flags.items():
        for choice in choices or []:
            assert f"`{choice}`" in documented[flag], (flag, choice)


@pytest.mark.parametrize("argv, message", [
    (["--threads", "0"], "--threads must be positive, got 0"),
    (["--block-rows", "-2"], "--block-rows must be positive, got -2"),
    (["--precision", "float16"], "argument --precision: invalid choice: 'float16'"),
    (["--kernel", "numba"], "argument --kernel: invalid choice: 'numba'"),
    (["--threads", "two"], "argument --threads: invalid int value: 'two'"),
])
def test_a_bad_option_is_one_line_naming_its_flag(family, tmp_path, capsys, argv, message):  # noqa: F811
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(_config(family)))
    assert main(["merge", str(tmp_path / "m.yaml"), str(tmp_path / "out"), "-q", *argv]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("gradmatch: error: ") and message in err, err
    assert not (tmp_path / "out").exists()


def test_the_python_api_takes_an_options_object_or_keywords(family, tmp_path):  # noqa: F811
    """MergeOptions, a dict of them or keyword arguments (the older check_inputs too) give the same merge; an unknown
    keyword is a TypeError as for any function, a bad value a one-line UserError naming the option."""
    from gradmatch.merge import MergeOptions

    config = _config(family, _swapped(family))
    a = gradmatch.merge(config, tmp_path / "a", MergeOptions(check_hessians=False, block_rows=2), progress=False)
    b = gradmatch.merge(config, tmp_path / "b", {"check_hessians": False, "block_rows": 2}, progress=False)
    c = gradmatch.merge(config, tmp_path / "c", progress=False, check_inputs=False, block_rows=2)
    d = gradmatch.merge(config, tmp_path / "d", MergeOptions(block_rows=5), progress=False, check_hessians=False)
    merged = [load_folder(folder) for folder in (a, b, c, d)]
    for other in merged[1:]:
        assert all(merged[0][name].equal(other[name]) for name in merged[0])
    assert json.loads((d / "merge.json").read_text())["options"]["block_rows"] == 5
    with pytest.raises(UserError, match="was computed on another model"):
        gradmatch.merge(config, tmp_path / "e", progress=False)
    with pytest.raises(TypeError, match="unknown merge option 'kernal'"):
        gradmatch.merge(config, tmp_path / "f", kernal="fused")
    with pytest.raises(TypeError, match="not both"):
        gradmatch.merge(config, tmp_path / "f", check_inputs=False, check_hessians=True)
    with pytest.raises(UserError, match=re.escape("kernel must be one of auto, fused, reference, not 'numba'")):
        gradmatch.merge(config, tmp_path / "g", kernel="numba")
    with pytest.raises(UserError, match="threads must be positive, got 0"):
        gradmatch.merge(config, tmp_path / "h", threads=0)
    assert not any((tmp_path / n).exists() for n in "efgh")
