"""Pydantic schemas of every file a user writes: merge, train/evaluate, Fisher and experiment configs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gradmatch.errors import UserError


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a JSON or YAML mapping (by extension; YAML otherwise), failing with one clear line."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"config file {path} does not exist")
    if path.is_dir():
        raise UserError(f"config file {path} is a folder")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read config file {path}: {exc}") from exc
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:  # json.JSONDecodeError, yaml.YAMLError
        detail = " ".join(str(exc).split())
        raise UserError(f"config file {path} is not valid {'JSON' if path.suffix.lower() == '.json' else 'YAML'}: {detail}") from exc
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of keys to values, not {type(data).__name__}")
    return data


def validation_message(exc, source: str | Path) -> str:
    """One line from a pydantic ValidationError: the first problem, its key path and the file."""
    errors = exc.errors()
    first = errors[0]
    loc = ".".join(str(part) for part in first.get("loc", ())) or "(top level)"
    msg = first.get("msg", "invalid value")
    if first.get("type") == "extra_forbidden":
        msg = "unknown key"
    more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    return f"{source}: {loc}: {msg}{more}"


# =========================================================================== merge configs
# (owned by the merge engine: MergeConfig and friends)


# =========================================================================== train / evaluate configs
# (owned by train.py / evaluate.py: TrainConfig, EvaluateConfig)


# =========================================================================== experiment configs
# (owned by the pipeline: ExperimentConfig)
