"""The merge methods and their registry: every file of this folder is one method, found by its name.

A new method is one new file here (see :mod:`gradmatch.methods.base`); the merge YAML schema, the
``--method`` choices, the experiment schema, the engine's input checks and the report ask this registry.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache

from gradmatch.methods.base import MergeMethod, MethodError, Parameters

__all__ = ["MergeMethod", "MethodError", "Parameters", "get_method", "method_names", "registry"]

#: Modules of this package that are not methods.
_NOT_METHODS = {"base"}


@cache
def registry() -> dict[str, MergeMethod]:
    """Every method of this package, by name (the file's name), in alphabetical order."""
    methods: dict[str, MergeMethod] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name in _NOT_METHODS or info.name.startswith("_") or info.ispkg:
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        method = getattr(module, "METHOD", None)
        if not isinstance(method, MergeMethod):
            raise TypeError(f"{module.__file__} defines no METHOD = MergeMethod(...)")
        method = MergeMethod(**{**method.__dict__, "name": info.name,
                                "summary": method.summary or (module.__doc__ or "").strip().splitlines()[0]})
        method.check()
        methods[info.name] = method
    return methods


def method_names() -> tuple[str, ...]:
    return tuple(registry())


def get_method(name: str) -> MergeMethod:
    """The registered method called ``name``; a ValueError naming the known ones otherwise."""
    try:
        return registry()[name]
    except KeyError:
        raise ValueError(f"unknown merge method {name!r} (known: {', '.join(registry())})") from None
