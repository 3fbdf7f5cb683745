"""Data: presets, local files and folders, hub ids, the digits image domains, `datasets` split syntax and
filters, as ``text`` or ``image`` columns with an optional ``label`` (how a split becomes model inputs is
the kind of model's business: :mod:`gradmatch.kinds`)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from gradmatch.errors import UserError

log = logging.getLogger(__name__)

#: Environment variable naming the local data root (``<root>/<preset>/<split>.jsonl``).
DATA_DIR_ENV = "GRADMATCH_DATA_DIR"

_LOCAL_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv"}


@dataclass(frozen=True)
class Preset:
    """A named data set: where it lives on the hub and how its columns become ``text``/``label``."""

    hub_id: str
    text_columns: tuple[str, ...] = ("text",)


#: The sentiment presets of the paper (all binary: 0 negative, 1 positive).
PRESETS: dict[str, Preset] = {
    "imdb": Preset("stanfordnlp/imdb"),
    "yelp_polarity": Preset("fancyzhx/yelp_polarity"),
    "rotten_tomatoes": Preset("cornell-movie-review-data/rotten_tomatoes"),
    "sst2": Preset("stanfordnlp/sst2", ("sentence",)),
    # Amazon text is title + " " + content, as in the paper.
    "amazon_polarity": Preset("fancyzhx/amazon_polarity", ("title", "content")),
}

#: Other names of presets (the original code's task names).
PRESET_ALIASES = {"yelp": "yelp_polarity", "amazon": "amazon_polarity"}


# --------------------------------------------------------------------------- digits domains

DIGITS_TRAIN_SIZE = 1200
DIGITS_TEST_SIZE = 597


def _digits_shift(x):
    import numpy as np

    out = np.zeros_like(x)
    out[:, :, 2:] = x[:, :, :-2]  # two pixels to the right, zeros enter on the left
    return out


#: The demo's image domains: scikit-learn's 8×8 handwritten digits as uint8 images, transformed.
DIGITS_DOMAINS: dict[str, Callable] = {
    "digits-original": lambda x: x,
    "digits-rot90": lambda x: __import__("numpy").rot90(x, k=1, axes=(1, 2)),
    "digits-inverted": lambda x: 255 - x,
    "digits-hflip": lambda x: x[:, :, ::-1],
    "digits-shift": _digits_shift,
}


def _digits_split(domain: str, split: str):
    """One split (``train`` or ``test``) of a digits domain as a Dataset of 8×8 grayscale images."""
    import datasets
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = digits.images.astype(np.float64)  # (1797, 8, 8), 0..16
    labels = digits.target.astype(np.int64)
    index = np.arange(len(labels))
    train_idx, test_idx = train_test_split(index, test_size=DIGITS_TEST_SIZE, random_state=0, stratify=labels)
    idx = {"train": train_idx, "test": test_idx}[split]
    original = np.clip(np.rint(images[idx] * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    pixels = DIGITS_DOMAINS[domain](original)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    return datasets.Dataset.from_dict(
        {"image": [Image.fromarray(np.ascontiguousarray(p), mode="L") for p in pixels], "label": labels[idx].tolist()},
        features=features,
    )


# --------------------------------------------------------------------------- sources


@dataclass
class _Source:
    """A data set whose splits can be loaded by name; ``label`` names it in messages."""

    label: str
    splits: dict[str, Callable[[], object]]  # split name -> loader returning a datasets.Dataset
    any_split: bool = False  # a single file or saved Dataset: every split name reads the same rows
    remote: bool = False  # the hub: which splits exist is known only by loading

    def load(self, split: str):
        if self.any_split:
            return next(iter(self.splits.values()))()
        if split not in self.splits:
            available = ", ".join(sorted(self.splits)) or "none"
            raise UserError(f"data set {self.label} has no split {split!r} (available: {available})")
        return self.splits[split]()


def _check_readable(path: Path) -> None:
    if not os.access(path, os.R_OK):
        raise UserError(f"cannot read data file {path}: permission denied")


def _read_local_file(path: Path, cache_dir: str | None = None):
    """Read one JSON Lines / JSON / CSV file as a Dataset (through `datasets`' own builders)."""
    import datasets

    _check_readable(path)
    if path.stat().st_size == 0:
        raise UserError(f"data file {path} is empty")
    from datasets.utils import logging as ds_logging

    builder = _LOCAL_SUFFIXES[path.suffix.lower()]
    verbosity = ds_logging.get_verbosity()
    ds_logging.set_verbosity(ds_logging.CRITICAL)  # a parse failure becomes our one-line error, not a log
    try:
        ds = datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=cache_dir)
    except Exception as exc:  # DatasetGenerationError, ArrowInvalid, UnicodeDecodeError, ...
        detail = " ".join(str(exc).split())[:300]
        cause = exc.__cause__
        if cause is not None:
            detail += ": " + " ".join(str(cause).split())[:300]
        raise UserError(f"cannot read data file {path}: {detail}") from exc
    finally:
        ds_logging.set_verbosity(verbosity)
    return ds


def _split_files(folder: Path) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for suffix in _LOCAL_SUFFIXES:
        for f in sorted(folder.glob(f"*{suffix}")):
            files.setdefault(f.name[: -len(suffix)], f)
    return files


def _is_saved_dataset(folder: Path) -> bool:
    return (folder / "state.json").is_file() or (folder / "dataset_dict.json").is_file()


def _load_from_disk(folder: Path):
    import datasets

    try:
        return datasets.load_from_disk(str(folder))
    except Exception as exc:
        raise UserError(f"cannot read saved data set {folder}: {' '.join(str(exc).split())[:300]}") from exc


def _local_source(path: Path, cache_dir: str | None, label: str | None = None) -> _Source:
    label = label or str(path)
    if path.is_file():
        if path.suffix.lower() not in _LOCAL_SUFFIXES:
            raise UserError(f"data file {path} is not JSON Lines, JSON or CSV (.jsonl, .json, .csv)")
        return _Source(label, {path.stem: lambda: _read_local_file(path, cache_dir)}, any_split=True)
    if not path.is_dir():
        raise UserError(f"data set {path} does not exist")
    if _is_saved_dataset(path):
        import datasets

        if (path / "dataset_dict.json").is_file():
            dd = _load_from_disk(path)
            return _Source(label, {name: (lambda n=name: dd[n]) for name in dd})
        loaded = _load_from_disk(path)
        assert isinstance(loaded, datasets.Dataset)
        return _Source(label, {"all": lambda: loaded}, any_split=True)
    files = _split_files(path)
    # A folder of saved splits (as written by `save_split`) also counts.
    for sub in sorted(p for p in path.iterdir() if p.is_dir() and _is_saved_dataset(p)):
        files.setdefault(sub.name, sub)
    if not files:
        raise UserError(f"data folder {path} holds no <split>.jsonl, .json or .csv files")
    splits = {
        name: (lambda f=f: _load_from_disk(f) if f.is_dir() else _read_local_file(f, cache_dir))
        for name, f in files.items()
    }
    return _Source(label, splits)


def _hub_source(hub_id: str, config_name: str | None, cache_dir: str | None, label: str | None = None,
                hint: str = "") -> _Source:
    import datasets

    label = label or hub_id

    def load(split: str):
        try:
            return datasets.load_dataset(hub_id, config_name, split=split, cache_dir=cache_dir)
        except ValueError as exc:
            if "split" in str(exc).lower():
                raise UserError(f"data set {label} has no split {split!r}: {' '.join(str(exc).split())[:200]}") from exc
            raise UserError(f"cannot load data set {label} from the hub: {' '.join(str(exc).split())[:300]}") from exc
        except Exception as exc:  # network, missing repository, offline mode
            raise UserError(f"cannot load data set {label} from the hub: {' '.join(str(exc).split())[:300]}{hint}") from exc

    class _HubSplits(dict):
        def __contains__(self, key):  # every name is tried on the hub
            return True

        def __getitem__(self, key):
            return lambda: load(key)

    return _Source(label, _HubSplits(), remote=True)


def resolve_preset(name: str) -> str | None:
    """The preset a data set name stands for, or None.

    Accepts the preset names, their aliases (``yelp``, ``amazon``) and the original code's loading
    scripts (``.../merging/datasets/imdb.py``): `datasets` no longer runs loading scripts, so such a
    path is read as the preset of the same name.
    """
    if name in PRESETS:
        return name
    if name in PRESET_ALIASES:
        return PRESET_ALIASES[name]
    if name.endswith(".py"):
        stem = Path(name).stem
        stem = PRESET_ALIASES.get(stem, stem)
        if stem in PRESETS:
            log.warning("data set %s: loading scripts are not run; reading the preset %r instead", name, stem)
            return stem
    return None


def data_root(data_dir: str | os.PathLike | None = None) -> Path | None:
    """The local data root: ``data_dir`` if given, else ``$GRADMATCH_DATA_DIR``, else None (the hub)."""
    root = data_dir if data_dir not in (None, "") else os.environ.get(DATA_DIR_ENV) or None
    return Path(root).expanduser() if root is not None else None


def _source(name: str, config_name: str | None, data_dir, cache_dir: str | None) -> tuple[_Source, str | None]:
    """The source for one data set name and the preset it is (for column mapping), if any."""
    if name in DIGITS_DOMAINS:
        return _Source(name, {s: (lambda s=s: _digits_split(name, s)) for s in ("train", "test")}), None
    preset = resolve_preset(name)
    if preset is not None:
        if config_name not in (None, "", "classification", "default", "plain_text"):
            log.warning("data set %s: dataset_config_name %r has no meaning for a preset; ignored", preset, config_name)
        root = data_root(data_dir)
        if root is not None:
            folder = root / preset
            if not folder.is_dir():
                raise UserError(f"data set {preset}: the data root {root} has no folder {preset}/")
            return _local_source(folder, cache_dir, label=f"{preset} ({folder})"), preset
        hint = f" (for a local copy give --data-dir or ${DATA_DIR_ENV}: <root>/{preset}/<split>.jsonl)"
        return _hub_source(PRESETS[preset].hub_id, None, cache_dir, label=preset, hint=hint), preset
    path = Path(name).expanduser()
    if path.exists():
        return _local_source(path, cache_dir), None
    looks_like_path = name.startswith((".", "/", "~")) or name.count("/") > 1 or Path(name).suffix.lower() in _LOCAL_SUFFIXES
    if looks_like_path:
        raise UserError(f"data set {name} does not exist")
    if "/" not in name:
        known = ", ".join(list(PRESETS) + list(DIGITS_DOMAINS))
        raise UserError(f"unknown data set {name!r}: not a preset ({known}), a local file or folder, or a hub id (owner/name)")
    return _hub_source(name, config_name, cache_dir), None


def check_split(name: str, split: str, *, config_name: str | None = None,
                data_dir: str | os.PathLike | None = None) -> str:
    """Check, without reading any rows, that data set ``name`` resolves and has the splits ``split`` names
    (locally: the folder and its split files exist). Returns where the rows would come from: a local path,
    or ``hub`` (not checked: offline, only loading can tell)."""
    if name in DIGITS_DOMAINS:
        return "scikit-learn"
    source, _ = _source(name, config_name, data_dir, None)
    if source.remote:
        return "hub"
    instruction = _read_instruction(split, source.label)
    for rel in instruction._relative_instructions:  # noqa: SLF001 - datasets' parsed form of the spec
        if not source.any_split and rel.splitname not in source.splits:
            available = ", ".join(sorted(source.splits)) or "none"
            raise UserError(f"data set {source.label} has no split {rel.splitname!r} (available: {available})")
    return source.label


# --------------------------------------------------------------------------- split syntax


def _read_instruction(spec: str, label: str):
    from datasets import ReadInstruction

    try:
        return ReadInstruction.from_spec(spec.strip())
    except (ValueError, AssertionError) as exc:
        raise UserError(f"data set {label}: invalid split {spec!r} ({' '.join(str(exc).split())})") from exc


def _apply_split(source: _Source, spec: str):
    """Load the splits named in ``spec`` and slice them exactly as `datasets` would.

    Unlike `datasets`, row bounds past the end of a split are an error here, not silently clipped.
    """
    import datasets

    instruction = _read_instruction(spec, source.label)
    relative = instruction._relative_instructions  # noqa: SLF001 - datasets' parsed form of the spec
    loaded: dict[str, datasets.Dataset] = {}
    for rel in relative:
        if rel.splitname not in loaded:
            loaded[rel.splitname] = source.load(rel.splitname)
    lengths = {name: len(ds) for name, ds in loaded.items()}
    for rel in relative:
        n = lengths[rel.splitname]
        if rel.unit == "abs":
            for bound in (rel.from_, rel.to):
                if bound is not None and abs(bound) > n:
                    raise UserError(
                        f"data set {source.label}: split {spec!r} is out of range: {rel.splitname} has {n} rows"
                    )
    try:
        absolutes = instruction.to_absolute(lengths)
    except (ValueError, AssertionError) as exc:
        raise UserError(f"data set {source.label}: invalid split {spec!r} ({' '.join(str(exc).split())})") from exc
    parts = []
    for absolute in absolutes:
        ds = loaded[absolute.splitname]
        if absolute.from_ == 0 and absolute.to == len(ds):
            parts.append(ds)
        else:
            parts.append(ds.select(range(absolute.from_, max(absolute.from_, absolute.to))))
    result = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    if len(result) == 0:
        raise UserError(f"data set {source.label}: split {spec!r} is empty")
    return result


# --------------------------------------------------------------------------- columns


def _standardise(ds, label: str, preset: str | None):
    """Keep ``text`` (str) or ``image`` plus ``label`` (int64) when there is one; map the presets' hub columns."""
    import datasets

    columns = set(ds.column_names)
    if preset is not None:
        wanted = PRESETS[preset].text_columns
        if "text" not in columns and all(c in columns for c in wanted):
            if len(wanted) == 1:
                ds = ds.rename_column(wanted[0], "text")
            else:
                ds = ds.map(lambda b: {"text": [" ".join(parts) for parts in zip(*(b[c] for c in wanted))]},
                            batched=True, desc=f"joining {' + '.join(wanted)}")
        columns = set(ds.column_names)
    if "labels" in columns and "label" not in columns:
        ds = ds.rename_column("labels", "label")
        columns = set(ds.column_names)
    if "image" in columns:
        keep = "image"
    elif "text" in columns:
        keep = "text"
    elif "sentence" in columns:
        ds = ds.rename_column("sentence", "text")
        keep = "text"
    else:
        raise UserError(f"data set {label} has neither a 'text' nor an 'image' column (columns: {', '.join(sorted(columns))})")
    has_label = "label" in columns
    ds = ds.select_columns([keep, "label"] if has_label else [keep])
    if keep == "text":
        if getattr(ds.features["text"], "dtype", None) not in ("string", "large_string", "null"):
            raise UserError(f"data set {label}: the 'text' column must hold strings, found {ds.features['text']}")
        missing = [i for i, t in enumerate(ds["text"]) if t is None]
        if missing:
            raise UserError(f"data set {label}: row {missing[0]} has no text (null; {len(missing)} row(s) in all)")
    if not has_label:
        return ds
    label_feature = ds.features["label"]
    if not isinstance(label_feature, datasets.ClassLabel):
        dtype = getattr(label_feature, "dtype", None)
        if dtype is None or not (str(dtype).startswith("int") or str(dtype).startswith("uint")):
            raise UserError(f"data set {label}: labels must be integers, found {label_feature}")
    if label_feature != datasets.Value("int64"):
        ds = ds.cast_column("label", datasets.Value("int64"))
    return ds


def _check_label_values(ds, label: str, num_labels: int | None = None) -> None:
    if "label" not in ds.column_names:
        return
    labels = ds["label"]
    if hasattr(labels, "to_pylist"):
        labels = labels.to_pylist()
    labels = list(labels)
    if any(v is None for v in labels):
        raise UserError(f"data set {label}: some labels are missing")
    low, high = min(labels), max(labels)
    if low < 0:
        raise UserError(f"data set {label}: label {low} is negative (unlabelled rows, e.g. a hidden test split?)")
    if num_labels is not None and high >= num_labels:
        raise UserError(f"data set {label}: label {high} is outside 0..{num_labels - 1} (the model has {num_labels} labels)")


# --------------------------------------------------------------------------- public API


def load_split(
    dataset_name: str,
    split: str,
    *,
    config_name: str | None = None,
    data_dir: str | os.PathLike | None = None,
    cache_dir: str | None = None,
    num_labels: int | None = None,
    filters: Mapping[str, object] | None = None,
):
    """Load one split of a data set as a ``datasets.Dataset`` with ``text`` or ``image`` and, when the data
    has one, ``label``.

    ``dataset_name`` is a preset (``imdb``, ``yelp_polarity``, ``rotten_tomatoes``, ``sst2``,
    ``amazon_polarity``), a digits domain (``digits-original``, ``digits-rot90``, ``digits-inverted``,
    ``digits-hflip``, ``digits-shift``), a local JSON Lines/CSV file, a folder of ``<split>.jsonl``
    files, a folder written by ``save_split``/``Dataset.save_to_disk``, or a hub id. ``split`` uses the
    syntax of `datasets` (``train``, ``train[:20%]``, ``test[100:600]``, ``train+validation``).

    Several data sets joined by ``;`` are concatenated (the multitask baseline); ``split`` (and
    ``config_name``) may then hold one value for all or one per data set, also joined by ``;``.
    Presets read ``<data_dir or $GRADMATCH_DATA_DIR>/<preset>/<split>.jsonl`` when a root is
    given, else the hub. Labels are checked (integers, not negative, below ``num_labels`` if given).
    ``filters`` keeps only the rows whose column holds the given value or one of the given values, e.g.
    ``{"label": 0}`` for the negative reviews of a sentiment set; it applies after the split is sliced.
    """
    with _quiet_datasets():
        ds = _load_split(dataset_name, split, config_name, data_dir, cache_dir, num_labels)
        return apply_filters(ds, filters, f"{dataset_name} ({split})") if filters else ds


def apply_filters(ds, filters: Mapping[str, object], label: str):
    """The rows of ``ds`` whose column ``c`` holds ``filters[c]`` (a value, or a list of allowed values)."""
    for column, wanted in filters.items():
        if column not in ds.column_names:
            raise UserError(f"data set {label}: cannot filter on {column!r}: it has only {', '.join(ds.column_names)}")
        allowed = set(wanted) if isinstance(wanted, (list, tuple, set)) else {wanted}
        ds = ds.filter(lambda batch, c=column: [v in allowed for v in batch[c]], batched=True,
                       desc=f"keeping {column} in {sorted(allowed, key=str)}")
    if len(ds) == 0:
        raise UserError(f"data set {label}: no row is left after the filter {dict(filters)}")
    return ds


class _quiet_datasets:
    """Silence `datasets`' own progress bars while reading and slicing (bars stay for real work)."""

    def __enter__(self):
        from datasets.utils import logging as ds_logging

        self._was_enabled = ds_logging.is_progress_bar_enabled()
        ds_logging.disable_progress_bar()
        return self

    def __exit__(self, *exc):
        from datasets.utils import logging as ds_logging

        if self._was_enabled:
            ds_logging.enable_progress_bar()
        return False


def _load_split(dataset_name, split, config_name, data_dir, cache_dir, num_labels):
    import datasets

    names = [n.strip() for n in str(dataset_name).split(";")]
    if not all(names):
        raise UserError(f"empty data set name in {dataset_name!r}")
    splits = _per_name(split, len(names), "split", dataset_name)
    configs = _per_name(config_name, len(names), "dataset_config_name", dataset_name)
    parts = []
    for name, spec, cfg in zip(names, splits, configs):
        source, preset = _source(name, cfg, data_dir, cache_dir)
        ds = _standardise(_apply_split(source, spec), source.label, preset)
        _check_label_values(ds, source.label, num_labels)
        parts.append(ds)
    if len(parts) == 1:
        return parts[0]
    if len({"image" in p.column_names for p in parts}) > 1:
        raise UserError(f"cannot join text and image data sets: {dataset_name}")
    if len({"label" in p.column_names for p in parts}) > 1:
        parts = [p.remove_columns("label") if "label" in p.column_names else p for p in parts]
    return datasets.concatenate_datasets(parts)


def _per_name(value, n: int, key: str, dataset_name: str) -> list:
    if value is None:
        return [None] * n
    values = [v.strip() for v in str(value).split(";")]
    if len(values) == 1:
        return values * n
    if len(values) != n:
        raise UserError(f"{key} {value!r} has {len(values)} parts but dataset_name {dataset_name!r} names {n} data sets")
    return values


def save_split(dataset, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Materialise a loaded split to ``path`` (``Dataset.save_to_disk``, atomically).

    ``load_split(path, <any split name>)`` then reads the same rows with no network.
    """
    from gradmatch.fsutil import atomic_dir, check_output_dir

    check_output_dir(path, overwrite)
    with atomic_dir(path, overwrite) as tmp:
        dataset.save_to_disk(str(tmp))
    return Path(path)
