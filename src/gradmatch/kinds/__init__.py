"""Kinds of model — text classifier, image classifier, causal language model — one file each, found by the registry.

A fourth kind (seq2seq, say) is one new file here defining a subclass of :class:`~gradmatch.kinds.base.Kind`
named ``KIND``; train, evaluate, fisher, mismatch and the pipeline ask :func:`gradmatch.models.kind_of` and
never branch on it.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache

from gradmatch.errors import UserError
from gradmatch.kinds.base import Kind

__all__ = ["Kind", "get_kind", "kind_names", "kind_of_config", "registry"]


@cache
def registry() -> dict[str, Kind]:
    """Every kind of this package by name, in the order they are asked to claim a config."""
    kinds = []
    for info in pkgutil.iter_modules(__path__):
        if info.name == "base" or info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        kind = getattr(module, "KIND", None)
        if not isinstance(kind, Kind):
            raise TypeError(f"{module.__file__} defines no KIND = <a Kind instance>")
        kinds.append(kind)
    return {k.name: k for k in sorted(kinds, key=lambda k: (k.priority, k.name))}


def kind_names() -> tuple[str, ...]:
    return tuple(registry())


def get_kind(name: str) -> Kind:
    try:
        return registry()[name]
    except KeyError:
        raise UserError(f"unknown kind of model {name!r} (choose from {', '.join(registry())})") from None


def kind_of_config(config) -> Kind:
    """The kind a Hugging Face config belongs to (the first kind that claims it; the last kind is the fallback)."""
    kinds = list(registry().values())
    for kind in kinds[:-1]:
        if kind.claims(config):
            return kind
    return kinds[-1]
