"""Security: pickle payloads in .bin checkpoints are refused and never run, YAML tags never construct objects,
a safetensors header claiming a huge tensor is refused before any allocation (peak RSS measured), and names in
configs cannot make gradmatch write outside the folders it was given."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from gradmatch.cli import main

from conftest import make_tiny_bert
from test_merge import _assert_one_line_error, build_family, gm_config

REPO = Path(__file__).resolve().parents[1]


def _env(**extra):
    return dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", **extra)


def _gradmatch(*args, cwd=None, code=None):
    argv = [sys.executable, "-m", "gradmatch", *map(str, args)] if code is None else [sys.executable, "-c", code, *map(str, args)]
    return subprocess.run(argv, capture_output=True, text=True, env=_env(), cwd=cwd, timeout=300)


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under ``root`` with its kind, size and modification time (to prove nothing was written)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            out[str(p.relative_to(root))] = (st.st_mode >> 12, st.st_size if not p.is_dir() else 0, st.st_mtime_ns)
    return out


# --------------------------------------------------------------------------- pickle payloads


class _Payload:
    """Unpickling this runs ``touch MARKER`` (through os.system): the classic malicious checkpoint."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def write_payload_bin(path: Path, marker: Path, how: str) -> Path:
    """A pytorch_model.bin whose unpickling creates ``marker``: torch zip format, legacy format, or raw pickle."""
    import pickle

    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"layer.weight": torch.ones(8, 8), "evil": _Payload(marker)}
    if how == "zip":
        torch.save(state, path)
    elif how == "legacy":
        torch.save(state, path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(pickle.dumps(state, protocol=2))
    return path


@pytest.mark.parametrize("how", ["zip", "legacy", "raw"])
def test_the_payload_is_live(tmp_path, how):
    """Control: an unsafe load of the same file does run the payload, so the tests below prove something."""
    import pickle

    marker = tmp_path / "ran"
    path = write_payload_bin(tmp_path / "pytorch_model.bin", marker, how)
    try:
        torch.load(path, weights_only=False)
    except Exception:  # a raw pickle is no torch file
        with open(path, "rb") as fh:
            pickle.load(fh)
    assert marker.exists()


@pytest.mark.parametrize("how", ["zip", "legacy", "raw"])
@pytest.mark.parametrize("where", ["child", "hessian"])
def test_merge_refuses_a_pickle_payload_and_never_runs_it(tmp_path, capsys, how, where):
    fam = build_family(tmp_path / "fam", T=2)
    marker = tmp_path / "PAYLOAD-RAN"
    if where == "child":
        folder = fam["children"][1]
    else:  # the original code's Hessian layout: <dir>/hessian/pytorch_model.bin
        folder = fam["hessians"][0]
    (folder / "model.safetensors").unlink()
    bin_path = write_payload_bin(folder / "pytorch_model.bin", marker, how)
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(gm_config(fam)))
    before = snapshot(tmp_path)
    if how == "zip" and where == "child":  # one real process; the others in this one (a payload would run here too)
        proc = _gradmatch("merge", tmp_path / "merge.yaml", tmp_path / "out", "--quiet")
        rc, err = proc.returncode, proc.stderr
    else:
        rc = main(["merge", str(tmp_path / "merge.yaml"), str(tmp_path / "out"), "--quiet"])
        err = capsys.readouterr().err
    _assert_one_line_error(rc, err, [str(bin_path), "only tensors are unpickled"], tmp_path)
    assert not marker.exists()
    assert snapshot(tmp_path) == before  # nothing written


def test_original_flags_refuse_a_payload_in_the_parent_hessian(tmp_path, capsys):
    fam = build_family(tmp_path / "fam", T=2)
    marker = tmp_path / "PAYLOAD-RAN"
    hessian = fam["parent_hessian"] / "hessian"
    (hessian / "model.safetensors").unlink()
    write_payload_bin(hessian / "pytorch_model.bin", marker, "zip")
    rc = main(["merge", "--pretrained_model_name_or_path", str(fam["parent"]), "--pretrained_hessian_path",
               str(fam["parent_hessian"]), "--ft_model_name_or_paths", ",".join(map(str, fam["children"])),
               "--ft_hessian_paths", ",".join(map(str, fam["hessians"])), "--out_model_path", str(tmp_path / "out")])
    _assert_one_line_error(rc, capsys.readouterr().err, ["fisher-parent/hessian/pytorch_model.bin"], tmp_path)
    assert not marker.exists() and not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.parametrize("command", ["fisher", "evaluate", "train"])
def test_model_loading_refuses_a_pickle_payload(tmp_path, command):
    """fisher/evaluate/train load models through transformers: a payload .bin is refused there too."""
    model = make_tiny_bert(tmp_path / "model", seed=1)
    (model / "model.safetensors").unlink()
    marker = tmp_path / "PAYLOAD-RAN"
    write_payload_bin(model / "pytorch_model.bin", marker, "zip")
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"text": t, "label": i % 2} for i, t in enumerate(["good", "bad", "fine", "awful"])]
    for split in ("train", "test"):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    if command == "fisher":
        args = ["fisher", "--model", model, "--data", data, "--split", "train", "--out", out, "--quiet"]
    else:
        cfg = tmp_path / "c.json"
        keys = {"model_name_or_path": str(model), "dataset_name": str(data), "output_dir": str(out)}
        cfg.write_text(json.dumps(dict(keys, num_train_epochs=1) if command == "train" else keys))
        args = [command, cfg, "--quiet"]
    before = snapshot(tmp_path)
    proc = _gradmatch(*args)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gradmatch: error:") and "Traceback" not in proc.stderr, proc.stderr
    assert "model" in lines[0]
    assert not marker.exists()
    assert snapshot(tmp_path) == before


def test_yaml_tags_never_construct_objects(tmp_path, capsys):
    marker = tmp_path / "PAYLOAD-RAN"
    for name, text in (("merge.yaml", f"!!python/object/apply:os.system [\"touch '{marker}'\"]\n"),
                       ("exp.yaml", f"name: !!python/object/apply:os.system [\"touch '{marker}'\"]\n")):
        (tmp_path / name).write_text(text)
    before = snapshot(tmp_path)
    rc = main(["merge", str(tmp_path / "merge.yaml"), str(tmp_path / "out")])
    _assert_one_line_error(rc, capsys.readouterr().err, ["merge.yaml", "not valid YAML"], tmp_path)
    rc = main(["run", str(tmp_path / "exp.yaml"), "--workdir", str(tmp_path / "run"), "--dry-run"])
    _assert_one_line_error(rc, capsys.readouterr().err, ["exp.yaml", "not valid YAML"], tmp_path)
    assert not marker.exists() and snapshot(tmp_path) == before


# --------------------------------------------------------------------------- huge tensors claimed by a header


_RSS_CODE = """
import resource, sys
from gradmatch.cli import main
rc = main(sys.argv[1:])
print("RSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
sys.exit(rc)
"""


def _peak_rss_kb(tmp_path, *args):
    proc = _gradmatch(*args, code=_RSS_CODE)
    rss = [int(line.split()[1]) for line in proc.stdout.splitlines() if line.startswith("RSS_KB")]
    return proc, rss[0]


@pytest.fixture(scope="module")
def baseline_rss_kb(tmp_path_factory):
    """Peak RSS of the same merge failing on a small corrupt (not huge) header."""
    tmp_path = tmp_path_factory.mktemp("baseline")
    fam = build_family(tmp_path / "fam", T=2)
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(gm_config(fam)))
    (fam["children"][0] / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    proc, baseline = _peak_rss_kb(tmp_path, "merge", tmp_path / "merge.yaml", tmp_path / "out", "--quiet")
    assert proc.returncode == 2 and "not valid JSON" in proc.stderr, proc.stderr
    return baseline


@pytest.mark.parametrize("claim", ["4 TiB tensor", "64 GiB tensor inside a sparse file", "length prefix 2^63"])
def test_header_claiming_a_huge_tensor_is_refused_before_allocation(tmp_path, baseline_rss_kb, claim):
    fam = build_family(tmp_path / "fam", T=2)
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(gm_config(fam)))
    target = fam["children"][0] / "model.safetensors"
    baseline = baseline_rss_kb
    if claim == "4 TiB tensor":
        header = {"emb.weight": {"dtype": "F32", "shape": [1 << 20, 1 << 20], "data_offsets": [0, 4 << 40]}}
        body = json.dumps(header).encode()
        target.write_bytes(len(body).to_bytes(8, "little") + body + bytes(64))
        words = ["'emb.weight'", "truncated or corrupt"]
    elif claim == "64 GiB tensor inside a sparse file":
        # a tensor the file really (sparsely) holds, but whose shape disagrees with the base model's
        header = {"emb.weight": {"dtype": "F32", "shape": [1 << 24, 1 << 10], "data_offsets": [0, 1 << 36]}}
        body = json.dumps(header).encode()
        body += b" " * ((8 - len(body) % 8) % 8)
        with open(target, "wb") as fh:
            fh.write(len(body).to_bytes(8, "little") + body)
            fh.truncate(8 + len(body) + (1 << 36))
        words = ["'emb.weight'", "[16777216, 1024]", "[300, 8]"]
    else:
        target.write_bytes((1 << 63).to_bytes(8, "little") + b'{"emb.weight": {}}')
        words = ["header claims", "truncated"]
    proc, rss = _peak_rss_kb(tmp_path, "merge", tmp_path / "merge.yaml", tmp_path / "out", "--quiet")
    lines = proc.stderr.strip().splitlines()
    _assert_one_line_error(proc.returncode, proc.stderr, [str(target)] + words, tmp_path)
    assert not (tmp_path / "out").exists()
    assert rss - baseline < 32 * 1024, f"peak RSS {rss} kB against {baseline} kB for a small corrupt file"
    assert len(lines) == 1


# --------------------------------------------------------------------------- paths in configs


@pytest.mark.parametrize("change, words", [
    ({"name": "../../escaped"}, ["name", "letters, digits"]),
    ({"name": "/tmp/gradmatch-escaped-absolute"}, ["name", "letters, digits"]),
    ({"name": ".."}, ["name", "letters, digits"]),
    ({"merges": [{"method": "task_arithmetic", "name": "../../../../escaped"}]}, ["merges.0.name", "letters, digits"]),
    ({"children": [{"name": "../../etc", "dataset": "digits-rot90"}]}, ["children.0.name", "letters, digits"]),
    ({"parent": {"name": "/abs", "dataset": "digits-original"}}, ["parent.name", "letters, digits"]),
])
def test_names_in_an_experiment_cannot_leave_the_run_folder(tmp_path, capsys, monkeypatch, change, words):
    """Names become folders (runs/<name>, merges/<name>, models/child-<name>): a path there is refused."""
    from pipeline_helpers import tiny, write_experiment

    cwd = tmp_path / "a" / "b"
    cwd.mkdir(parents=True)
    exp = write_experiment(tmp_path / "exp.yaml", tiny(**change))
    before = snapshot(tmp_path)
    monkeypatch.chdir(cwd)  # the default run folder is runs/<name> under the working folder
    rc = main(["run", str(exp), "--dry-run"])
    _assert_one_line_error(rc, capsys.readouterr().err, ["exp.yaml", *words], tmp_path)
    assert snapshot(tmp_path) == before
    assert not Path("/tmp/gradmatch-escaped-absolute").exists()


def test_a_dry_run_writes_nothing(tmp_path, capsys):
    """A dry run of a new run folder leaves none behind (Snakemake plans in a scratch folder) and touches
    nothing else; its listing names the run folder it would use."""
    from pipeline_helpers import write_experiment

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    exp = write_experiment(tmp_path / "exp.yaml")
    before = snapshot(tmp_path)
    old = os.getcwd()
    os.chdir(cwd)
    try:
        assert main(["run", str(exp), "--dry-run"]) == 0
    finally:
        os.chdir(old)
    assert snapshot(tmp_path) == before
    assert str(cwd.resolve() / "runs" / "tiny") in capsys.readouterr().out


def test_a_shard_index_cannot_point_outside_the_model_folder(tmp_path, capsys):
    """An index naming ../other.safetensors is refused (gradmatch only reads files inside the folder)."""
    from gradmatch.checkpoints import ShardedWriter
    from test_merge import load_folder

    fam = build_family(tmp_path / "fam", T=2)
    child = fam["children"][0]
    tensors = load_folder(child)
    (child / "model.safetensors").unlink()
    writer = ShardedWriter(child, 2000)
    for name, t in tensors.items():
        writer.add(name, t)
    writer.finish()
    index = json.loads((child / "model.safetensors.index.json").read_text())
    shard = next(iter(index["weight_map"].values()))
    os.replace(child / shard, tmp_path / "fam" / shard)  # moved outside the folder
    index["weight_map"] = {k: (f"../{shard}" if v == shard else v) for k, v in index["weight_map"].items()}
    (child / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(gm_config(fam)))
    rc = main(["merge", str(tmp_path / "merge.yaml"), str(tmp_path / "out"), "--quiet"])
    _assert_one_line_error(rc, capsys.readouterr().err, ["model.safetensors.index.json", f"../{shard}",
                                                          "not a file name inside the folder"], tmp_path)
    assert not (tmp_path / "out").exists()
