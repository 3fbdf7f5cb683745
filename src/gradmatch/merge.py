"""The merge engine: validate the inputs, stream one tensor name (or block of rows) at a time through a
merge method, write the result atomically as a Hugging Face folder."""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gradmatch.checkpoints import (HEAD_INIT, Checkpoint, ConstantTensors, SafetensorsWriter, TensorSpec, TensorView,
                                  copy_non_weight_files, find_hessian_folder, match_names, parse_size)
from gradmatch.config.merge import OUT_DTYPES, PRIOR, MergeConfig, load_merge_config
from gradmatch.devices import parse_device
from gradmatch.errors import UserError
from gradmatch.fsutil import atomic_dir, check_output_dir
from gradmatch.methods import MergeMethod, MethodError, get_method, method_names
from gradmatch.prefetch import BlockInputs, BlockReader

__all__ = ["merge", "load_merge_config", "plan_merge", "MergePlan", "DEFAULT_BLOCK_ELEMENTS"]

log = logging.getLogger(__name__)

#: Elementwise methods read a large tensor in blocks of rows holding about this many entries per input.
#: 2^17 (64 rows of a 2048-wide LLM matrix): a 0.5B-parameter bf16 merge took 2.9 s (task arithmetic) and
#: 6.6 s (gradient matching) against 3.3 s and 7.8 s with 2^16 (fixed costs per block) and 2.5-3.9 s and
#: 7.6 s with 2^18 (blocks no longer fit the caches), best of 3-4 interleaved runs on the shared 2-core machine.
DEFAULT_BLOCK_ELEMENTS = 1 << 17
#: ``kernel="auto"`` uses a method's fused kernel (gradmatch.kernels) when the merge reads at least this many bytes:
#: loading numba and the compiled kernel costs about 0.5 s and 105 MB per process, which a MiniLM merge (0.9 GB at
#: T = 4, float32 inputs, 1.8 s) does not win back; at 0.5B parameters in bf16 (9.7 GB) the kernel halves the time.
KERNEL_MIN_BYTES = 2 << 30
#: The same on a GPU: per-block costs there are kernel launches and host-device synchronisations (the
#: finiteness checks), so blocks are 32x larger: 8 MB of bf16 per input (the pinned pool: 4 blocks per input).
GPU_BLOCK_ELEMENTS = 1 << 22
#: Entries copied from the parent whatever the method (as the original code did), besides non-floating ones.
_PARENT_ONLY = ("position_ids", "masked_bias")
_PRECISIONS = {"float32": torch.float32, "float64": torch.float64}
_OUT_DTYPES = {name: getattr(torch, name) for name in OUT_DTYPES}


# --------------------------------------------------------------------------- planning and validation


@dataclass
class MergePlan:
    """Everything a merge reads, validated: the checkpoints, α_t, the scales N, and which tensors to merge."""

    config: MergeConfig
    method: MergeMethod
    parent: Checkpoint
    children: list[Checkpoint]
    parent_hessian: Checkpoint | None
    hessians: list[Checkpoint | None]
    alphas: list[float]
    parent_scale: float | None
    scales: list[float] | None
    merged: list[str] = field(default_factory=list)  # tensors computed by the method; the rest come from the parent
    grams: list = field(default_factory=list)  # GramFile per child (RegMean), else empty
    scale_sources: dict[str, str] = field(default_factory=dict)  # where each N came from
    output: Checkpoint | TensorView | None = None  # the output's tensors (names, shapes, dtypes; the unmerged values)
    template: Path | None = None  # the folder whose config, tokenizer, ... the output copies
    averaged: list[str] = field(default_factory=list)  # head tensors without a common initialisation: their mean
    prior: float | None = None  # c of base_hessian: prior (H_0 = N_0·c·I)
    head: dict[str, Any] = field(default_factory=dict)  # a pretrained base: how its body and the head were matched

    def __post_init__(self):
        self.output = self.output or self.parent
        self.template = self.template or self.parent.folder

    @property
    def inputs(self) -> list[Checkpoint]:
        """The inputs read from disk (a prior's constant Hessian is none)."""
        return [c for c in [self.parent, self.parent_hessian, *self.children, *self.hessians]
                if c is not None and c.folder is not None]


def _local_model(name: str, role: str) -> Path:
    """A model folder from a path, an alias (``minilm``) or a Hugging Face hub id (downloaded when online)."""
    from gradmatch.models import resolve_model

    path = Path(name).expanduser()
    if path.is_dir() and (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        return path  # a LoRA adapter (no config.json): Checkpoint says how to turn it into a full model
    try:
        resolved = resolve_model(name)
    except UserError as exc:
        raise UserError(f"{role}: {exc}") from None
    path = Path(resolved)
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(resolved))
    except Exception as exc:  # offline, unknown repository, no network
        detail = " ".join(str(exc).split())[:200]
        raise UserError(f"{role} {name} does not exist locally and could not be fetched from the Hugging Face hub: {detail}") from None


def _local_hessian(name: str, role: str) -> Path:
    path = Path(name).expanduser()
    if not path.exists():
        raise UserError(f"{role} {name} does not exist")
    return find_hessian_folder(path)


def _training_size(folder: Path) -> int | None:
    """num_train_examples from a training output's training_metadata.json, if there is one."""
    meta = folder / "training_metadata.json"
    if not meta.is_file():
        return None
    try:
        value = json.loads(meta.read_text(encoding="utf-8"))["num_train_examples"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{meta} has no readable num_train_examples: {exc}") from None
    if not isinstance(value, int) or value <= 0:
        raise UserError(f"{meta}: num_train_examples must be a positive integer, got {value!r}")
    return value


def _scale(given: float | None, folder: Path, role: str, key: str, default: float | None) -> tuple[float, str]:
    """N for one model and where it came from: the config, else the method's default — the Hessian as stored
    (``default``: Fisher averaging, whatever the folder holds, as with the original flags) or the model's
    training_metadata.json (gradient matching)."""
    if given is not None:
        return float(given), "config"
    if default is not None:
        return default, "default (the Hessian as stored)"
    found = _training_size(folder)
    if found is not None:
        return float(found), "training_metadata.json"
    raise UserError(f"no Hessian scale for {role} {folder}: set {key} (normally its number of training "
                    "examples; it has no training_metadata.json to take it from)")


def _is_mergeable(name: str, dtype: torch.dtype) -> bool:
    return dtype.is_floating_point and not any(part in name for part in _PARENT_ONLY)


def _check_same_architecture(reference: Checkpoint, other: Checkpoint) -> None:
    if reference.config is None or other.config is None:
        return
    for key in ("model_type", "architectures"):
        mine, theirs = reference.config.get(key), other.config.get(key)
        if mine is not None and theirs is not None and mine != theirs:
            raise UserError(f"{other.role} {other.folder} has {key} {theirs} but {reference.role} {reference.folder} "
                            f"has {mine}")


#: Config keys that do not change what a model computes in eval mode (names, versions, dtypes, caching,
#: output flags, training-only dropout): a child may differ from its parent in them.
_NEUTRAL_CONFIG_KEYS = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "_commit_hash", "use_cache",
                        "output_hidden_states", "output_attentions", "return_dict", "gradient_checkpointing",
                        "problem_type", "finetuning_task", "tokenizer_class", "task_specific_params", "pruned_heads",
                        "use_return_dict", "torchscript", "architectures", "quantization_config", "label2id"}


def _check_same_function(reference: Checkpoint, child: Checkpoint, ignore: tuple[str, ...] = ()) -> None:
    """A child whose config would make the same weights compute something else (another activation, label order,
    number of heads, ...) than ``reference``'s is refused: its weights do not mean what the reference's mean.
    ``ignore``: keys of a head the reference (a pretrained body) does not have. A key only one of the two
    configs holds is the other's default, which only transformers knows (versions write different sets of keys:
    a child saved by transformers 5 spells out ``add_cross_attention: false``, which MiniLM's config omits), so
    it is not compared."""
    if reference.config is None or child.config is None or reference is child:
        return
    classifier = any(str(a).endswith("ForSequenceClassification")
                     for c in (reference.config, child.config) for a in (c.get("architectures") or []))
    for key in sorted(set(reference.config) & set(child.config)):
        if key in _NEUTRAL_CONFIG_KEYS or key in ignore or key.endswith(("dropout", "dropout_prob", "dropout_rate", "pdrop")):
            continue
        if key == "pad_token_id" and not classifier:  # a language model's logits do not depend on it (gradmatch
            continue  # train sets one for a causal LM that has none); a decoder classifier pools at the last non-pad
        mine, theirs = reference.config.get(key), child.config.get(key)
        if mine != theirs and not (key == "id2label" and _generic_labels(mine) and _generic_labels(theirs)):
            raise UserError(f"{child.role} {child.folder} has {key} {theirs!r} in its config.json but {reference.role} "
                            f"{reference.folder} has {mine!r}: its weights would compute something else "
                            "(--allow-config-mismatch merges it anyway)")


def _generic_labels(id2label) -> bool:
    """LABEL_0, LABEL_1, ... (transformers' names when none were given): no label order to disagree on."""
    return isinstance(id2label, dict) and all(str(v) == f"LABEL_{k}" for k, v in id2label.items())


def _check_owners(plan: MergePlan) -> None:
    """Each Hessian and Gram records (fisher.json, gram.json) a fingerprint of the model folder it was computed
    on; one that names another model than the one it is paired with is refused. Records without one (the
    original code's Hessians) pass with a note."""
    from gradmatch.checkpoints import folder_fingerprint, fingerprint_matches

    pairs = [(plan.parent_hessian, plan.parent, "base_hessian")] + [
        (h, c, f"hessian of models[{i}]") for i, (h, c) in enumerate(zip(plan.hessians, plan.children))]
    pairs += [(g, c, f"gram of models[{i}]") for i, (g, c) in enumerate(zip(plan.grams, plan.children))]
    computed: dict = {}
    for stats, model, role in pairs:
        if stats is None or stats.folder is None:  # none, or base_hessian: prior
            continue
        record_file = (stats.path.parent / "gram.json") if hasattr(stats, "path") else stats.folder / "fisher.json"
        recorded = (stats.record if hasattr(stats, "record") else _read_record(record_file)).get("weights_fingerprint")
        if not recorded:
            log.warning("note: %s %s has no weights_fingerprint in %s: cannot check that it belongs to %s",
                        role, stats.folder, record_file.name, model.folder)
            continue
        if not fingerprint_matches(model.folder, recorded, computed):
            raise UserError(f"{role} {stats.folder} was computed on another model than {model.folder} "
                            f"(its {record_file.name} names weights {recorded[:30]}…, the model's are "
                            f"{folder_fingerprint(model.folder)[:30]}…); --no-check-hessians merges anyway")


def _read_record(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None
    return value if isinstance(value, dict) else {}


def _check_tensors(ckpt: Checkpoint, parent: Checkpoint, merged: list[str], why_needed: str) -> None:
    """``ckpt`` holds no tensor the output (``parent``) lacks, and every merged tensor with the parent's shape."""
    for name in ckpt:
        if name not in parent:
            raise UserError(f"{ckpt.role} {ckpt.folder} has tensor {name!r} which the base model {parent.folder} lacks")
    for name in merged:
        if name not in ckpt:
            raise UserError(f"{ckpt.role} {ckpt.folder} lacks tensor {name!r} {why_needed}")
        info = ckpt.info(name)
        if info.shape != parent.info(name).shape:
            raise UserError(f"tensor {name!r} has shape {list(info.shape)} in {info.file} "
                            f"but {list(parent.info(name).shape)} in the base model {parent.info(name).file}")


def plan_merge(config: MergeConfig, *, check_inputs: bool = True, allow_config_mismatch: bool = False) -> MergePlan:
    """Open and validate every input (paths, headers, architectures, configs, key sets, shapes, scales, and that
    each Hessian and Gram was computed on the model it is paired with) before any work.

    A base of another architecture than its children (a pretrained ``BertModel`` under
    ``BertForSequenceClassification`` children) is their pretrained body: see :func:`_pretrained_base`."""
    method = get_method(config.method)
    base = Checkpoint(_local_model(config.base, "base model"), "base model")
    if base.config is None:
        raise UserError(f"base model {base.folder} is not a model folder: it has no config.json")
    children = [Checkpoint(_local_model(entry.model, f"models[{i}]"), f"models[{i}]")
                for i, entry in enumerate(config.models)]
    for ckpt in (base, *children):
        _check_not_quantized(ckpt)
    pretrained = _is_pretrained_base(base, children[0])
    for child in children:
        _check_same_architecture(children[0] if pretrained else base, child)
        if not allow_config_mismatch:  # against the parent, and against each other (label order, where the
            _check_same_function(base, child, ignore=_HEAD_CONFIG_KEYS if pretrained else ())  # parent has none)
            _check_same_function(children[0], child)
    if pretrained:
        parent, output, head = _pretrained_base(base, children, [i for i, w in enumerate(config.weights()) if w < 0])
    else:
        parent = output = base
        head = {}
    hessians: list[Checkpoint | None] = [None] * len(children)
    if method.uses_child_hessians:
        hessians = [Checkpoint(_local_hessian(e.hessian, f"hessian of models[{i}]"), f"hessian of models[{i}]")
                    for i, e in enumerate(config.models)]
    for h, child in zip(hessians, children):
        if h is not None:
            _check_same_architecture(child, h)

    merged = [name for name, info in output.tensors.items() if name in parent and _is_mergeable(name, info.dtype)]
    averaged = [name for name, info in output.tensors.items() if name not in parent and _is_mergeable(name, info.dtype)]
    for child in children:
        _check_tensors(child, output, merged + averaged, f"of the base model {base.folder}")
    for h in hessians:
        if h is not None:
            _check_hessian(h, output, merged, method.name)

    scales = parent_scale = None
    sources: dict[str, str] = {}
    # N_t: gradient matching needs the true training-set sizes; Fisher averaging uses the Fisher as stored.
    default = 1.0 if method.hessian_scale == "one" else None
    if method.uses_child_hessians:
        found = [_scale(e.hessian_scale, c.folder, f"models[{i}]", f"models[{i}].hessian_scale", default)
                 for i, (e, c) in enumerate(zip(config.models, children))]
        scales = [value for value, _ in found]
        sources.update({f"models[{i}]": source for i, (_, source) in enumerate(found)})
    parent_hessian, prior = None, None
    if method.uses_parent_hessian and config.base_hessian == PRIOR:
        if scales is None:
            raise UserError(f"base_hessian: {PRIOR} sets its level from the children's Hessians, which "
                            f"{method.name} does not read")
        prior = _prior_level(hessians, merged)
        parent_hessian = ConstantTensors({n: parent.info(n).shape for n in merged}, prior, f"base_hessian {PRIOR}")
        if config.base_hessian_scale is not None:
            parent_scale, sources["base"] = float(config.base_hessian_scale), "config"
        else:
            parent_scale, sources["base"] = sum(scales) / len(scales), f"default for {PRIOR}: the mean of the children's N_t"
        log.info("base_hessian: %s: H_0 = N_0·c·I with c = %.4g (the mean of the children's Hessian entries) and "
                 "N_0 = %g (%s)", PRIOR, prior, parent_scale, sources["base"])
    elif method.uses_parent_hessian:
        parent_hessian = Checkpoint(_local_hessian(config.base_hessian, "base_hessian"), "base_hessian")
        _check_same_architecture(base, parent_hessian)
        if pretrained:  # the base's Hessian under the children's names; zero (H_0 = δ) on the head tensors
            body = {n: parent.source_name(n) for n in merged if parent.source_name(n) in base}
            zero = ConstantTensors({n: parent.info(n).shape for n in merged if n not in body}, 0.0,
                                   "base_hessian (zero on the head)")
            parent_hessian = TensorView([(parent_hessian, body), (zero, {n: n for n in zero.tensors})], "base_hessian")
        _check_hessian(parent_hessian, output, merged, method.name)
        parent_scale, sources["base"] = _scale(config.base_hessian_scale, base.folder, "the base model",
                                               "base_hessian_scale", default)
    grams = _plan_grams(config, output, merged) if method.uses_grams else []
    plan = MergePlan(config, method, parent, children, parent_hessian, hessians, config.weights(),
                     parent_scale, scales, merged, grams, sources, output=output,
                     template=children[0].folder if pretrained else base.folder, averaged=averaged, prior=prior,
                     head=head)
    if check_inputs:
        _check_owners(plan)
    return plan


def _check_not_quantized(ckpt: Checkpoint) -> None:
    """A quantized checkpoint (``quantization_config``: fp8 with scales, GPTQ, AWQ, bitsandbytes …) stores codes
    and scales, not its weights: merging the codes would be a silent wrong result."""
    quant = (ckpt.config or {}).get("quantization_config")
    if quant:
        how = quant.get("quant_method") if isinstance(quant, dict) else None
        raise UserError(f"{ckpt.role} {ckpt.folder} is a quantized checkpoint (quantization_config"
                        + (f": {how}" if how else "") + "): its stored values are codes and scales, not weights; "
                        "merge its dequantized weights (load it and save_pretrained in bfloat16)")


def _check_hessian(h: Checkpoint | TensorView, output, merged: list[str], method: str) -> None:
    _check_tensors(h, output, merged, f"(needed by {method})")
    for name in merged:
        info = h.info(name)
        if not info.is_floating:
            raise UserError(f"tensor {name!r} of {info.file} is {info.dtype}, not floating point as a Hessian must be")


# --------------------------------------------------------------------------- a pretrained base

#: Config keys of a classification head: a pretrained body has none (or generic ones) where its children have theirs.
_HEAD_CONFIG_KEYS = ("id2label", "label2id", "num_labels")


def _is_pretrained_base(base: Checkpoint, child: Checkpoint) -> bool:
    """The base is its children's pretrained body: the same model type in another architecture (a ``BertModel``
    or ``BertForMaskedLM`` under ``BertForSequenceClassification`` children, a causal LM under classifiers)."""
    mine, theirs = base.config or {}, child.config or {}
    if mine.get("model_type") is not None and theirs.get("model_type") is not None \
            and mine["model_type"] != theirs["model_type"]:
        raise UserError(f"{child.role} {child.folder} has model_type {theirs['model_type']} but the base model "
                        f"{base.folder} has {mine['model_type']}: a merge needs children fine-tuned from the base")
    archs, child_archs = mine.get("architectures"), theirs.get("architectures")
    return bool(archs and child_archs and archs != child_archs)


def _pretrained_base(base: Checkpoint, children: list[Checkpoint],
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


def _prior_level(hessians: list[Checkpoint | None], merged: list[str]) -> float:
    """c of ``base_hessian: prior``: the mean of the children's Hessian entries over the merged tensors (each
    child's mean, averaged), so that N_0·c is on the scale of an average task's N_t·F_t when N_0 is a
    typical N_t. Read once, block by block, in float64."""
    means = []
    for h in hessians:
        total, count = 0.0, 0
        for name in merged:
            info = h.info(name)
            if not info.numel:
                continue
            step = max(1, DEFAULT_BLOCK_ELEMENTS // max(1, info.numel // max(1, info.shape[0]))) if info.shape else 1
            for start in range(0, info.shape[0] if info.shape else 1, step):
                rows = slice(start, min(start + step, info.shape[0])) if info.shape else None
                total += float(h.read(name, rows).sum(dtype=torch.float64))
            count += info.numel
        means.append(total / max(1, count))
    level = sum(means) / len(means)
    if not (math.isfinite(level) and level > 0):
        raise UserError(f"base_hessian: {PRIOR} takes its level from the children's Hessians, whose mean is {level}: "
                        "set base_hessian to a Hessian folder, or give the prior's precision as parameters.delta_0")
    return level


def _plan_grams(config: MergeConfig, parent: Checkpoint, merged: list[str]) -> list:
    """Every child's Gram matrices: the same layers for each, each a merged 2-D weight of the parent with a
    Gram of its input size."""
    from gradmatch.gram import GramFile

    grams = [GramFile(e.gram, f"gram of models[{i}]") for i, e in enumerate(config.models)]
    layers = set(grams[0].tensors)
    merged_set = set(merged)
    for g in grams:
        if set(g.tensors) != layers:
            other = sorted(set(g.tensors) ^ layers)[0]
            raise UserError(f"{g.role} {g.path} and {grams[0].role} {grams[0].path} differ in their layers "
                            f"(e.g. {other}): compute every child's Gram with the same model architecture")
        for name, info in g.tensors.items():
            if name not in merged_set:
                raise UserError(f"{g.role} {g.path} has a Gram for {name}, which is not a merged tensor of the base "
                                f"model {parent.folder} (the Gram of another model?)")
            shape = parent.info(name).shape
            if len(shape) != 2 or info.shape[0] != shape[1]:
                raise UserError(f"{g.role} {g.path}: the Gram of {name} is {info.shape[0]} × {info.shape[0]} but the "
                                f"weight's input size is {shape[-1]} (the Gram of another model?)")
    _check_gram_coverage(grams, parent, merged_set)
    return grams


def _linear_weights(parent: Checkpoint) -> set[str] | None:
    """The checkpoint names of the base model's nn.Linear weights that get a Gram (not tied to an embedding), from
    its architecture built on the meta device; None when transformers cannot build it from its config.json."""
    from transformers import AutoConfig

    from gradmatch.gram import embedding_weights
    from gradmatch.kinds import kind_of_config
    from gradmatch.models import checkpoint_names

    try:
        config = AutoConfig.from_pretrained(parent.folder)
        with torch.device("meta"):
            skeleton = kind_of_config(config).auto_class().from_config(config)
        tied = embedding_weights(skeleton)
        names = [f"{name}.weight" for name, m in skeleton.named_modules()
                 if isinstance(m, torch.nn.Linear) and id(m.weight) not in tied]
        return set(checkpoint_names(skeleton, names).values())
    except Exception:  # noqa: BLE001 - an architecture transformers does not know: the Grams' own records decide
        return None


def _check_gram_coverage(grams: list, parent: Checkpoint, merged: set[str]) -> None:
    """RegMean needs a Gram for every Linear layer it merges: the layers the base model's architecture has and
    those each Gram's record lists (gram.json ``positions``, a layer that saw no input included). A layer without
    one would be averaged while the merge is called regmean; an empty Gram file merges nothing by RegMean."""
    for g in grams:
        if not g.tensors:
            raise UserError(f"{g.role} {g.path} holds no Gram matrices: RegMean would average every tensor "
                            "(compute it with gradmatch gram on this child)")
    linear = _linear_weights(parent) or set()
    for g in grams:
        recorded = g.record.get("positions") if isinstance(g.record.get("positions"), dict) else {}
        linear |= set(recorded)
    for g in grams:
        missing = sorted((linear & merged) - set(g.tensors))
        if missing:
            recorded = g.record.get("positions") if isinstance(g.record.get("positions"), dict) else {}
            why = (" (it saw no input: 0 positions in gram.json)" if recorded.get(missing[0]) == 0 else "")
            raise UserError(f"{g.role} {g.path} has no Gram for {len(missing)} Linear layer"
                            f"{'s' if len(missing) > 1 else ''} of the base model (e.g. {missing[0]}{why}): RegMean "
                            "would average it silently; compute the Grams with gradmatch gram on data that reaches "
                            "every layer")


def _check_output_not_input(out: Path, plan: MergePlan) -> None:
    """Refuse an output that is, contains or lies inside an input folder (one line naming both)."""
    from gradmatch.fsutil import check_not_input

    check_not_input(out, {f"the input {ckpt.role}": ckpt.folder for ckpt in plan.inputs}, "output")


# --------------------------------------------------------------------------- execution


def _tensor_seed(seed: int, name: str) -> int:
    """A per-tensor seed that does not depend on the order tensors are processed in."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


def _where(name: str, rows: slice | None) -> str:
    return f"tensor {name!r}" + (f" (rows {rows.start}:{rows.stop})" if rows is not None else "")


def _finite(tensor: torch.Tensor) -> bool:
    """No NaN or Inf in ``tensor``: min and max propagate NaN, and are much faster than isfinite().all().
    One aminmax pass: 10x faster than min() and max() on a 2^16-entry block here (53 vs 527 µs)."""
    if not tensor.numel():
        return True
    lo, hi = torch.aminmax(tensor)
    return math.isfinite(float(lo)) and math.isfinite(float(hi))


class _Executor:
    """Computes one output tensor at a time from a validated plan; sums the method's statistics per tensor."""

    def __init__(self, plan: MergePlan, params: dict[str, Any], device: torch.device, compute: torch.dtype,
                 block_rows: int | None, threads: int | None = 1, kernel: str = "reference"):
        self.plan, self.device, self.compute, self.block_rows = plan, device, compute, block_rows
        self.method = plan.method
        self.fused = plan.method.fused if kernel == "fused" else None  # None: the reference formula computes
        self.threads = threads or torch.get_num_threads()
        self.params = params
        self.call_params = self.method.call_parameters(params)
        self.stats: dict[str, dict[str, int]] = {}  # statistic -> tensor name -> count
        self._cache_name: str | None = None
        self._cache: dict[str, Any] = {}
        self.reader: BlockReader | None = None  # reads the next block's inputs ahead (see start_reader)
        self._ahead: BlockInputs | None = None  # the current block's inputs, read ahead
        self._buffers: dict[Any, np.ndarray] = {}  # the fused path's reused block buffers, per input and output
        self.computed = {"fused": 0, "reference": 0}  # blocks of merged tensors each path computed
        self.fallbacks: dict[str, int] = {}  # tensor -> its blocks the reference computed though the kernel was chosen

    def _buffer(self, key: Any, nbytes: int) -> np.ndarray:
        """A flat byte array of at least ``nbytes``, reused for ``key``'s next blocks (a fresh one per block costs
        page faults): the fused path reads each input into its own and writes the output from one."""
        buffer = self._buffers.get(key)
        if buffer is None or buffer.shape[0] < nbytes:
            buffer = self._buffers[key] = np.empty(nbytes, np.uint8)
        return buffer

    def _stored(self, ckpt: Checkpoint, name: str, rows: slice | None) -> np.ndarray:
        """Block ``rows`` of tensor ``name`` of ``ckpt`` as stored, as the flat array of its bits a kernel
        reads (gradmatch.kernels.bits_dtype)."""
        from gradmatch import kernels

        bits = kernels.bits_dtype(ckpt.info(name).dtype)
        if self._ahead is not None:
            tensor = self.reader.to_device(self._ahead, ckpt, self.device, None)
            if tensor is not None:
                return kernels.bits(tensor)
        buffer = self._buffer(id(ckpt), _block_bytes(ckpt, name, rows))
        return buffer[: ckpt.read_into(name, rows, buffer)].view(bits)

    def _load(self, ckpt: Checkpoint, name: str, rows: slice | None, hessian: bool) -> torch.Tensor:
        tensor = None
        if self._ahead is not None:
            tensor = self.reader.to_device(self._ahead, ckpt, self.device, self.compute)
        if tensor is None:
            tensor = ckpt.read(name, rows).to(self.device, self.compute)
        self._loaded.append((ckpt, tensor))
        if hessian and tensor.numel() and float(torch.aminmax(tensor).min) < 0:  # NaN: caught as non-finite
            raise UserError(f"{_where(name, rows)} of {ckpt.info(name).file} has negative values (down to "
                            f"{float(tensor.min()):.3g}), which a Hessian (a Fisher: mean of squared gradients) cannot have")
        return tensor

    def _blame_non_finite(self, name: str, rows: slice | None) -> None:
        """Name the first input block holding NaN or Inf, if any."""
        for ckpt, tensor in self._loaded:
            if not _finite(tensor):
                raise UserError(f"{_where(name, rows)} of {ckpt.info(name).file} holds NaN or Inf values")

    def _inputs(self, name: str, rows: slice | None, stored: bool = False) -> dict[str, Any]:
        """The engine inputs the method takes (see gradmatch.methods.base.ENGINE_INPUTS), for one block
        (``stored``: the tensors as flat arrays of their stored bits, for a fused kernel)."""
        p, wanted = self.plan, self.method.inputs

        def load(ckpt: Checkpoint, hessian: bool):
            return self._stored(ckpt, name, rows) if stored else self._load(ckpt, name, rows, hessian)

        kwargs: dict[str, Any] = {"parent": load(p.parent, False), "children": [load(c, False) for c in p.children]}
        if "alphas" in wanted:
            kwargs["alphas"] = p.alphas
        if "weights" in wanted:
            kwargs["weights"] = p.alphas
        if "fishers" in wanted:
            kwargs["fishers"] = [load(h, True) for h in p.hessians]
            kwargs["scales"] = p.scales
        if "parent_fisher" in wanted:
            kwargs["parent_fisher"] = load(p.parent_hessian, True)
            kwargs["parent_scale"] = p.parent_scale
        if "generator" in wanted:
            kwargs["generator"] = torch.Generator().manual_seed(_tensor_seed(self.params["seed"], name))
        if self._cache_name != name:  # the per-tensor cache and the tensor's Grams, read once for all its blocks
            self._cache_name, self._cache = name, {}
            if "grams" in wanted:
                self._cache["grams"] = ([g.read(name).to(self.device, self.compute) for g in p.grams]
                                        if name in p.grams[0].tensors else None)
        if "grams" in wanted:
            kwargs["grams"] = self._cache["grams"]
        if "cache" in wanted:
            kwargs["cache"] = self._cache
        return {k: v for k, v in kwargs.items() if k in wanted}

    def _compute(self, name: str, rows: slice | None) -> torch.Tensor:
        self._loaded: list[tuple[Checkpoint, torch.Tensor]] = []
        kwargs = self._inputs(name, rows)
        stats: dict[str, int] = {}
        if "stats" in self.method.inputs:
            kwargs["stats"] = stats
        if not self.method.propagates_nan:
            self._blame_non_finite(name, rows)
        where = _where(name, rows)
        try:
            result = self.method.function(**kwargs, **self.call_params)
        except MethodError as exc:
            self._blame_non_finite(name, rows)
            raise UserError(f"{self.method.name}: {where} of {self.plan.parent.info(name).file}: {exc}") from None
        if not _finite(result):
            self._blame_non_finite(name, rows)
            raise UserError(f"{self.method.name}: {where}: the merged values overflow to NaN or Inf")
        self._count(name, stats)
        self._loaded = []
        return result

    def _fused(self, name: str, rows: slice | None, out_dtype: torch.dtype) -> torch.Tensor | None:
        """The merged block from the method's fused kernel, or None where the reference must compute it
        (inputs or output in dtypes the kernels do not take, or a value the kernel leaves to the reference)."""
        from gradmatch import kernels

        if not kernels.writable(out_dtype) or any(kernels.bits_dtype(ckpt.info(name).dtype) is None
                                                  for ckpt in _method_inputs(self.plan)):
            return None
        kwargs = self._inputs(name, rows, stored=True)
        info = self.plan.parent.info(name)
        shape = info.shape if rows is None else (rows.stop - rows.start, *info.shape[1:])
        nbytes = math.prod(shape) * out_dtype.itemsize
        out = self._buffer("out", nbytes)[:nbytes].view(kernels.bits_dtype(out_dtype))
        stats: dict[str, int] = {}
        if "stats" in self.method.inputs:
            kwargs["stats"] = stats
        if not self.method.fused(out=out, **kwargs, **self.call_params, threads=self.threads):
            return None
        self._count(name, stats)
        return torch.from_numpy(out).view(out_dtype).view(shape)  # valid until the next block

    def kernel_record(self, requested: str) -> dict[str, Any]:
        """What computed the merged tensors, as merge.json records it: ``kernel`` is ``fused`` or ``reference`` when
        one path computed every block and ``mixed`` when both did (the fused kernel was chosen, and the reference
        formula computed the blocks it does not take: ``kernel_fallbacks``, tensor → blocks)."""
        chosen = "fused" if self.fused is not None else "reference"
        used = [path for path in ("fused", "reference") if self.computed[path]]
        return {"kernel": used[0] if len(used) == 1 else ("mixed" if used else chosen), "kernel_requested": requested,
                "kernel_blocks": dict(self.computed), "kernel_fallbacks": dict(self.fallbacks)}

    def _count(self, name: str, stats: dict[str, int]) -> None:
        for key, value in stats.items():
            per_tensor = self.stats.setdefault(key, {})
            per_tensor[name] = per_tensor.get(name, 0) + int(value)

    def _cast(self, name: str, rows: slice | None, out_dtype: torch.dtype) -> torch.Tensor:
        if self.fused is not None:
            result = self._fused(name, rows, out_dtype)
            if result is not None:
                self.computed["fused"] += 1
                return result
            self.fallbacks[name] = self.fallbacks.get(name, 0) + 1
        self.computed["reference"] += 1
        result = self._compute(name, rows).to("cpu", out_dtype)
        if not _finite(result):  # finite in the compute dtype, but beyond the output dtype's range
            raise UserError(f"{self.method.name}: {_where(name, rows)}: the merged values overflow "
                            f"{str(out_dtype).removeprefix('torch.')} (largest {torch.finfo(out_dtype).max:.4g}); "
                            "choose a wider --out-dtype or smaller weights")
        return result

    def row_blocks(self, name: str) -> list[slice | None]:
        """The blocks of rows in which tensor ``name`` is merged (``[None]``: all at once).

        Elementwise and rowwise methods take a large tensor in blocks of about DEFAULT_BLOCK_ELEMENTS
        entries per input (GPU_BLOCK_ELEMENTS on a GPU; ``block_rows`` rows when given); the others need
        whole tensors.
        """
        info = self.plan.parent.info(name)
        if not info.shape or not (self.method.elementwise or self.method.rowwise):
            return [None]
        row_numel = max(1, info.numel // max(1, info.shape[0]))
        elements = DEFAULT_BLOCK_ELEMENTS if self.device.type == "cpu" else GPU_BLOCK_ELEMENTS
        rows = self.block_rows or max(1, elements // row_numel)
        if rows >= info.shape[0]:
            return [None]
        return [slice(start, min(start + rows, info.shape[0])) for start in range(0, info.shape[0], rows)]

    def blocks(self) -> list[tuple[str, slice | None]]:
        """Every block of every merged tensor, in the order they are merged."""
        return [(name, rows) for name in self.plan.merged for rows in self.row_blocks(name)]

    def start_reader(self, pinned: bool) -> None:
        """Read each block's inputs on a thread while the block before it is computed (pinned: into
        page-locked buffers, for asynchronous copies to a GPU)."""
        inputs = _method_inputs(self.plan)
        blocks = self.blocks()
        block_bytes = max((_block_bytes(ckpt, name, rows) for name, rows in blocks for ckpt in inputs), default=0)
        streaming = self.method.elementwise or self.method.rowwise
        pinned = pinned and block_bytes <= _MAX_PINNED_BLOCK  # whole tensors (TIES, DARE): no pinned pool of them
        convert = self.compute if self.device.type == "cpu" and self.fused is None else None  # a kernel reads as stored
        self.reader = BlockReader(inputs, blocks, ahead=2 if streaming else 1, pinned=pinned, block_bytes=block_bytes,
                                  convert=convert)

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()
            self.reader = None

    def merged_blocks(self, name: str, out_dtype: torch.dtype):
        """The merged tensor ``name`` in ``out_dtype``, as (first row, block) pairs in row order."""
        for rows in self.row_blocks(name):
            if self.reader is not None:
                self._ahead = self.reader.next((name, rows))
            try:
                yield (0 if rows is None else rows.start), self._cast(name, rows, out_dtype)
            finally:
                if self._ahead is not None:
                    self.reader.release(self._ahead)
                    self._ahead = None


#: Largest block read into pinned buffers (a pool of ahead + 2 per input); larger blocks get fresh tensors.
_MAX_PINNED_BLOCK = 64 << 20


def _block_bytes(ckpt: Checkpoint, name: str, rows: slice | None) -> int:
    info = ckpt.info(name)
    n = info.numel if rows is None else (rows.stop - rows.start) * (info.numel // max(1, info.shape[0]))
    return n * info.dtype.itemsize


def _statistics(plan: MergePlan, executor: _Executor) -> dict[str, Any]:
    """What the method counted (e.g. entries its guard touched): totals, the fraction of merged entries, per tensor."""
    entries = sum(plan.parent.info(name).numel for name in plan.merged)
    return {key: {"total": sum(per_tensor.values()), "fraction": sum(per_tensor.values()) / max(1, entries),
                  "per_tensor": {name: n for name, n in per_tensor.items() if n}}
            for key, per_tensor in executor.stats.items()}


def _inputs_record(plan: MergePlan) -> dict[str, Any]:
    """Every input folder: its absolute path and a fingerprint of its weights (checkpoints.folder_fingerprint)."""
    from gradmatch.checkpoints import folder_fingerprint

    entries = [("base", plan.parent.folder), ("base_hessian", plan.parent_hessian and plan.parent_hessian.folder)]
    for i, child in enumerate(plan.children):
        entries.append((f"models[{i}]", child.folder))
        entries.append((f"models[{i}].hessian", plan.hessians[i] and plan.hessians[i].folder))
        entries.append((f"models[{i}].gram", plan.grams[i].path.parent if plan.grams else None))
    return {role: {"path": str(Path(folder).resolve()), "fingerprint": folder_fingerprint(folder)}
            for role, folder in entries if folder is not None}


def _estimator(hessian, prior: bool = False) -> str | None:
    """The estimator a Hessian's fisher.json names (``sampled``, ``adam``, ``ivon``, ``generated``, …; ``prior`` for
    base_hessian: prior); None without a Hessian or for the original code's Hessians, which record none."""
    if hessian is None:
        return None
    if prior:
        return "prior"
    if hessian.folder is None:
        return None
    value = _read_record(Path(hessian.folder) / "fisher.json").get("estimator")
    return value if isinstance(value, str) else None


def _provenance(plan: MergePlan, params: dict[str, Any], precision: str, out_dtype: str | None,
                statistics: dict[str, Any], kernel: dict[str, Any]) -> dict[str, Any]:
    from gradmatch import __version__

    c = plan.config
    return {
        "gradmatch_version": __version__,
        "method": c.method,
        "parameters": params,
        "base": c.base,
        "base_hessian": c.base_hessian if plan.parent_hessian is not None else None,
        "base_hessian_estimator": _estimator(plan.parent_hessian, prior=plan.prior is not None),
        "base_hessian_scale": plan.parent_scale,
        "models": [{"model": e.model, "hessian": e.hessian if plan.hessians[i] is not None else None,
                    "hessian_estimator": _estimator(plan.hessians[i]),
                    "gram": e.gram if plan.grams else None,
                    "weight": plan.alphas[i], "hessian_scale": plan.scales[i] if plan.scales else None}
                   for i, e in enumerate(c.models)],
        "precision": precision,
        **kernel,
        "out_dtype": out_dtype,
        "merged_entries": sum(plan.parent.info(name).numel for name in plan.merged),
        "prior_level": plan.prior,
        "pretrained_base": plan.head or None,
        "statistics": statistics,
        "scale_sources": plan.scale_sources,
        "inputs": _inputs_record(plan),
    }


def merge(
    config: MergeConfig | Mapping[str, Any] | str | os.PathLike,
    out: str | os.PathLike,
    *,
    overwrite: bool = False,
    device: str | torch.device = "cpu",
    precision: str = "float32",
    out_dtype: str | None = None,
    max_shard_size: str | int = "5GB",
    block_rows: int | None = None,
    progress: bool = True,
    threads: int | None = 1,
    card: bool = True,
    prefetch: bool | None = None,
    check_inputs: bool = True,
    allow_config_mismatch: bool = False,
    kernel: str = "auto",
) -> Path:
    """Merge the children of ``config`` into a Hugging Face folder ``out``; return ``out``.

    ``config`` is a :class:`~gradmatch.config.MergeConfig`, a dict of the YAML form, or a YAML/JSON
    path. Tensors stream one name at a time (elementwise methods: blocks of ``block_rows`` rows) in
    ``precision`` on ``device``; floating outputs take the parent's dtype unless ``out_dtype`` (or the
    config's ``out_dtype``) says otherwise; non-floating entries are copied from the parent. The folder
    appears atomically; any bad input raises :class:`~gradmatch.errors.UserError` and leaves ``out``
    as it was. ``threads`` sets torch's CPU threads during the merge (None: torch's default); one is
    the default because blockwise merging is memory-bound, and several threads on a shared or
    oversubscribed machine made merges 10-40x slower in our measurements. ``card``: write a model card
    (README.md, replacing the parent's). ``prefetch``: read the next block's inputs on a thread while the
    current one is computed (None: only on a GPU, where it also uses pinned host buffers). ``check_inputs``:
    refuse a Hessian or Gram whose record names another model; ``allow_config_mismatch``: merge children
    whose config would make their weights compute something else than the parent's. ``kernel``: ``fused``
    computes with the method's fused kernel (one pass over the inputs as stored; a CPU, float32),
    ``reference`` with its torch formula, ``auto`` (default) fused where the method has a kernel and the
    merge reads at least KERNEL_MIN_BYTES (below, loading the kernel costs more than it saves).
    """
    cfg = load_merge_config(config)
    out = check_output_dir(out, overwrite)
    if precision not in _PRECISIONS:
        raise UserError(f"precision must be one of {', '.join(_PRECISIONS)}, not {precision!r}")
    out_dtype = out_dtype or cfg.out_dtype
    if out_dtype is not None and out_dtype not in _OUT_DTYPES:
        raise UserError(f"out dtype must be one of {', '.join(_OUT_DTYPES)}, not {out_dtype!r}")
    if threads is not None and threads <= 0:
        raise UserError(f"threads must be positive, got {threads}")
    if block_rows is not None and block_rows <= 0:
        raise UserError(f"block rows must be positive, got {block_rows}")
    shard_bytes = parse_size(max_shard_size)
    dev = parse_device(device)
    _check_kernel(kernel, get_method(cfg.method), dev, precision)  # before planning, which may print notes
    plan = plan_merge(cfg, check_inputs=check_inputs, allow_config_mismatch=allow_config_mismatch)
    _check_output_not_input(out, plan)
    out_dtype = out_dtype or _default_out_dtype(plan)
    params = dict(cfg.parameters)
    executor = _Executor(plan, params, dev, _PRECISIONS[precision], block_rows, threads,
                         _choose_kernel(kernel, plan, dev, precision))

    saved_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    _keep_freed_memory()
    reproduce = _reproduction(config, cfg, out_dtype_option=out_dtype if out_dtype != cfg.out_dtype else None,
                              precision=precision, max_shard_size=max_shard_size, kernel=kernel)
    if prefetch is None:
        prefetch = dev.type == "cuda"
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    collecting = gc.isenabled()
    gc.disable()  # the loop makes no reference cycles; the collector's passes over torch's objects cost 5 %
    try:
        if prefetch:
            executor.start_reader(pinned=dev.type == "cuda")
        _write(plan, executor, out, overwrite=overwrite, shard_bytes=shard_bytes, out_dtype=out_dtype, params=params,
               precision=precision, progress=progress, reproduce=reproduce, card=card, kernel=kernel)
    finally:
        executor.close()
        for ckpt in plan.inputs:
            ckpt.close()
        torch.set_num_threads(saved_threads)
        if collecting:
            gc.enable()
    if dev.type == "cuda":
        log.info("peak GPU memory: %.0f MB", torch.cuda.max_memory_allocated(dev) / 2**20)
    if kernel == "fused" and executor.fallbacks:
        log.warning("note: the fused kernel does not take %d of the merged tensors' inputs as stored (e.g. %s): the "
                    "reference formula computed them (merge.json: kernel_fallbacks)", len(executor.fallbacks),
                    next(iter(executor.fallbacks)))
    guarded = executor.stats.get("guarded_entries")
    if guarded and sum(guarded.values()):
        total, entries = sum(guarded.values()), sum(plan.parent.info(n).numel for n in plan.merged)
        log.warning("%s: the removal guard bounded %s of %s entries (%.2f%%) in %d tensors (max_update_ratio %g); "
                    "per tensor in %s", plan.method.name, f"{total:,}", f"{entries:,}", 100 * total / entries,
                    sum(1 for n in guarded.values() if n), params.get("max_update_ratio", float("nan")),
                    Path(out) / "merge.json")
    return out


_KERNELS = ("auto", "fused", "reference")


def _default_out_dtype(plan: MergePlan) -> str | None:
    """None (each merged tensor keeps the parent's dtype) unless the parent stores merged tensors in a dtype a merge
    does not write — float8: its values are not a merge's without a scale the format lacks — then bfloat16."""
    stored = {plan.output.info(name).dtype for name in [*plan.merged, *plan.averaged]}
    odd = sorted(str(d).removeprefix("torch.") for d in stored if d not in _OUT_DTYPES.values())
    if not odd:
        return None
    log.warning("note: the base model stores %s tensors, which a merge does not write (it computes in float32 and "
                "float8 holds no scale for its results): writing bfloat16 (--out-dtype chooses another)",
                ", ".join(odd))
    return "bfloat16"


def _check_kernel(kernel: str, method: MergeMethod, device: torch.device, precision: str) -> None:
    """Refuse a ``kernel`` option that cannot compute this merge."""
    if kernel not in _KERNELS:
        raise UserError(f"kernel must be one of {', '.join(_KERNELS)}, not {kernel!r}")
    if kernel != "fused":
        return
    if method.fused is None:
        with_kernel = ", ".join(m for m in method_names() if get_method(m).fused is not None)
        raise UserError(f"{method.name} has no fused kernel (these methods have one: {with_kernel}); "
                        "use --kernel reference or auto")
    if device.type != "cpu" or precision != "float32":
        raise UserError(f"the fused kernels compute in float32 on a CPU, not in {precision} on {device}: "
                        "use --kernel reference or auto")


def _choose_kernel(kernel: str, plan: MergePlan, device: torch.device, precision: str) -> str:
    """``fused`` or ``reference``: what computes this (checked) merge (see :func:`merge`'s ``kernel``)."""
    method = plan.method
    if kernel != "auto":
        return kernel
    if method.fused is None or device.type != "cpu" or precision != "float32":
        return "reference"
    read = sum(ckpt.info(name).numel * ckpt.info(name).dtype.itemsize
               for ckpt in _method_inputs(plan) for name in plan.merged if name in ckpt.tensors)
    return "fused" if read >= KERNEL_MIN_BYTES else "reference"


def _method_inputs(plan: MergePlan) -> list:
    """The checkpoints the method reads for every merged tensor."""
    inputs = [plan.parent, *plan.children]
    if plan.method.uses_child_hessians:
        inputs += [h for h in plan.hessians if h is not None]
    if plan.method.uses_parent_hessian and plan.parent_hessian is not None:
        inputs.append(plan.parent_hessian)
    return inputs


#: glibc's mallopt parameters: blocks below this size come from the heap and freed memory is kept for reuse.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _ALLOCATOR_KEEP = -1, -3, 64 << 20


def _keep_freed_memory() -> None:
    """Let glibc reuse the memory of one block's tensors for the next instead of returning it to the system.

    By default every block's buffers (a few hundred KB each, above glibc's mmap threshold) are mapped
    fresh and unmapped after use, so each page faults in again: at 8 children that was half the merge's
    time. Blocks are small, so the retained memory stays a few MB per input. No-op off glibc.
    """
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    mallopt(_M_MMAP_THRESHOLD, _ALLOCATOR_KEEP)
    mallopt(_M_TRIM_THRESHOLD, _ALLOCATOR_KEEP)


def _write(plan: MergePlan, executor: _Executor, out: Path, *, overwrite: bool, shard_bytes: int,
           out_dtype: str | None, params: dict[str, Any], precision: str, progress: bool,
           reproduce: tuple[str, str, str], card: bool, kernel: str) -> None:
    """Stream every tensor, block by block, through the executor into shards in a temporary folder, then
    rename it to ``out``. The shard layout is planned from the parent's names, shapes and output dtypes
    first, so each block goes to its place in its file as soon as it is merged: memory holds one block."""
    from tqdm.auto import tqdm

    merged, averaged = set(plan.merged), set(plan.averaged)
    specs = [TensorSpec(name, _OUT_DTYPES[out_dtype] if out_dtype and name in merged | averaged else info.dtype,
                        info.shape) for name, info in plan.output.tensors.items()]
    with atomic_dir(out, overwrite) as tmp:
        copy_non_weight_files(plan.template, tmp)
        if out_dtype is not None:
            _set_config_dtype(tmp / "config.json", out_dtype)
        writer = SafetensorsWriter(tmp, specs, shard_bytes)
        total = sum(spec.nbytes for spec in specs)
        bar = tqdm(total=total, desc=plan.method.name, unit="B", unit_scale=True, disable=None if progress else True,
                   leave=False)
        try:
            for spec in specs:
                if spec.name in merged:
                    blocks = executor.merged_blocks(spec.name, spec.dtype)
                elif spec.name in averaged:
                    blocks = _averaged_blocks(plan.children, spec.name, spec.dtype, executor.compute)
                else:
                    blocks = _copied_blocks(plan.output, spec.name)
                for first_row, block in blocks:
                    writer.write(spec.name, block, first_row)
                    bar.update(block.numel() * block.element_size())
            writer.finish()
        finally:
            writer.close()
            bar.close()
        record = _provenance(plan, params, precision, out_dtype, _statistics(plan, executor),
                             executor.kernel_record(kernel))
        command, config_name, config_text = reproduce
        record["command"] = command
        (tmp / "merge.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        (tmp / "merge.yaml").write_text(config_text, encoding="utf-8")  # the config as given: rebuilds the merge
        if card:
            from gradmatch.card import model_card

            (tmp / "README.md").write_text(model_card(record, plan.method, command, config_name, config_text),
                                           encoding="utf-8")


def _averaged_blocks(children: list[Checkpoint], name: str, out_dtype: torch.dtype, compute: torch.dtype):
    """The children's plain mean of tensor ``name`` (a head the base lacks and no common initialisation)."""
    for first_row, block in _copied_blocks(children[0], name):
        rows = slice(first_row, first_row + block.shape[0]) if block.dim() else None
        total = block.to(compute)
        for child in children[1:]:
            total += child.read(name, rows).to(compute)
        mean = (total / len(children)).to(out_dtype)
        if not _finite(mean):
            raise UserError(f"{_where(name, rows)}: the children's mean overflows {str(out_dtype).removeprefix('torch.')}"
                            " or they hold NaN or Inf values")
        yield first_row, mean


def _copied_blocks(parent: Checkpoint, name: str):
    """A tensor the parent gives the output unchanged, in blocks of about DEFAULT_BLOCK_ELEMENTS entries."""
    info = parent.info(name)
    if not info.shape or info.numel <= DEFAULT_BLOCK_ELEMENTS:
        yield 0, parent.read(name)
        return
    rows = max(1, DEFAULT_BLOCK_ELEMENTS // max(1, info.numel // info.shape[0]))
    for start in range(0, info.shape[0], rows):
        yield start, parent.read(name, slice(start, min(start + rows, info.shape[0])))


def _reproduction(config: Any, cfg: MergeConfig, *, out_dtype_option: str | None, precision: str,
                  max_shard_size: str | int, kernel: str = "auto") -> tuple[str, str, str]:
    """The command, config file name and config text that reproduce this merge (for the model card):
    the config file as the user wrote it (a mergekit YAML stays one), or our YAML form of a dict."""
    import yaml

    if isinstance(config, (str, os.PathLike)):
        name, text = Path(config).name, Path(config).read_text(encoding="utf-8")
    else:
        name = "merge.yaml"
        data = dict(config) if isinstance(config, Mapping) else cfg.model_dump(exclude_none=True, exclude_defaults=True)
        text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    options = []
    if out_dtype_option:
        options.append(f"--out-dtype {out_dtype_option}")
    if precision != "float32":
        options.append(f"--precision {precision}")
    if str(max_shard_size) != "5GB":
        options.append(f"--max-shard-size {max_shard_size}")
    if kernel != "auto":
        options.append(f"--kernel {kernel}")
    return " ".join(["gradmatch merge", name, "OUT", *options]), name, text  # OUT: any new folder


def _set_config_dtype(config: Path, out_dtype: str) -> None:
    """Record a changed weight dtype in the copied config.json (the one change made to the parent's files)."""
    if not config.is_file():
        return
    data = json.loads(config.read_text(encoding="utf-8"))
    key = "dtype" if "dtype" in data or "torch_dtype" not in data else "torch_dtype"
    data[key] = out_dtype
    config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


class _CallableModule(type(json)):
    """`gradmatch.merge` names both this module and the function: once the module is imported, Python
    binds the package attribute to the module, so the module itself forwards calls to :func:`merge`."""

    def __call__(self, *args, **kwargs) -> Path:
        return merge(*args, **kwargs)


import sys as _sys  # noqa: E402

_sys.modules[__name__].__class__ = _CallableModule
