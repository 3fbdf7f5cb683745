"""Text classifiers (``AutoModelForSequenceClassification``: BERT, RoBERTa, MiniLM, ...): tokens in, labels out."""

from __future__ import annotations

from pathlib import Path

from gradmatch.errors import UserError
from gradmatch.kinds._classifier import ClassifierKind

#: Files of a folder that hold a tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json")


def load_tokenizer(source: str, name: str):
    """The tokenizer of model ``name`` from ``source``; a clear error when the folder has none or it is empty."""
    from transformers import AutoTokenizer

    folder = Path(source)
    if folder.is_dir() and not any((folder / f).exists() for f in TOKENIZER_FILES) and not list(folder.glob("*.model")):
        raise UserError(f"model {name} has no usable tokenizer: {folder} holds no tokenizer files")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except Exception as exc:  # noqa: BLE001 - missing files, malformed JSON, unknown tokenizer class
        raise UserError(f"model {name} has no usable tokenizer: {' '.join(str(exc).split())[:200]}") from exc
    if len(tokenizer) <= len(tokenizer.all_special_tokens):
        raise UserError(f"model {name} has no usable tokenizer: its vocabulary is empty")
    return tokenizer


def tokenize(dataset, tokenizer, max_length: int, desc: str, labels: bool = True):
    """``input_ids``/``attention_mask``[/``token_type_ids``] (truncated to ``max_length``, unpadded) and ``labels``."""
    def encode(batch):
        out = dict(tokenizer(batch["text"], truncation=True, max_length=max_length))
        if labels:
            out["labels"] = batch["label"]
        return out

    return dataset.map(encode, batched=True, remove_columns=dataset.column_names, desc=desc)


class TextClassification(ClassifierKind):
    name = "text-classification"
    example_column = "text"
    priority = 90  # the fallback: an encoder without a head (BertModel) is fine-tuned as a text classifier

    @classmethod
    def claims(cls, config) -> bool:
        archs = getattr(config, "architectures", None) or []
        return any(a.endswith("ForSequenceClassification") for a in archs)

    def auto_class(self):
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification

    def load_processor(self, source, config, name, *, from_scratch):
        if source is None:
            raise UserError(f"model {name} has no tokenizer")
        return load_tokenizer(source, name)

    def lora_settings(self):
        from peft import TaskType

        return {"task_type": TaskType.SEQ_CLS}

    def encode(self, dataset, processor, max_length, *, desc=None):
        from transformers import PreTrainedTokenizerBase

        if not isinstance(processor, PreTrainedTokenizerBase):
            raise UserError("a text data set needs a text model (got an image processor)")
        return tokenize(dataset, processor, max_length, desc or "tokenizing")

    def collator(self, processor):
        from transformers import DataCollatorWithPadding

        return DataCollatorWithPadding(processor)


KIND = TextClassification()
