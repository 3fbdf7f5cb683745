"""The files a user writes: reading JSON/YAML strictly, and one-line messages for invalid values.

The schemas live next to their owners in this package: ``merge`` (merge YAML), ``run`` (train and
evaluate configs), ``experiment`` (experiment YAML); ``fisher`` holds the Fisher estimator names.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator

from gradmatch.errors import UserError

#: A config file larger than this is refused before it is parsed.
MAX_CONFIG_BYTES = 4 << 20
#: YAML aliases may repeat a subtree; the expanded document may hold at most this many nodes.
MAX_CONFIG_NODES = 200_000
#: Seeds are numpy's (and transformers.set_seed's): 0 <= seed < SEED_LIMIT.
SEED_LIMIT = 2**32


def seed_problem(value: Any) -> str | None:
    """Why ``value`` cannot be a seed (None when it can): an integer from 0 to 2**32 - 1."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < SEED_LIMIT:
        return f"must be an integer from 0 to 2**32 - 1 ({SEED_LIMIT - 1}), got {value!r}"
    return None


def check_seed(value: Any, key: str = "seed") -> int:
    """``value`` as a seed, or a one-line UserError naming ``key`` (e.g. ``--seed``) and the range."""
    problem = seed_problem(value)
    if problem:
        raise UserError(f"{key} {problem}")
    return int(value)


def _seed(value: int) -> int:
    problem = seed_problem(value)
    if problem:
        raise ValueError(problem)
    return value


#: A seed field of a config: an int with 0 <= seed < 2**32 (numpy and transformers.set_seed refuse others).
Seed = Annotated[int, AfterValidator(_seed)]


def _duplicate_key_error(kind: str, path: Path, key: Any, line: int | None = None) -> UserError:
    where = f" (line {line})" if line else ""
    return UserError(f"config file {path} is not valid {kind}: key {key!r} is given twice{where}")


def _load_yaml(text: str, path: Path):
    """yaml.safe_load that refuses duplicate keys and alias bombs (documents expanding past MAX_CONFIG_NODES)."""
    import yaml

    class StrictLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                if isinstance(key, (str, int, float, bool)) or key is None:
                    if key in seen and key_node.tag != "tag:yaml.org,2002:merge":
                        raise _duplicate_key_error("YAML", path, key, key_node.start_mark.line + 1)
                    seen.add(key)
            return super().construct_mapping(node, deep=deep)

    loader = StrictLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        sizes: dict[int, int] = {}

        def expanded(n) -> int:  # nodes the document has once every alias is expanded
            if id(n) in sizes:
                return sizes[id(n)]
            sizes[id(n)] = 1  # a recursive alias counts once (safe_load builds a cycle; pydantic refuses it)
            children = n.value if isinstance(n.value, list) else []
            total = 1
            for child in children:
                total += sum(expanded(c) for c in child) if isinstance(child, tuple) else expanded(child)
                if total > MAX_CONFIG_NODES:
                    break
            sizes[id(n)] = total
            return total

        if expanded(node) > MAX_CONFIG_NODES:
            raise UserError(f"config file {path} expands to more than {MAX_CONFIG_NODES} values "
                            "(YAML aliases repeating a subtree?); refused")
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _load_json(text: str, path: Path):
    def pairs(items):
        out = {}
        for key, value in items:
            if key in out:
                raise _duplicate_key_error("JSON", path, key)
            out[key] = value
        return out

    return json.loads(text, object_pairs_hook=pairs)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a JSON or YAML mapping (by extension; YAML otherwise), failing with one clear line.

    Duplicate keys are refused (YAML and JSON would silently keep the last), and so are files larger
    than :data:`MAX_CONFIG_BYTES` or YAML whose aliases expand past :data:`MAX_CONFIG_NODES` values.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"config file {path} does not exist")
    if path.is_dir():
        raise UserError(f"config file {path} is a folder")
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise UserError(f"config file {path} is larger than {MAX_CONFIG_BYTES >> 20} MB; refused")
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read config file {path}: {exc}") from exc
    is_json = path.suffix.lower() == ".json"
    try:
        data = _load_json(text, path) if is_json else _load_yaml(text, path)
    except UserError:
        raise
    except Exception as exc:  # json.JSONDecodeError, yaml.YAMLError, RecursionError
        detail = " ".join(str(exc).split())
        raise UserError(f"config file {path} is not valid {'JSON' if is_json else 'YAML'}: {detail}") from exc
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of keys to values, not {type(data).__name__}")
    bad = [key for key in data if not isinstance(key, str)]
    if bad:
        raise UserError(f"config file {path}: key {bad[0]!r} is not a name (keys must be strings)")
    return data


def validation_message(exc, source: str | Path) -> str:
    """One line from a pydantic ValidationError: the first problem, its key path and the file."""
    errors = exc.errors()
    first = errors[0]
    loc = ".".join(str(part) for part in first.get("loc", ())) or "(top level)"
    msg = first.get("msg", "invalid value").replace("Value error, ", "")
    if first.get("type") == "extra_forbidden":
        msg = "unknown key"
    more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    return f"{source}: {loc}: {msg}{more}"


def validate(schema, data: dict[str, Any], source: str | Path):
    """``schema.model_validate(data)`` with a one-line UserError naming ``source`` on failure."""
    from pydantic import ValidationError

    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        raise UserError(validation_message(exc, source)) from None
    except RecursionError:
        raise UserError(f"{source}: the document is nested too deeply (or refers to itself)") from None
