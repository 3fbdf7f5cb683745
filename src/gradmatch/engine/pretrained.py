"""A pretrained base under fine-tuned children of another architecture (a ``BertModel`` under
``BertForSequenceClassification`` children): the children's names on the base's tensors, and their heads."""

from __future__ import annotations

import logging
from typing import Any

import torch

from gradmatch.checkpoints import HEAD_INIT, Checkpoint, TensorView, match_names
from gradmatch.errors import UserError

log = logging.getLogger("gradmatch.merge")


# --------------------------------------------------------------------------- a pretrained base

#: Config keys of a classification head: a pretrained body has none (or generic ones) where its children have theirs.
HEAD_CONFIG_KEYS = ("id2label", "label2id", "num_labels")


def is_pretrained_base(base: Checkpoint, child: Checkpoint) -> bool:
    """The base is its children's pretrained body: the same model type in another architecture (a ``BertModel``
    or ``BertForMaskedLM`` under ``BertForSequenceClassification`` children, a causal LM under classifiers)."""
    mine, theirs = base.config or {}, child.config or {}
    if mine.get("model_type") is not None and theirs.get("model_type") is not None \
            and mine["model_type"] != theirs["model_type"]:
        raise UserError(f"{child.role} {child.folder} has model_type {theirs['model_type']} but the base model "
                        f"{base.folder} has {mine['model_type']}: a merge needs children fine-tuned from the base")
    archs, child_archs = mine.get("architectures"), theirs.get("architectures")
    return bool(archs and child_archs and archs != child_archs)


def pretrained_base(base: Checkpoint, children: list[Checkpoint],
                     removed: list[int] = ()) -> tuple[TensorView, TensorView, dict[str, Any]]:
    """The parent θ_0 and the output's tensors when the base is the children's pretrained body.

    The body is matched by name (:func:`gradmatch.checkpoints.match_names`: the same names or one prefix
    apart). The children's tensors the base lacks (their head) are merged by the method relative to their
    common initialisation when every child recorded the same one (``head_init/``, written by ``gradmatch
    train``); otherwise they are averaged, with a line saying so — refused when a child is removed (``removed``:
    the indices of negative weights), since an average would add its head. Base tensors the children lack (a
    masked-LM or LM head) are not used. Returns (parent, output, a record of the rule for merge.json)."""
    first = children[0]
    for child in children[1:]:
        differ = sorted(set(child.tensors) ^ set(first.tensors))
        if differ:
            raise UserError(f"{child.role} {child.folder} and models[0] {first.folder} hold different tensors (e.g. "
                            f"{differ[0]!r}): children of one base must share their architecture")
    body = match_names(first.tensors, base.tensors)
    if not body:
        raise UserError(f"the base model {base.folder} shares no tensor with models[0] {first.folder}, not even "
                        "up to a prefix such as 'bert.': is it their parent?")
    heads = [name for name in first.tensors if name not in body]
    unused = [name for name in base.tensors if name not in set(body.values())]
    renamed = next((f"{there} as {name}" for name, there in body.items() if name != there), None)
    log.info("the base model %s (%s) is the pretrained body of the children (%s): %d tensors matched by name%s; "
             "the children's head: %s%s", base.folder, ", ".join(base.config.get("architectures") or []),
             ", ".join(first.config.get("architectures") or []), len(body), f" (e.g. {renamed})" if renamed else "",
             ", ".join(heads) or "none", f"; base tensors not used: {', '.join(unused[:4])}{' …' if len(unused) > 4 else ''}"
             if unused else "")
    sources: list[tuple[Any, dict[str, str]]] = [(base, body)]
    record: dict[str, Any] = {"architecture": base.config.get("architectures"), "matched_tensors": len(body),
                              "example_renaming": renamed, "head": heads, "unused_base_tensors": unused}
    if heads:
        inits, why = _common_head_init(children, heads)
        if inits is not None:
            sources.append((inits, {name: name for name in heads}))
            record["head_rule"] = f"merged by the method relative to the common initialisation in {HEAD_INIT}/"
            log.info("the children's head (%s) is merged relative to their common initialisation (%s/)",
                     ", ".join(heads), HEAD_INIT)
        elif removed:  # an average takes every child's head with weight 1/T, the removed one's too
            raise UserError(f"models[{removed[0]}] has a negative weight (removal), but the base model {base.folder} has "
                            f"no {heads[0]} and the children share no recorded initialisation of it ({HEAD_INIT}/: "
                            f"{why}), so it could only be averaged, which would add the removed child's instead of "
                            "removing it: use a base with that tensor, or children trained from this base by gradmatch "
                            "train with one seed")
        else:
            record["head_rule"] = f"averaged: {why}"
            log.warning("the base model has no %s: the merge takes the children's plain average of it, because %s",
                        ", ".join(heads), why)
    parent = TensorView(sources, "base model")
    output = TensorView(sources + [(first, {name: name for name in heads})], "base model")
    return parent, output, record


def _common_head_init(children: list[Checkpoint], heads: list[str]) -> tuple[Checkpoint | None, str]:
    """The recorded initialisation of the head tensors, when every child has the same one; else why not."""
    inits = []
    for child in children:
        folder = child.folder / HEAD_INIT
        if not folder.is_dir():
            return None, (f"{child.role} {child.folder} recorded no initialisation of its head ({HEAD_INIT}/, which "
                          "gradmatch train writes)")
        init = Checkpoint(folder, f"{child.role} head initialisation")
        missing = [name for name in heads if name not in init]
        if missing:
            return None, f"{folder} lacks {missing[0]!r}"
        inits.append(init)
    for name in heads:
        first = inits[0].read(name)
        for init in inits[1:]:
            if not torch.equal(first, init.read(name)):
                return None, (f"the children's heads start from different initialisations ({name!r} differs between "
                              f"{inits[0].folder} and {init.folder}: train every child with the same seed)")
    for init in inits[1:]:
        init.close()
    return inits[0], ""
