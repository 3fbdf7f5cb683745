"""`gradmatch gram` on causal LMs and the Grams the merge reads: a tied lm_head gets no Gram (the merge averages it
with the embeddings), transformers Conv1D models (GPT-2) and a --kind that does not fit the checkpoint are refused
with one line before any work, and a Gram that is not a Σ x xᵀ (not symmetric, negative diagonal) is refused."""

from __future__ import annotations

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from conftest import LM_CORPUS, make_tiny_bert, make_tiny_lm, write_jsonl
from test_regmean import assert_regmean_formula

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus") / "reviews"
    write_jsonl(folder / "train.jsonl", [{"text": t, "label": y} for t, y in LM_CORPUS])
    return folder


def _main(*args) -> int:
    from gradmatch.cli import main

    return main([str(a) for a in args])


def _gram(model, corpus, out) -> int:
    return _main("gram", "--model", model, "--data", corpus, "--split", "train", "--out", out, "--batch-size", 5,
                 "--quiet")


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def llamas(request, tmp_path_factory, corpus):
    """A tiny Llama parent and two children (lm_head tied to the embeddings or not), each child's Gram via the CLI."""
    tie = request.param
    root = tmp_path_factory.mktemp("tied" if tie else "untied")
    parent = make_tiny_lm(root / "parent", "llama", seed=0, tie=tie)
    children = [make_tiny_lm(root / f"child{t}", "llama", seed=t + 1, tie=tie) for t in range(2)]
    grams = []
    for t, child in enumerate(children):
        assert _gram(child, corpus, root / f"gram{t}") == 0
        grams.append(root / f"gram{t}")
    return {"tie": tie, "root": root, "parent": parent, "children": children, "grams": grams}


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("gradmatch: error: "), lines[0]
    return lines[0]


def test_llama_grams_and_regmean_merge_equal_the_float64_formula(llamas, tmp_path):
    """Every Linear of the decoder has a Gram; the untied lm_head too, the tied one not (the checkpoint stores it
    once, as model.embed_tokens.weight, which the merge averages). Before the fix the tied lm_head had a Gram keyed
    lm_head.weight, which the merge refused as "not a merged tensor of the base model"."""
    from gradmatch.merge import merge

    grams = [load_file(g / "gram.safetensors") for g in llamas["grams"]]
    expected_layers = {f"model.layers.{i}.{a}.{p}.weight" for i in range(2)
                       for a, p in [("self_attn", n) for n in LINEARS[:4]] + [("mlp", n) for n in LINEARS[4:]]}
    expected_layers |= set() if llamas["tie"] else {"lm_head.weight"}
    assert set(grams[0]) == expected_layers == set(grams[1])

    weights, r = [1.0, 3.0], 0.9
    config = {"method": "regmean", "base": str(llamas["parent"]), "parameters": {"reduce_nondiagonal": r},
              "models": [{"model": str(c), "gram": str(g), "weight": w}
                         for c, g, w in zip(llamas["children"], llamas["grams"], weights)]}
    out = merge(config, tmp_path / "merged", progress=False, block_rows=7)
    merged = load_file(out / "model.safetensors")
    children = [load_file(c / "model.safetensors") for c in llamas["children"]]
    assert ("lm_head.weight" in merged) != llamas["tie"]
    assert_regmean_formula(merged, children, grams, weights, r)  # no Gram (a tied lm_head): the weighted average


def test_gram_refuses_a_conv1d_model_before_any_work(corpus, tmp_path, capsys, monkeypatch):
    """GPT-2's attention and MLP are transformers Conv1D, which gram does not record: before the fix it wrote a
    file with only the tied lm_head's Gram, which the merge then refused."""
    import gradmatch.data

    gpt2 = make_tiny_lm(tmp_path / "gpt2", "gpt2", seed=1, tie=True)

    def no_data(*args, **kwargs):
        raise AssertionError("the data was read before the refusal")

    monkeypatch.setattr(gradmatch.data, "load_split", no_data)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert _gram(gpt2, corpus, tmp_path / "out") == 2
    line = _one_error_line(capsys)
    assert (f"gradmatch gram computes Grams of nn.Linear layers; model {gpt2}'s attention and MLP layers are "
            "transformers Conv1D (GPT-2 family, e.g. transformer.h.0.attn.c_attn): RegMean is not available for it"
            in line), line
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_the_accumulator_refuses_conv1d_and_skips_a_tied_linear(tmp_path):
    from transformers import AutoModelForCausalLM

    from gradmatch.errors import UserError
    from gradmatch.gram import GramAccumulator

    gpt2 = AutoModelForCausalLM.from_pretrained(make_tiny_lm(tmp_path / "gpt2", "gpt2", tie=True))
    with pytest.raises(UserError, match="the model's attention and MLP layers are transformers Conv1D"):
        GramAccumulator(gpt2)
    llama = AutoModelForCausalLM.from_pretrained(make_tiny_lm(tmp_path / "llama", "llama", tie=True))
    assert llama.lm_head.weight is llama.get_input_embeddings().weight
    assert "lm_head" not in GramAccumulator(llama).modules and len(GramAccumulator(llama).modules) == 14


@pytest.mark.parametrize("family,kind,words", [
    ("gpt2", "text-classification", ("has no classification head (its architecture is GPT2LMHeadModel): the Gram "
                                     "of a text-classification model needs a trained classifier")),
    ("llama", "text-classification", "has no classification head (its architecture is LlamaForCausalLM)"),
    ("bert", "causal-lm", ("is a classifier (BertForSequenceClassification), not a causal language model: the Gram "
                           "needs a language-modelling head")),
])
def test_gram_refuses_a_kind_that_does_not_fit_the_checkpoint(corpus, tmp_path, capsys, family, kind, words):
    """Before the fix: a traceback ("Asking to pad but the tokenizer does not have a padding token") for a causal
    LM read as a classifier, and a Gram of a BertLMHeadModel (a new random head) for a classifier as causal-lm."""
    model = (make_tiny_bert(tmp_path / family) if family == "bert"
             else make_tiny_lm(tmp_path / family, family, tie=False))
    code = _main("gram", "--model", model, "--kind", kind, "--data", corpus, "--split", "train",
                 "--out", tmp_path / "out", "--quiet")
    line = _one_error_line(capsys)
    assert code == 2 and f"model {model} " in line and words in line, line
    assert not (tmp_path / "out").exists()


def _tampered(llamas, tmp_path, change):
    """A merge config whose first Gram has one layer changed by ``change`` (the untied world's Grams)."""
    grams = load_file(llamas["grams"][0] / "gram.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"
    grams[name] = change(grams[name]).contiguous()
    (tmp_path / "bad").mkdir()
    save_file(grams, tmp_path / "bad" / "gram.safetensors", metadata={"format": "pt"})
    (tmp_path / "bad" / "gram.json").write_bytes((llamas["grams"][0] / "gram.json").read_bytes())
    config = {"method": "regmean", "base": str(llamas["parent"]),
              "models": [{"model": str(llamas["children"][0]), "gram": str(tmp_path / "bad")},
                         {"model": str(llamas["children"][1]), "gram": str(llamas["grams"][1])}]}
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(config))
    return name


@pytest.mark.parametrize("case", ["not symmetric", "negated"])
def test_the_merge_refuses_a_gram_that_is_not_a_sum_of_outer_products(llamas, tmp_path, capsys, case):
    """Before the fix a non-symmetric Gram was merged without a word (rc 0), and a negated one refused as
    "singular (an input feature that is always zero…?)"."""
    if case == "not symmetric":
        name = _tampered(llamas, tmp_path, lambda G: G + 10 * torch.triu(torch.ones_like(G), 1))
        words = f"the Gram of {name} is not symmetric (largest asymmetry 10, "
    else:
        name = _tampered(llamas, tmp_path, lambda G: -G)
        words = f"the Gram of {name} has negative diagonal entries (down to -"
    assert _main("merge", tmp_path / "m.yaml", tmp_path / "out", "--quiet") == 2
    line = _one_error_line(capsys)
    assert f"gram of models[0] {tmp_path / 'bad' / 'gram.safetensors'}: " in line and words in line, line
    assert ("not a Gram matrix Σ x xᵀ" in line) and not (tmp_path / "out").exists()


def test_float_rounding_asymmetry_and_a_float16_gram_pass(tmp_path):
    from gradmatch.gram import GramFile

    g = torch.Generator().manual_seed(0)
    X = torch.randn(50, 300, generator=g, dtype=torch.float64)
    G = (X.t() @ X / 50).to(torch.float32)
    nudged = G.clone()
    nudged[3, 7] += 2e-7 * float(G.abs().max())  # a rounding error: passes
    bad = G.clone()
    bad[3, 7] += 1e-3 * float(G.abs().max())
    zero_diag = torch.diag(torch.tensor([1.0, 2.0, 0.0, 3.0]))  # a feature that is always zero: a valid (singular)
    # Gram (an all-zero one, without positions that say the layer saw input, is refused: tests/test_hostile_pass.py)
    (tmp_path / "g").mkdir()
    save_file({"a": nudged, "b": G.half(), "c": zero_diag, "d": bad}, tmp_path / "g" / "gram.safetensors")
    grams = GramFile(tmp_path / "g", "gram")
    for name in "abc":
        grams.read(name)
    from gradmatch.errors import UserError

    with pytest.raises(UserError, match=r"the Gram of d is not symmetric \(largest asymmetry .*, 0.001 of its"):
        grams.read("d")
