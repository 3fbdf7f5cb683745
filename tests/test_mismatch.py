"""gradmatch mismatch: zero when every child equals the parent, larger for a worse merge, one-line errors."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_tiny_bert, write_jsonl
from gradmatch.errors import UserError
from gradmatch.mismatch import gradient_mismatch, loss_gradient

TEXTS = ["a wonderful film", "terrible and boring", "i loved every minute", "awful acting, bad plot",
         "great fun", "not worth the time", "brilliant and moving", "dull"]


def _write_task(path, flip: bool = False):
    return str(write_jsonl(path, [{"text": t, "label": (i % 2) ^ int(flip)} for i, t in enumerate(TEXTS)]))


def _perturbed(src, dst, scale: float, seed: int):
    shutil.copytree(src, dst)
    weights = load_file(dst / "model.safetensors")
    g = torch.Generator().manual_seed(seed)
    noisy = {k: (v + scale * torch.randn(v.shape, generator=g) if v.is_floating_point() else v) for k, v in weights.items()}
    save_file(noisy, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.fixture
def setup(tmp_path):
    parent = make_tiny_bert(tmp_path / "parent")
    tasks = [_write_task(tmp_path / "data" / "a.jsonl"), _write_task(tmp_path / "data" / "b.jsonl", flip=True)]
    return tmp_path, parent, tasks


def test_zero_mismatch_when_children_equal_parent(setup):
    tmp, parent, tasks = setup
    result = gradient_mismatch(parent, children=[str(parent), str(parent)], data=tasks, alphas=[0.5, 0.5],
                               split="train", progress=False)
    assert [t.mismatch for t in result.tasks] == [0.0, 0.0]
    assert result.total_mismatch == 0.0
    assert all(t.grad_norm_merged > 0 for t in result.tasks)  # the gradients themselves are not zero


def test_worse_merge_has_larger_mismatch(setup):
    from gradmatch.merge import merge

    tmp, parent, tasks = setup
    children = [_perturbed(parent, tmp / f"child{i}", 0.02, seed=i) for i in range(2)]
    good = merge({"method": "task_arithmetic", "base": str(parent),
                  "models": [{"model": str(c), "weight": 0.5} for c in children]}, tmp / "good", progress=False)
    bad = _perturbed(good, tmp / "bad", 0.3, seed=7)  # same record, parameters pushed far away
    m_good = gradient_mismatch(good, data=tasks, split="train", progress=False)  # children/alphas from merge.json
    m_bad = gradient_mismatch(bad, data=tasks, split="train", progress=False)
    assert [t.alpha for t in m_good.tasks] == [0.5, 0.5]
    assert [t.child for t in m_good.tasks] == [str(c) for c in children]
    assert m_bad.total_mismatch > 2 * m_good.total_mismatch > 0
    for g, b in zip(m_good.tasks, m_bad.tasks):
        assert b.mismatch > g.mismatch


def test_mismatch_is_alpha_times_gradient_difference(setup):
    """One task: the reported value is α‖∇L(θ̄) − ∇L(θ_1)‖ computed the simple way, one example at a time."""
    from gradmatch.models import load_model

    tmp, parent, tasks = setup
    child = _perturbed(parent, tmp / "child", 0.05, seed=3)
    result = gradient_mismatch(parent, children=[str(child)], data=tasks[:1], alphas=[0.7], split="train",
                               batch_size=3, progress=False)

    def reference_grad(path):
        model, tok = load_model(path)
        model.eval()
        total = None
        for i, text in enumerate(TEXTS):
            enc = tok(text, return_tensors="pt")
            model.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(**enc).logits, torch.tensor([i % 2]))
            loss.backward()
            g = [p.grad.double().clone() for p in model.parameters()]
            total = g if total is None else [a + b for a, b in zip(total, g)]
        return [t / len(TEXTS) for t in total]

    diff = [0.7 * (a - b) for a, b in zip(reference_grad(str(parent)), reference_grad(str(child)))]
    expected = math.sqrt(sum(float((d * d).sum()) for d in diff))
    assert result.tasks[0].mismatch == pytest.approx(expected, rel=1e-4)
    assert result.total_mismatch == pytest.approx(expected, rel=1e-4)


def test_loss_gradient_rejects_empty():
    with pytest.raises(UserError):
        loss_gradient(torch.nn.Linear(2, 2), [])


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "gradmatch", "mismatch", *args], capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("case", ["no_record", "alpha_count", "bad_alpha", "existing_out"])
def test_cli_bad_input(setup, case):
    tmp, parent, tasks = setup
    out = tmp / "m.json"
    args = {
        "no_record": [str(parent), "--data", tasks[0]],
        "alpha_count": [str(parent), "--children", f"{parent},{parent}", "--alphas", "1", "--data", tasks[0]],
        "bad_alpha": [str(parent), "--children", str(parent), "--alphas", "x", "--data", tasks[0]],
        "existing_out": [str(parent), "--children", str(parent), "--alphas", "1", "--data", tasks[0], "--out", str(out)],
    }[case]
    if case == "existing_out":
        out.write_text("keep")
    proc = _cli(*args)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gradmatch: error:"), proc.stderr
    assert "Traceback" not in proc.stderr
    if case == "existing_out":
        assert out.read_text() == "keep"


def test_cli_writes_json(setup):
    tmp, parent, tasks = setup
    out = tmp / "m.json"
    proc = _cli(str(parent), "--children", str(parent), "--alphas", "1", "--data", tasks[0], "--split", "train",
                "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    assert data["total_mismatch"] == 0.0 and data["tasks"][0]["num_examples"] == len(TEXTS)


def test_residual_of_a_real_merge_splits_into_its_terms(setup):
    """Task arithmetic's merge is θ̄_TA itself: its prior term is zero, and its scaled mismatch is N_t times the
    plain one (one task); gradient matching's record names F_0 and N, so its residual needs no flags."""
    from gradmatch.fisher import run_fisher
    from gradmatch.merge import merge

    tmp, parent, tasks = setup
    child = _perturbed(parent, tmp / "child", 0.05, seed=4)
    run_fisher(str(parent), tasks[0], "train", out=tmp / "f0", estimator="empirical", progress=False)
    run_fisher(str(child), tasks[0], "train", out=tmp / "f1", estimator="empirical", progress=False)
    ta = merge({"method": "task_arithmetic", "base": str(parent), "models": [{"model": str(child), "weight": 0.5}]},
               tmp / "ta", progress=False)
    result = gradient_mismatch(ta, data=tasks[:1], split="train", base_hessian=str(tmp / "f0"), base_hessian_scale=50,
                               scales=[20], progress=False)
    r = result.residual
    assert r["prior_term"] == pytest.approx(0.0, abs=1e-6 * r["residual"])
    assert r["scaled_mismatch"] == pytest.approx(20 * result.total_mismatch, rel=1e-9)
    gm = merge({"method": "gradient_matching", "base": str(parent), "base_hessian": str(tmp / "f0"),
                "base_hessian_scale": 50, "models": [{"model": str(child), "weight": 0.5, "hessian": str(tmp / "f1"),
                                                      "hessian_scale": 20}]}, tmp / "gm", progress=False)
    measured = gradient_mismatch(gm, data=tasks[:1], split="train", progress=False)  # everything from merge.json
    assert measured.scales["base_hessian_scale"] == 50 and measured.scales["hessian_scales"] == [20]
    assert measured.residual["prior_term"] > 0 and measured.residual["preconditioned"] is not None


def test_residual_of_a_prior_merge_uses_its_recorded_level(setup):
    """base_hessian: prior: the residual takes H_0 = N_0·c + δ with c from merge.json, the same residual as a
    Hessian folder holding c in every entry (written here by hand) gives."""
    from gradmatch.fisher import run_fisher
    from gradmatch.merge import merge

    tmp, parent, tasks = setup
    child = _perturbed(parent, tmp / "child", 0.05, seed=4)
    run_fisher(str(child), tasks[0], "train", out=tmp / "f1", estimator="empirical", progress=False)
    gm = merge({"method": "gradient_matching", "base": str(parent), "base_hessian": "prior", "base_hessian_scale": 30,
                "models": [{"model": str(child), "weight": 0.5, "hessian": str(tmp / "f1"), "hessian_scale": 20}]},
               tmp / "gm", progress=False)
    level = json.loads((gm / "merge.json").read_text())["prior_level"]
    measured = gradient_mismatch(gm, data=tasks[:1], split="train", progress=False)
    constant = tmp / "constant"
    shutil.copytree(parent, constant)
    weights = load_file(constant / "model.safetensors")
    save_file({k: torch.full_like(v, level) for k, v in weights.items() if v.is_floating_point()},
              constant / "model.safetensors", metadata={"format": "pt"})
    by_hand = gradient_mismatch(gm, data=tasks[:1], split="train", base_hessian=str(constant), progress=False)
    assert measured.scales["base_hessian"] == "prior" and measured.residual["residual"] > 0
    assert measured.residual["residual"] == pytest.approx(by_hand.residual["residual"], rel=1e-5)
    assert measured.residual["prior_term"] == pytest.approx(by_hand.residual["prior_term"], rel=1e-5)


def test_run_mismatch_takes_the_merges_of_the_seeds_asked_for(tmp_path, monkeypatch):
    """--seed N keeps the merge jobs named seed-N/…; a seed the run does not have is one error."""
    import gradmatch.mismatch as mm

    specs = []
    for seed in (0, 1):
        out = tmp_path / f"merge-{seed}"
        out.mkdir()
        (out / "metrics.json").write_text(json.dumps({"alphas": []}))
        specs.append({"name": f"seed-{seed}/merges/task_arithmetic", "out": str(out)})
    seen = []
    monkeypatch.setattr(mm, "_finished_merge_jobs", lambda run_dir: specs)
    real_loads = json.loads
    monkeypatch.setattr(mm.json, "loads", lambda text, **kw: seen.append(text) or real_loads(text, **kw))
    assert mm.run_mismatch(tmp_path, seeds=[1], progress=False) == []
    assert len(seen) == 1  # only seed 1's metrics were read
    with pytest.raises(UserError, match="no finished merge of seed 5"):
        mm.run_mismatch(tmp_path, seeds=[5], progress=False)


# --------------------------------------------------------------------------- what merge.json names (issue 25, class 10)


@pytest.fixture
def recorded(setup):
    """A task-arithmetic merge of two children with its merge.json (fingerprints of every input recorded)."""
    from gradmatch.merge import merge

    tmp, parent, tasks = setup
    children = [_perturbed(parent, tmp / f"child{i}", 0.02, seed=i) for i in range(2)]
    merged = merge({"method": "task_arithmetic", "base": str(parent),
                    "models": [{"model": str(c), "weight": 0.5} for c in children]}, tmp / "merged", progress=False)
    return tmp, parent, tasks, children, merged


def _edit_record(merged, edit):
    record = json.loads((merged / "merge.json").read_text())
    edit(record)
    (merged / "merge.json").write_text(json.dumps(record))


def test_a_child_replaced_since_the_merge_is_refused_by_its_fingerprint(recorded):
    """On main the other weights at the recorded path were measured without a word."""
    tmp, parent, tasks, children, merged = recorded
    replacement = _perturbed(parent, tmp / "retrained", 0.05, seed=9)
    shutil.rmtree(children[1])
    shutil.copytree(replacement, children[1])
    with pytest.raises(UserError, match=r"models\[1\] .*child1 is not the model .*merged was merged from: its weights "
                                        r"differ from the fingerprint .*merge.json records .*--children"):
        gradient_mismatch(merged, data=tasks, split="train", progress=False)
    # naming the models explicitly measures them on purpose
    result = gradient_mismatch(merged, children=[str(c) for c in children], alphas=[0.5, 0.5], data=tasks,
                               split="train", progress=False)
    assert len(result.tasks) == 2


def test_a_recorded_child_that_is_gone_is_one_line(recorded):
    tmp, parent, tasks, children, merged = recorded
    shutil.rmtree(children[0])
    with pytest.raises(UserError, match=r"names models\[0\] .*child0, which does not exist .*--children"):
        gradient_mismatch(merged, data=tasks, split="train", progress=False)


def test_a_record_without_fingerprints_is_measured_with_a_note(recorded, caplog):
    tmp, parent, tasks, children, merged = recorded
    _edit_record(merged, lambda r: r.pop("inputs"))
    with caplog.at_level("WARNING"):
        result = gradient_mismatch(merged, data=tasks, split="train", progress=False)
    assert len(result.tasks) == 2 and "records no fingerprint of models[0], models[1]" in caplog.text


@pytest.mark.parametrize("edit, words", [
    (lambda r: r.update(parameters="fast"), r"merge.json .*parameters: Input should be a valid dictionary"),
    (lambda r: r.update(parameters={"delta_0": "tiny"}), r"parameters.delta_0: Input should be a valid number"),
    (lambda r: r.update(models=[]), r"models: List should have at least 1 item"),
    (lambda r: r["models"][0].update(weight=True), r"models.0.weight: Input should be a valid number"),
    (lambda r: r["models"][1].update(weight=float("nan")), r"models.1.weight: Input should be a finite number"),
    (lambda r: r["models"][0].update(hessian_scale="abc"), r"models.0.hessian_scale: Input should be a valid number"),
    (lambda r: r["models"][0].update(model=""), r"models.0.model: String should have at least 1 character"),
    (lambda r: r.update(prior_level="high"), r"prior_level: Input should be a valid number"),
    (lambda r: r.update(base_hessian_scale=-3), r"base_hessian_scale: Input should be greater than 0"),
    (lambda r: r.update(inputs={"models[0]": "somewhere"}), r"inputs.models\[0\]: Input should be a valid dictionary"),
], ids=["parameters-string", "delta-string", "no-models", "weight-bool", "weight-nan", "scale-string", "model-empty",
        "prior-level-string", "negative-scale", "inputs-mangled"])
def test_an_edited_record_is_one_line_naming_the_key(recorded, edit, words):
    """On main several of these were tracebacks (AttributeError, ValueError from float()), one measured nothing
    and exited 0 (no models), and a weight true was taken as 1."""
    import re

    tmp, parent, tasks, children, merged = recorded
    _edit_record(merged, edit)
    with pytest.raises(UserError) as info:
        gradient_mismatch(merged, data=tasks, split="train", progress=False)
    assert re.search(words, str(info.value)), str(info.value)
    assert "not a merge record gradmatch can read" in str(info.value)


def test_a_record_that_is_a_list_is_one_line(recorded):
    tmp, parent, tasks, children, merged = recorded
    (merged / "merge.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="merge.json is not a merge record gradmatch can read: it holds a list"):
        gradient_mismatch(merged, data=tasks, split="train", progress=False)


@pytest.mark.parametrize("target", ["record", "child-weights", "data", "inside-merge"])
def test_out_may_not_be_any_input(recorded, target):
    """On main `--out merged/merge.json --overwrite` replaced the merge's own record (and a child's weights, a data
    file the same way)."""
    tmp, parent, tasks, children, merged = recorded
    out = {"record": merged / "merge.json", "child-weights": children[0] / "model.safetensors",
           "data": tasks[0], "inside-merge": merged / "mismatch.json"}[target]
    before = {p: p.read_bytes() for p in [merged / "merge.json", children[0] / "model.safetensors", Path(tasks[0])]}
    proc = _cli(str(merged), "--data", tasks[0], "--data", tasks[1], "--split", "train", "--out", str(out),
                "--overwrite")
    assert proc.returncode == 2, proc.stderr
    line = [ln for ln in proc.stderr.splitlines() if ln.startswith("gradmatch: error:")]
    assert len(line) == 1 and "--out" in line[0] and ("would replace" in line[0] or "would change" in line[0]), line
    assert "Traceback" not in proc.stderr
    assert {p: p.read_bytes() for p in before} == before
    assert not (merged / "mismatch.json").exists()


def test_run_out_may_not_be_the_run_or_one_of_its_jobs(tmp_path):
    from gradmatch.mismatch import write_run_mismatch

    run = tmp_path / "run"
    job = run / "work" / "abc"
    job.mkdir(parents=True)
    (run / "jobs").mkdir()
    (run / "jobs" / "m.json").write_text(json.dumps({"kind": "merge", "name": "merges/ta", "out": str(job),
                                                      "inputs": {"parent": str(run / "work" / "p")}}))
    (run / "plan.json").write_text(json.dumps({"jobs": [{"kind": "merge", "spec": str(run / "jobs" / "m.json")}]}))
    with pytest.raises(UserError, match="is or contains the run"):
        write_run_mismatch(run, run, overwrite=True)
    with pytest.raises(UserError, match="is or contains the run"):
        write_run_mismatch(run, tmp_path, overwrite=True)
    with pytest.raises(UserError, match="--out .*abc is the folder of the merge job merges/ta"):
        write_run_mismatch(run, job, overwrite=True)
    assert sorted(p.name for p in run.iterdir()) == ["jobs", "plan.json", "work"]
