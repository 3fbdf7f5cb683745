"""The data-free Fisher of a causal LM (`gradmatch fisher --data generated`): against an exact enumeration of every
sequence, sampling independent of batching and sharding, the model's own distribution, a pad id that is also a
generated token, the command line and its bad inputs, torchrun."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_tiny_lm
from gradmatch.errors import UserError
from gradmatch.kinds._classifier import example_uniforms

pytestmark = pytest.mark.usefixtures("one_thread")

#: The small vocabulary of the enumerable models: BOS 0, EOS 1, then four ordinary tokens.
VOCAB = {"<s>": 0, "</s>": 1, "<unk>": 2, "a": 3, "b": 4, "c": 5}
BOS, EOS = 0, 1


def make_small_lm(path: Path, family: str = "gpt2", *, seed: int = 0, pad: str | None = None, bos: bool = True,
                  dtype=torch.float64) -> Path:
    """A causal LM over VOCAB (GPT-2 with tied embeddings, or Llama), weights large enough that its
    distributions are far from uniform, saved with a word-level tokenizer (pad token ``pad``, else none)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    specials = {"eos_token": "</s>", "unk_token": "<unk>"}
    if bos:
        specials["bos_token"] = "<s>"
    if pad is not None:
        specials["pad_token"] = pad
    PreTrainedTokenizerFast(tokenizer_object=tok, **specials).save_pretrained(path)
    torch.manual_seed(seed)
    ids = {"bos_token_id": BOS if bos else None, "eos_token_id": EOS,
           "pad_token_id": VOCAB[pad] if pad is not None else None}
    if family == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(VOCAB), n_positions=16, n_embd=8, n_layer=1, n_head=2,
                                           initializer_range=0.4, tie_word_embeddings=True, **ids))
    else:
        model = LlamaForCausalLM(LlamaConfig(vocab_size=len(VOCAB), hidden_size=8, intermediate_size=16,
                                             num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                             max_position_embeddings=16, initializer_range=0.4,
                                             tie_word_embeddings=False, **ids))
    model.to(dtype).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("small-lms")
    return {"gpt2": make_small_lm(root / "gpt2", "gpt2", seed=3),
            "llama": make_small_lm(root / "llama", "llama", seed=4),
            "gpt2-pad-a": make_small_lm(root / "gpt2-pad-a", "gpt2", seed=3, pad="a"),
            "gpt2-pad-eos": make_small_lm(root / "gpt2-pad-eos", "gpt2", seed=3, pad="</s>")}


@pytest.fixture(scope="module")
def lms(tmp_path_factory):
    root = tmp_path_factory.mktemp("lms")
    return {"gpt2": make_tiny_lm(root / "gpt2", "gpt2", seed=1, tie=True),
            "llama": make_tiny_lm(root / "llama", "llama", seed=2, tie=False)}


def _load(path):
    from gradmatch.models import load_model

    return load_model(path)


def _prompts_file(path: Path, prompts) -> Path:
    path.write_text("".join(p + "\n" for p in prompts), encoding="utf-8")
    return path


def _read_fisher(out: Path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors.torch import load_file

    return (load_file(out / "hessian" / "model.safetensors"),
            json.loads((out / "hessian" / "fisher.json").read_text()))


# --------------------------------------------------------------------------- exact enumeration


def _continuations(L: int):
    """Every continuation of at most L tokens that ends at EOS, or at L tokens without one."""
    others = [t for t in VOCAB.values() if t != EOS]
    for k in range(1, L + 1):
        for head in itertools.product(others, repeat=k - 1):
            yield [*head, EOS]
        if k == L:
            yield from (list(c) for c in itertools.product(others, repeat=L))


def _enumerate(model, prefix: list[int], L: int) -> dict[str, dict[str, torch.Tensor]]:
    """Σ_x p(x) g(x)² and Σ_x p(x) g(x)⁴ over every continuation x of ``prefix``, for the right g (the new tokens'
    log-likelihood, EOS included) and two wrong ones (the prompt scored too; EOS not scored), in float64."""
    model.eval()
    params = dict(model.named_parameters())
    names = list(params)
    moments = {which: {"F": {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()},
                       "M4": {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}}
               for which in ("right", "prompt scored", "EOS not scored")}
    total = 0.0
    P = len(prefix)
    for new in _continuations(L):
        ids = torch.tensor([prefix + new])
        log_probs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
        terms = log_probs.gather(1, ids[0, 1:, None]).squeeze(1)  # term i-1 predicts token i
        new_terms, prompt_terms = terms[P - 1:], terms[:P - 1]
        p = float(new_terms.detach().sum().exp())
        total += p
        ended = new[-1] == EOS
        pieces = {"right": new_terms.sum(), "prompt scored": new_terms.sum() + prompt_terms.sum(),
                  "EOS not scored": new_terms[:-1].sum() if ended else new_terms.sum()}
        for which, objective in pieces.items():
            if not objective.requires_grad:  # an empty sum: a zero gradient
                continue
            grads = torch.autograd.grad(objective, [params[n] for n in names], allow_unused=True, retain_graph=True)
            for n, g in zip(names, grads):
                if g is not None:
                    g = g.double()
                    moments[which]["F"][n] += p * g.square()
                    moments[which]["M4"][n] += p * g.square().square()
    assert abs(total - 1.0) < 1e-9, total  # every sequence enumerated
    return moments


def _z_excess(estimate, reference, N: int) -> float:
    """The largest |F̂ − F| over 4.5 standard errors sqrt(Var/N) plus a small floor, over every element: <= 1 passes."""
    F, M4 = reference["F"], reference["M4"]
    scale = max(float(v.abs().max()) for v in F.values())
    worst = 0.0
    for name in F:
        se = (M4[name] - F[name].square()).clamp(min=0).div(N).sqrt()
        bound = 4.5 * se + 1e-6 * F[name].abs() + 1e-9 * scale
        worst = max(worst, float(((estimate[name].double() - F[name]).abs() / bound).max()))
    return worst


@pytest.mark.parametrize("family, prompt", [("gpt2", None), ("llama", "a b c")])
def test_the_estimate_matches_an_exact_enumeration_of_every_sequence(small, tmp_path, family, prompt):
    from gradmatch.fisher.generated import run_generated_fisher

    N, L = 4000, 3
    prompts = _prompts_file(tmp_path / "prompts.txt", [prompt]) if prompt else None
    run_generated_fisher(str(small[family]), out=tmp_path / "f", examples=N, max_length=L, prompts=prompts, seed=7,
                         batch_size=500, progress=False)
    estimate, meta = _read_fisher(tmp_path / "f")
    model, tokenizer = _load(small[family])
    assert next(model.parameters()).dtype == torch.float64
    prefix = [BOS] if prompt is None else tokenizer(prompt)["input_ids"]
    assert prefix == ([BOS] if prompt is None else [3, 4, 5])
    moments = _enumerate(model, prefix, L)
    assert estimate.keys() == moments["right"]["F"].keys()
    assert _z_excess(estimate, moments["right"], N) <= 1.0
    # The check has the power to tell a wrong reference apart.
    assert _z_excess(estimate, moments["EOS not scored"], N) > 3.0
    if prompt is not None:
        assert _z_excess(estimate, moments["prompt scored"], N) > 3.0
    assert meta["num_examples"] == N and 1 * N < meta["num_tokens"] < L * N  # some sequences stopped at EOS


# --------------------------------------------------------------------------- the sequences


def _naive(model, tokenizer, prompts, n: int, L: int, seed: int) -> list[int]:
    """Sequence n drawn one token at a time with no cache and no padding (the test's own inverse CDF)."""
    ids = [tokenizer.bos_token_id] if not prompts else list(tokenizer(prompts[n % len(prompts)])["input_ids"])
    u = example_uniforms(seed, n, L)
    for t in range(L):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1].double()
        cdf = torch.softmax(logits, -1).cumsum(-1).numpy()
        token = min(int(np.searchsorted(cdf, u[t] * cdf[-1], side="right")), len(cdf) - 1)
        ids.append(token)
        if token == tokenizer.eos_token_id:
            break
    return ids


@pytest.mark.parametrize("which, prompts", [
    ("small", None), ("small", ["a", "b c a", "c c"]),
    ("tiny", ["the movie", "a dull and boring film with nothing", "what"])])
def test_sequences_depend_on_neither_the_batch_size_nor_the_other_sequences(small, lms, which, prompts):
    from gradmatch.fisher.generated import sample_sequences

    model, tokenizer = _load(small["llama"] if which == "small" else lms["gpt2"])
    if which == "tiny":
        with torch.no_grad():  # a less uniform distribution over the 300 tokens
            model.get_output_embeddings().weight.mul_(8)
    L = 3 if which == "small" else 8
    common = dict(examples=13, max_new_tokens=L, prompts=prompts, seed=5, progress=False)
    whole = sample_sequences(model, tokenizer, batch_size=5, **common)
    assert [r["index"] for r in whole] == list(range(13))
    assert sample_sequences(model, tokenizer, batch_size=1, **common) == whole
    shards = [sample_sequences(model, tokenizer, batch_size=3, indices=list(range(r, 13, 3)), **common)
              for r in range(3)]
    assert sorted((r for s in shards for r in s), key=lambda r: r["index"]) == whole
    for r in whole:  # the cached, left-padded batch draws what one sequence alone draws
        assert r["input_ids"] == _naive(model, tokenizer, prompts, r["index"], L, seed=5)
        prompt_length = sum(1 for y in r["labels"] if y == -100)
        assert r["labels"][prompt_length:] == r["input_ids"][prompt_length:]
        assert prompt_length == (1 if not prompts else len(tokenizer(prompts[r["index"] % len(prompts)])["input_ids"]))
    if which == "small":
        lengths = {len(r["input_ids"]) - sum(1 for y in r["labels"] if y == -100) for r in whole}
        assert len(lengths) > 1  # rows of a batch finished at different steps
    assert sample_sequences(model, tokenizer, batch_size=5, **{**common, "seed": 6}) != whole


def test_first_tokens_and_whole_sequences_follow_the_model_distribution(small):
    from scipy.stats import chisquare

    from gradmatch.fisher.generated import sample_sequences

    model, tokenizer = _load(small["gpt2"])
    N, L = 6000, 2
    records = sample_sequences(model, tokenizer, examples=N, max_new_tokens=L, prompts=None, seed=11,
                               batch_size=1000, progress=False)
    with torch.no_grad():
        p = torch.softmax(model(input_ids=torch.tensor([[BOS]])).logits[0, -1].double(), -1).numpy()
    first = np.bincount([r["input_ids"][1] for r in records], minlength=len(VOCAB))
    assert chisquare(first, N * p).pvalue > 1e-3
    hot = torch.softmax(model(input_ids=torch.tensor([[BOS]])).logits[0, -1].double().detach() / 2, -1).numpy()
    assert chisquare(first, N * hot).pvalue < 1e-6  # temperature 2 would be told apart
    # Every whole sequence (a continuation of at most L tokens) as often as the model gives it.
    expected, seen = [], []
    counts = {}
    for r in records:
        key = tuple(r["input_ids"][1:])
        counts[key] = counts.get(key, 0) + 1
    for new in _continuations(L):
        with torch.no_grad():
            ids = torch.tensor([[BOS, *new]])
            log_probs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
            prob = float(log_probs.gather(1, ids[0, 1:, None]).sum().exp())
        expected.append(N * prob)
        seen.append(counts.pop(tuple(new), 0))
    assert not counts  # nothing sampled that is not a sequence
    assert abs(sum(expected) - N) < 1e-6
    assert chisquare(seen, expected).pvalue > 1e-3


def test_a_pad_id_that_is_also_a_generated_token_keeps_every_length(small, tmp_path):
    from gradmatch.fisher.generated import run_generated_fisher, sample_sequences

    model, tokenizer = _load(small["gpt2-pad-a"])
    pad = tokenizer.pad_token_id
    assert pad == VOCAB["a"] and model.config.pad_token_id == pad
    prompts = ["b", "a c b a", "c"]
    records = sample_sequences(model, tokenizer, examples=40, max_new_tokens=4, prompts=prompts, seed=2,
                               batch_size=8, progress=False)
    for r in records:
        assert r["input_ids"] == _naive(model, tokenizer, prompts, r["index"], 4, seed=2)
    new = [r["input_ids"][len(tokenizer(prompts[r["index"] % 3])["input_ids"]):] for r in records]
    assert any(pad in ids[:-1] for ids in new)  # the pad id drawn before the end of a sequence ...
    assert any(ids[-1] == pad for ids in new)  # ... and as its last token (at the length limit)
    assert all(ids[-1] == EOS or len(ids) == 4 for ids in new)
    # The Fisher does not depend on what fills the padding.
    for name in ("gpt2-pad-a", "gpt2-pad-eos"):
        run_generated_fisher(str(small[name]), out=tmp_path / name, examples=40, max_length=4, seed=2,
                             batch_size=8, progress=False)
    with_a, meta_a = _read_fisher(tmp_path / "gpt2-pad-a")
    with_eos, meta_eos = _read_fisher(tmp_path / "gpt2-pad-eos")
    assert meta_a["num_tokens"] == meta_eos["num_tokens"]
    for k in with_a:
        torch.testing.assert_close(with_a[k], with_eos[k], rtol=1e-6, atol=1e-12, msg=k)


def test_without_a_bos_token_prompts_are_required(small, tmp_path):
    from gradmatch.fisher.generated import sample_sequences

    path = make_small_lm(tmp_path / "no-bos", "llama", bos=False)
    model, tokenizer = _load(path)
    assert tokenizer.bos_token_id is None and model.config.bos_token_id is None
    with pytest.raises(UserError, match="no beginning-of-sequence token .* give --prompts"):
        sample_sequences(model, tokenizer, examples=2, max_new_tokens=2, prompts=None, seed=0, batch_size=2)
    records = sample_sequences(model, tokenizer, examples=2, max_new_tokens=2, prompts=["a"], seed=0, batch_size=2,
                               progress=False)
    assert [r["input_ids"][0] for r in records] == [VOCAB["a"]] * 2


# --------------------------------------------------------------------------- the command line


def _main(capsys, *args) -> tuple[int, list[str]]:
    from gradmatch.cli import main

    code = main([str(a) for a in args])
    return code, capsys.readouterr().err.strip().splitlines()


def test_the_cli_writes_a_hessian_with_its_record(lms, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "the movie"}\n{"text": "what a"}\n')
    out = tmp_path / "out"
    code, err = _main(capsys, "fisher", "--model", lms["llama"], "--data", "generated", "--examples", 6,
                      "--max-length", 5, "--prompts", prompts, "--seed", 3, "--batch-size", 4, "--out", out, "--quiet")
    assert code == 0, err
    fisher, meta = _read_fisher(out)
    assert meta["estimator"] == "generated" and meta["num_examples"] == meta["examples"] == 6
    assert meta["max_length"] == 5 and meta["seed"] == 3 and meta["kind"] == "causal-lm"
    assert meta["prompts"] == str(prompts) and meta["num_prompts"] == 2 and meta["num_processes"] == 1
    from gradmatch.checkpoints import FINGERPRINT_PREFIX

    assert meta["model_fingerprint"].startswith("sha256:") and meta["weights_fingerprint"].startswith(FINGERPRINT_PREFIX)
    assert meta["quantity"] == "mean over sampled sequences of squared per-sequence gradients of log p(new tokens | prompt)"
    assert set(meta) >= {"model", "gradmatch_version", "num_tokens"}
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(out / "hessian")
    assert loaded.get_output_embeddings().weight.abs().sum() > 0
    assert sum(float(v.sum()) for v in fisher.values()) > 0 and all((v >= 0).all() for v in fisher.values())


def test_a_local_folder_named_generated_is_read_as_data(lms, tmp_path, capsys, monkeypatch):
    from conftest import LM_CORPUS, write_jsonl

    write_jsonl(tmp_path / "generated" / "train.jsonl", [{"text": t} for t, _ in LM_CORPUS[:4]])
    monkeypatch.chdir(tmp_path)
    code, err = _main(capsys, "fisher", "--model", lms["gpt2"], "--data", "./generated", "--split", "train",
                      "--out", "out", "--quiet")
    assert code == 0, err
    meta = json.loads((tmp_path / "out" / "hessian" / "fisher.json").read_text())
    assert meta["estimator"] == "sampled" and meta["dataset"] == "./generated" and meta["num_examples"] == 4


def _bad_cases(lms, tiny_bert, tmp: Path) -> dict[str, tuple[list, str]]:
    empty = tmp / "empty.txt"
    empty.write_text("\n  \n")
    long = _prompts_file(tmp / "long.txt", ["the movie was great " * 10])
    gen = ["--data", "generated", "--examples", "4", "--max-length", "4"]
    return {
        "a classifier": (["--model", tiny_bert, *gen],
                         f"--data generated samples sequences from a causal language model; {tiny_bert} is a "
                         "text-classification model"),
        "--split": (["--model", lms["gpt2"], *gen, "--split", "train"], "--split does not apply to --data generated"),
        "--estimator": (["--model", lms["gpt2"], *gen, "--estimator", "sampled"],
                        "--estimator does not apply to --data generated"),
        "--filter and --max-examples": (["--model", lms["gpt2"], *gen, "--filter", "label=0", "--max-examples", "3"],
                                        "--filter, --max-examples do not apply to --data generated"),
        "no --examples": (["--model", lms["gpt2"], "--data", "generated"], "--data generated needs --examples N"),
        "--examples 0": (["--model", lms["gpt2"], "--data", "generated", "--examples", "0"],
                         "--examples must be at least 1 (got 0)"),
        "--max-length 0": (["--model", lms["gpt2"], "--data", "generated", "--examples", "2", "--max-length", "0"],
                           "--max-length must be at least 1 (got 0)"),
        "an empty prompts file": (["--model", lms["gpt2"], *gen, "--prompts", empty], "holds no prompts"),
        "a missing prompts file": (["--model", lms["gpt2"], *gen, "--prompts", tmp / "none.txt"],
                                   "none.txt does not exist"),
        "past GPT-2's positions": (["--model", lms["gpt2"], "--data", "generated", "--examples", "2",
                                    "--max-length", "64"],
                                   "more than the 64 of model .* lower --max-length to at most 63"),
        "a prompt past GPT-2's positions": (["--model", lms["gpt2"], *gen, "--prompts", long],
                                            r"prompt 1 of 1 has \d+ tokens, .* shorten the prompts"),
        "--examples with a data set": (["--model", lms["gpt2"], "--data", tmp, "--split", "train", "--examples", "3"],
                                       "--examples applies to --data generated only"),
    }


@pytest.mark.parametrize("case", ["a classifier", "--split", "--estimator", "--filter and --max-examples",
                                  "no --examples", "--examples 0", "--max-length 0", "an empty prompts file",
                                  "a missing prompts file", "past GPT-2's positions",
                                  "a prompt past GPT-2's positions", "--examples with a data set"])
def test_bad_inputs_give_one_line_exit_2_and_write_nothing(lms, tiny_bert, tmp_path, capsys, case):
    import re

    args, pattern = _bad_cases(lms, tiny_bert, tmp_path)[case]
    out = tmp_path / "out"
    code, err = _main(capsys, "fisher", *args, "--out", out, "--quiet")
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("gradmatch: error: "), err
    assert re.search(pattern, err[0]) or pattern in err[0], err[0]
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".gradmatch-")]


def test_a_classifier_is_refused_by_the_library_too(tiny_bert, tmp_path):
    from gradmatch.fisher.generated import run_generated_fisher

    with pytest.raises(UserError, match="is a text-classification model"):
        run_generated_fisher(str(tiny_bert), out=tmp_path / "f", examples=2, max_length=2)
    assert not (tmp_path / "f").exists()


# --------------------------------------------------------------------------- torchrun


def _env():
    return dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")


@pytest.mark.slow
def test_two_processes_give_the_one_process_result(lms, tmp_path):
    prompts = _prompts_file(tmp_path / "p.txt", ["the movie", "a dull and boring film", "what"])
    common = ["fisher", "--model", lms["llama"], "--data", "generated", "--examples", "9", "--max-length", "6",
              "--prompts", prompts, "--batch-size", "2", "--seed", "4", "--quiet"]
    one = subprocess.run([sys.executable, "-m", "gradmatch", *map(str, common), "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, env=_env(), timeout=300)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "gradmatch", *map(str, common), "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, env=_env(), timeout=300)
    assert two.returncode == 0, two.stderr
    f1, meta1 = _read_fisher(tmp_path / "one")
    f2, meta2 = _read_fisher(tmp_path / "two")
    assert meta1["num_examples"] == meta2["num_examples"] == 9 and meta1["num_tokens"] == meta2["num_tokens"]
    assert meta2["num_processes"] == 2 and meta1["model_fingerprint"] == meta2["model_fingerprint"]
    assert f1.keys() == f2.keys()
    scale = max(float(v.abs().max()) for v in f1.values())
    for k in f1:
        torch.testing.assert_close(f2[k], f1[k], rtol=1e-5, atol=1e-7 * scale, msg=k)
    assert sum(float(v.sum()) for v in f1.values()) > 0
