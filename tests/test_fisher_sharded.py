"""The Fisher at LLM scale: `--shard` (FSDP2 over torchrun processes) gives one process's result, gradient
checkpointing gives the plain pass's, the stored dtype is the one asked for, and each new flag's bad inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TEXTS = ["a fine film", "the worst thing I have ever seen, truly awful from start to end", "ok then", "bad bad bad",
         "meh, it was fine I guess, though the second half drags", "an utterly charming, clever and warm comedy",
         "dull and long", "I laughed, I cried, I left early", "two hours I will not get back"]


def _env(**extra):
    return dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1",
                TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore", **extra)


def _fisher(*args, processes: int = 0, script: Path | None = None, **env):
    """`gradmatch fisher ARGS`, alone or under torchrun with ``processes`` processes on this machine (``script``: a
    file that runs gradmatch's main instead of ``-m gradmatch``)."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"] \
        if processes else [sys.executable]
    program = [str(script)] if script else ["-m", "gradmatch"]
    return subprocess.run([*launcher, *program, "fisher", *map(str, args)], capture_output=True, text=True,
                          env=_env(**env), timeout=600, check=False)


#: gradmatch's main with every weight formed and reduced by blocks of rows (the path of an LM head's size).
ROWS_EVERYWHERE = ("import sys\nimport gradmatch.fisher.sharded as sharded\nsharded.ROW_BLOCK_ELEMENTS = 1\n"
                   "from gradmatch.cli import main\nsys.exit(main(sys.argv[1:]))\n")


def _tensors(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "hessian" / "model.safetensors"))


def _record(out: Path) -> dict:
    return json.loads((out / "hessian" / "fisher.json").read_text())


def _worst_relative(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max() / a[k].double().abs().max().clamp_min(1e-30))
               for k in a)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from conftest import make_tiny_lm

    root = tmp_path_factory.mktemp("sharded")
    data = root / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("".join(json.dumps({"text": t, "label": i % 2}) + "\n" for i, t in enumerate(TEXTS)))
    return {"root": root, "data": data / "train.jsonl",
            "llama": make_tiny_lm(root / "llama", family="llama", tie=True),
            "llama-untied": make_tiny_lm(root / "llama-untied", family="llama", tie=False, seed=3),
            "gpt2": make_tiny_lm(root / "gpt2", family="gpt2", tie=True)}


# --------------------------------------------------------------------------- sharded = one process


@pytest.mark.slow
@pytest.mark.parametrize("family, processes, extra", [
    # 8 texts of 2+ tokens, 2 processes, batches of 2: 2 batches each; tied embeddings; checkpointing too.
    ("llama", 2, ["--estimator", "empirical", "--batch-size", "2", "--gradient-checkpointing"]),
    # 3 processes and 2 examples: the third process has none and runs a filler batch only; Conv1D, positions.
    ("gpt2", 3, ["--estimator", "empirical", "--batch-size", "1", "--max-examples", "2"]),
    # batches of 3 over 4 examples each: one full batch and one of 1 per process; sampled next tokens; untied
    # embeddings and head as FSDP units of their own, every weight reduced one process's rows at a time.
    ("llama-untied", 2, ["--estimator", "sampled", "--batch-size", "3", "rows"]),
])
def test_sharded_fisher_equals_one_process(setup, family, processes, extra, tmp_path):
    script = None
    if "rows" in extra:
        extra = [a for a in extra if a != "rows"]
        script = tmp_path / "rows_everywhere.py"
        script.write_text(ROWS_EVERYWHERE)
    common = ["--model", setup[family], "--data", setup["data"], "--split", "train", "--max-length", "32", *extra]
    alone = _fisher(*[a for a in common if a != "--gradient-checkpointing"], "--out", tmp_path / "one")
    assert alone.returncode == 0, alone.stderr[-3000:]
    sharded = _fisher(*common, "--shard", "--out", tmp_path / "two", processes=processes, script=script)
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    assert _worst_relative(_tensors(tmp_path / "one"), _tensors(tmp_path / "two")) <= 1e-5
    one, two = _record(tmp_path / "one"), _record(tmp_path / "two")
    assert (two["sharded"], two["num_processes"], one["sharded"]) == (True, processes, False)
    differ = {k for k in one.keys() | two.keys() if one.get(k) != two.get(k)}
    assert differ <= {"sharded", "num_processes", "gradient_checkpointing"}, differ  # fingerprints included
    files = sorted(p.name for p in (tmp_path / "one" / "hessian").iterdir())
    assert sorted(p.name for p in (tmp_path / "two" / "hessian").iterdir()) == files
    assert json.loads((tmp_path / "two" / "hessian" / "config.json").read_text()) == \
        json.loads((tmp_path / "one" / "hessian" / "config.json").read_text())


@pytest.mark.slow
def test_sharded_fisher_matches_the_one_example_loop_in_float64(setup, tmp_path):
    """Against the original's method (one example at a time, its whole gradient squared) on a float64 copy."""
    from transformers import AutoModelForCausalLM

    from gradmatch.fisher import estimate_fisher_reference
    from gradmatch.kinds import kind_of_config
    from gradmatch.models import load_processor
    from gradmatch.statistics import batches

    result = _fisher("--model", setup["llama"], "--data", setup["data"], "--split", "train", "--max-length", "32",
                     "--estimator", "empirical", "--batch-size", "3", "--shard", "--out", tmp_path / "two", processes=2)
    assert result.returncode == 0, result.stderr[-3000:]
    model = AutoModelForCausalLM.from_pretrained(setup["llama"]).double()
    kind = kind_of_config(model.config)
    tokenizer = load_processor(str(setup["llama"]), kind=kind)
    import datasets

    encoded = kind.encode(datasets.Dataset.from_list([{"text": t} for t in TEXTS]), tokenizer, 32)
    expected = estimate_fisher_reference(model, batches(encoded, kind.collator(tokenizer), list(range(len(encoded))), 4),
                                         kind=kind, estimator="empirical")
    got = _tensors(tmp_path / "two")
    assert _record(tmp_path / "two")["num_examples"] == len(encoded)
    canonical = {n for n, _ in model.named_parameters()}
    assert _worst_relative({k: expected[k] for k in canonical}, got) <= 1e-5


@pytest.mark.slow
def test_sharded_fisher_of_smollm2_equals_one_process(tmp_path, sentiment_root):
    common = ["--model", "smollm2", "--data", "sst2", "--split", "train[:6]", "--data-dir", sentiment_root,
              "--max-length", "24", "--estimator", "empirical", "--batch-size", "2"]
    alone = _fisher(*common, "--out", tmp_path / "one")
    assert alone.returncode == 0, alone.stderr[-3000:]
    sharded = _fisher(*common, "--shard", "--out", tmp_path / "two", processes=2)
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    assert _worst_relative(_tensors(tmp_path / "one"), _tensors(tmp_path / "two")) <= 1e-5


# --------------------------------------------------------------------------- checkpointing, dtypes, rules


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_gradient_checkpointing_gives_the_plain_pass_bit_for_bit(setup, family, one_thread):
    """Recomputed activations are the same numbers: in float64 the two passes agree exactly."""
    from transformers import AutoModelForCausalLM

    from gradmatch.fisher import FisherAccumulator
    from gradmatch.kinds import kind_of_config

    model = AutoModelForCausalLM.from_pretrained(setup[family]).double()
    kind = kind_of_config(model.config)
    torch.manual_seed(0)
    ids = torch.randint(1, 50, (3, 11))
    attention = torch.ones_like(ids)
    attention[1, 7:] = 0
    batch = {"input_ids": ids, "attention_mask": attention, "labels": ids.clone()}
    results = []
    for checkpointing in (False, True):
        acc = FisherAccumulator(model, kind=kind, estimator="sampled", seed=4, gradient_checkpointing=checkpointing)
        with acc:
            acc.add(batch)
        results.append(acc.mean())
    for name in results[0]:
        assert torch.equal(results[0][name], results[1][name]), name


def test_bfloat16_rmsnorm_takes_its_closed_form(setup):
    """A bf16 Llama's norms fit the rule (transformers casts x̂ back to bf16 before the weight multiplies it): no
    module falls back to the per-example recompute, and the result is the one-example loop's within bf16 rounding."""
    from transformers import AutoModelForCausalLM

    from gradmatch.fisher import FisherAccumulator, estimate_fisher_reference
    from gradmatch.fisher.layers import RMSNormRule
    from gradmatch.kinds import kind_of_config

    model = AutoModelForCausalLM.from_pretrained(setup["llama"]).to(torch.bfloat16)
    kind = kind_of_config(model.config)
    torch.manual_seed(1)
    ids = torch.randint(1, 50, (2, 9))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    acc = FisherAccumulator(model, kind=kind, estimator="empirical")
    fallbacks = []
    acc._no_rule = fallbacks.append
    with acc:
        acc.add(batch)
    assert not fallbacks and sum(isinstance(r, RMSNormRule) for r in acc._rule.values()) == 5
    expected = estimate_fisher_reference(model, [batch], kind=kind, estimator="empirical")
    for name, value in acc.mean().items():
        if "norm" in name:
            scale = expected[name].double().abs().max()
            assert float((value.double() - expected[name].double()).abs().max() / scale) < 0.03, name


@pytest.mark.slow
def test_stored_dtype_follows_the_model_or_the_flag(setup, tmp_path):
    from transformers import AutoModelForCausalLM

    bf16 = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(setup["llama"]).to(torch.bfloat16).save_pretrained(bf16)
    from shutil import copy

    for f in ("tokenizer.json", "tokenizer_config.json"):
        copy(setup["llama"] / f, bf16 / f)
    common = ["--data", setup["data"], "--split", "train", "--max-length", "16", "--estimator", "empirical"]
    for model, flag, expected in ((bf16, [], torch.bfloat16), (setup["llama"], [], torch.float32),
                                  (setup["llama"], ["--out-dtype", "bfloat16"], torch.bfloat16),
                                  (bf16, ["--out-dtype", "float32"], torch.float32)):
        out = tmp_path / f"out-{len(list(tmp_path.iterdir()))}"
        result = _fisher("--model", model, *common, *flag, "--out", out)
        assert result.returncode == 0, result.stderr[-2000:]
        assert {t.dtype for t in _tensors(out).values()} == {expected}
        assert _record(out)["dtype"] == str(expected).removeprefix("torch.")
    # bf16 storage is the float32 Fisher rounded to bf16 (relative change at most 2^-8 per entry)
    f32, b16 = _tensors(tmp_path / "out-2"), _tensors(tmp_path / "out-3")
    for name in f32:
        assert torch.equal(f32[name].to(torch.bfloat16), b16[name]), name


def test_float16_storage_refuses_entries_beyond_its_range(tmp_path):
    from gradmatch.errors import UserError
    from gradmatch.fisher.files import check_storable, write_hessian

    model = torch.nn.Linear(3, 2)
    fisher = {"weight": torch.full((2, 3), 7e4), "bias": torch.full((2,), 1e-9)}
    assert check_storable(fisher.items(), torch.bfloat16) is None
    with pytest.raises(UserError, match="float16's largest value 6.55e"):
        write_hessian(model, fisher, tmp_path / "h", {}, torch.float16)
    assert not (tmp_path / "h").exists()
    fisher["weight"] = torch.full((2, 3), 1e-3)
    write_hessian(torch.nn.Linear(3, 2), fisher, tmp_path / "h", {}, torch.float16)
    from safetensors.torch import load_file

    stored = load_file(str(tmp_path / "h" / "model.safetensors"))
    assert stored["bias"].dtype == torch.float16 and float(stored["bias"].abs().max()) == 0.0  # below 6e-8: 0


# --------------------------------------------------------------------------- bad input


def test_the_new_flags_refuse_bad_input_in_one_line(setup, tmp_path):
    out = tmp_path / "out"
    base = ["--data", setup["data"], "--split", "train", "--out", out]
    cases = {
        "WORLD_SIZE is not set": ["--model", setup["llama"], *base, "--shard"],
        "invalid choice: 'int8'": ["--model", setup["llama"], *base, "--out-dtype", "int8"],
        "--shard does not apply to --data generated": ["--model", setup["llama"], "--data", "generated", "--examples",
                                                         "2", "--out", out, "--shard"],
    }
    for expected, args in cases.items():
        result = _fisher(*args)
        assert result.returncode == 2, (expected, result.stderr[-2000:])
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0] and "Traceback" not in result.stderr, result.stderr[-2000:]
        assert not out.exists()
    # a model without layers transformers can recompute
    from gradmatch.errors import UserError
    from gradmatch.fisher.accumulator import checkpoint_layers

    with pytest.raises(UserError, match="drop --gradient-checkpointing"):
        checkpoint_layers(torch.nn.Sequential(torch.nn.Linear(2, 2)))


@pytest.mark.slow
def test_shard_refuses_a_module_without_a_closed_form_in_one_line(setup, tmp_path):
    """A module that owns parameters and has no layer rule would be recomputed after FSDP resharded it."""
    # w·x̂ + x is not w·x̂: a variant the RMSNorm rule leaves to the recompute — made so by patching the forward
    code = (
        "import sys, transformers.models.llama.modeling_llama as m\n"
        "f = m.LlamaRMSNorm.forward\n"
        "m.LlamaRMSNorm.forward = lambda self, x: f(self, x) + x\n"
        "from gradmatch.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n")
    script = tmp_path / "odd_fisher.py"
    script.write_text(code)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(script), "fisher", "--model", str(setup["llama"]), "--data", str(setup["data"]), "--split",
                             "train", "--shard", "--out", str(tmp_path / "out")], capture_output=True, text=True,
                            env=_env(), timeout=600, check=False)
    assert result.returncode != 0
    assert "has no closed-form rule" in result.stderr and "run without --shard" in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_weight_larger_than_a_block_is_squared_by_blocks_of_rows(setup, monkeypatch):
    """An LM head larger than the per-example block (vocabulary × hidden) is formed one example and some rows at a
    time: the same Fisher as the one-example loop (float64)."""
    from transformers import AutoModelForCausalLM

    from gradmatch.fisher import estimate_fisher, estimate_fisher_reference
    from gradmatch.fisher import layers
    from gradmatch.kinds import kind_of_config

    model = AutoModelForCausalLM.from_pretrained(setup["llama-untied"]).double()
    monkeypatch.setattr(layers, "_MAX_BLOCK_CPU", 100)  # smaller than every weight: rows of 100 // in at a time
    kind = kind_of_config(model.config)
    torch.manual_seed(2)
    ids = torch.randint(1, 50, (3, 7))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    got = estimate_fisher(model, [batch], kind=kind, estimator="empirical", progress=False)
    expected = estimate_fisher_reference(model, [batch], kind=kind, estimator="empirical")
    assert got["lm_head.weight"].shape[0] * got["lm_head.weight"].shape[1] > 100
    for name in expected:
        assert torch.allclose(got[name], expected[name], rtol=1e-9, atol=1e-12 * float(expected[name].abs().max())), name


def test_a_merge_from_bfloat16_hessians_stays_within_the_documented_bound(setup, tmp_path):
    """docs/fisher.md: rounding every Hessian to bfloat16 moves each merged entry by at most (2u/(1−u))·max_t |τ_t|
    (u = 2⁻⁹), plus one float32 step of the written weight."""
    import shutil

    from safetensors.torch import load_file, save_file

    from gradmatch.merge import merge

    parent = setup["llama-untied"]
    base = load_file(str(parent / "model.safetensors"))
    torch.manual_seed(5)
    folders = {}
    for i in range(2):  # children: the parent plus a task vector
        child = tmp_path / f"child{i}"
        shutil.copytree(parent, child)
        save_file({k: v + 0.05 * torch.randn_like(v) for k, v in base.items()}, str(child / "model.safetensors"),
                  metadata={"format": "pt"})
        folders[f"child{i}"] = child
    hessians = {}
    for name in ("parent", "child0", "child1"):  # positive Hessians spanning six orders of magnitude
        values = {k: torch.exp(torch.randn_like(v) * 3) for k, v in base.items()}
        for dtype in (torch.float32, torch.bfloat16):
            folder = tmp_path / f"h-{name}-{str(dtype)[6:]}" / "hessian"
            folder.mkdir(parents=True)
            shutil.copy(parent / "config.json", folder / "config.json")
            save_file({k: v.to(dtype) for k, v in values.items()}, str(folder / "model.safetensors"),
                      metadata={"format": "pt"})
            hessians[name, dtype] = folder.parent
    outs = {}
    for dtype in (torch.float32, torch.bfloat16):
        config = {"method": "gradient_matching", "base": str(parent), "base_hessian": str(hessians["parent", dtype]),
                  "base_hessian_scale": 3.0, "out_dtype": "float32",
                  "models": [{"model": str(folders[c]), "hessian": str(hessians[c, dtype]), "hessian_scale": 2.0}
                             for c in ("child0", "child1")]}
        outs[dtype] = tmp_path / f"merged-{str(dtype)[6:]}"
        merge(config, outs[dtype], progress=False)
    a, b = load_file(str(outs[torch.float32] / "model.safetensors")), load_file(str(outs[torch.bfloat16] / "model.safetensors"))
    u = 2.0 ** -9
    kids = [load_file(str(folders[c] / "model.safetensors")) for c in ("child0", "child1")]
    moved = 0.0
    for name in base:
        tau = torch.stack([k[name].double() - base[name].double() for k in kids]).abs().amax(0)
        delta = (a[name].double() - b[name].double()).abs()
        assert bool((delta <= 2 * u / (1 - u) * tau + 2.0 ** -23 * a[name].double().abs()).all()), name
        moved = max(moved, float((delta / tau.clamp_min(1e-12)).max()))
    assert moved > 1e-4  # the rounding did change the merge: the bound is not met by doing nothing
