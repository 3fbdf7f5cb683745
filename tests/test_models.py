"""Model loading: aliases, classification heads of the right size, dropout, from-scratch ViT."""

from __future__ import annotations

import json

import pytest
import torch

from gradmatch import UserError
from gradmatch.models import kind_of, load_model


def test_new_head_of_the_right_size(tiny_bert):
    model, tok = load_model(tiny_bert, num_labels=3, seed=0)
    assert model.classifier.out_features == 3 and model.config.num_labels == 3
    same, _ = load_model(tiny_bert)
    from safetensors.torch import load_file

    saved = load_file(str(tiny_bert / "model.safetensors"))
    torch.testing.assert_close(same.classifier.weight, saved["classifier.weight"])
    assert tok("hello")["input_ids"][0] == tok.cls_token_id


def test_minilm_gets_a_head_and_dropout_override(minilm_path):
    model, tok = load_model("minilm", num_labels=2, dropout=0.0, seed=0,
                                         id2label={0: "negative", 1: "positive"})
    assert type(model).__name__ == "BertForSequenceClassification"
    assert model.config.hidden_dropout_prob == 0.0 and model.config.attention_probs_dropout_prob == 0.0
    assert model.config.id2label == {0: "negative", 1: "positive"}
    assert kind_of("minilm").name == "text-classification"
    # the encoder weights are MiniLM's own
    from safetensors.torch import load_file

    saved = load_file(str(minilm_path / "model.safetensors"))
    key = next(k for k in saved if k.endswith("embeddings.word_embeddings.weight"))
    torch.testing.assert_close(model.bert.embeddings.word_embeddings.weight, saved[key])


def test_vit_digits_from_scratch_is_seeded(tmp_path):
    a, proc = load_model("vit-digits", seed=3)
    b, _ = load_model("vit-digits", seed=3)
    c, _ = load_model("vit-digits", seed=4)
    assert kind_of("vit-digits").name == "image-classification"
    assert a.config.image_size == 8 and a.config.num_channels == 1 and a.config.num_labels == 10
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["classifier.weight"], sc["classifier.weight"])
    assert list(proc.image_mean) == [0.5]
    # a config.json file builds that architecture from scratch, with a default image processor
    cfg = dict(a.config.to_dict(), hidden_size=32, intermediate_size=64)
    (tmp_path / "vit.json").write_text(json.dumps(cfg))
    small, proc2 = load_model(tmp_path / "vit.json", num_labels=10, seed=0)
    assert small.config.hidden_size == 32 and proc2.size == {"height": 8, "width": 8}


def test_bad_models(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_model(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        load_model(tmp_path / "empty")
    from conftest import make_tiny_bert

    make_tiny_bert(tmp_path / "notok", with_tokenizer=False)
    with pytest.raises(UserError, match="no usable tokenizer"):
        load_model(tmp_path / "notok")


def test_lora_adapter_folders_are_folded_into_full_weights(tmp_path):
    from peft import LoraConfig, TaskType, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    from conftest import make_tiny_bert
    from gradmatch.models import fold_lora_adapter

    base = make_tiny_bert(tmp_path / "base", num_labels=3)
    torch.manual_seed(0)
    peft_model = get_peft_model(AutoModelForSequenceClassification.from_pretrained(base),
                                LoraConfig(task_type=TaskType.SEQ_CLS, r=4, target_modules=["query", "value"]))
    for name, p in peft_model.named_parameters():  # stand-in for training: non-zero adapters and head
        if "lora_B" in name or "classifier" in name:
            torch.nn.init.normal_(p, std=0.1)
    peft_model.save_pretrained(tmp_path / "adapter")
    expected = peft_model.merge_and_unload().state_dict()

    assert kind_of(tmp_path / "adapter").name == "text-classification"
    model, tok = load_model(tmp_path / "adapter")
    assert model.config.num_labels == 3 and tok("a")["input_ids"][0] == tok.cls_token_id
    got = model.state_dict()
    for key in ("bert.encoder.layer.0.attention.self.query.weight", "classifier.weight"):
        torch.testing.assert_close(got[key], expected[key])
    out = fold_lora_adapter(tmp_path / "adapter", tmp_path / "full")
    saved = load_file(str(out / "model.safetensors"))
    assert set(saved) == set(load_file(str(base / "model.safetensors")))
    torch.testing.assert_close(saved["bert.encoder.layer.1.attention.self.value.weight"],
                               expected["bert.encoder.layer.1.attention.self.value.weight"])
    with pytest.raises(UserError, match="3-label head"):
        load_model(tmp_path / "adapter", num_labels=2)
