"""Planning a merge: open and validate every input (paths, layouts, architectures, configs, key sets, shapes,
scales, Hessians and Grams and whose they are) before any work, into a :class:`MergePlan`."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gradmatch.checkpoints import Checkpoint, ConstantTensors, TensorView, find_hessian_folder
from gradmatch.config.merge import OUT_DTYPES, PRIOR, MergeConfig
from gradmatch.engine.blocks import row_blocks
from gradmatch.engine.pretrained import HEAD_CONFIG_KEYS, is_pretrained_base, pretrained_base
from gradmatch.errors import UserError
from gradmatch.methods import MergeMethod, get_method

log = logging.getLogger("gradmatch.merge")

#: Entries copied from the parent whatever the method (as the original code did), besides non-floating ones.
_PARENT_ONLY = ("position_ids", "masked_bias")

OUT_TORCH_DTYPES = {name: getattr(torch, name) for name in OUT_DTYPES}


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
    transposed: set[str] = field(default_factory=set)  # Gram layers stored in × out (transformers Conv1D)

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
    from gradmatch.checkpoints import FINGERPRINT_PREFIX, fingerprint_by, fingerprint_matches

    pairs = [(plan.parent_hessian, plan.parent, "base_hessian")] + [
        (h, c, f"hessian of models[{i}]") for i, (h, c) in enumerate(zip(plan.hessians, plan.children))]
    pairs += [(g, c, f"gram of models[{i}]") for i, (g, c) in enumerate(zip(plan.grams, plan.children))]
    computed: dict = {}
    for stats, model, role in pairs:
        if stats is None or stats.folder is None:  # none, or base_hessian: prior
            continue
        record_file = (stats.path.parent / "gram.json") if hasattr(stats, "path") else stats.folder / "fisher.json"
        recorded = (stats.record if hasattr(stats, "record") else read_record(record_file)).get("weights_fingerprint")
        if not recorded:
            log.warning("note: %s %s has no weights_fingerprint in %s: cannot check that it belongs to %s",
                        role, stats.folder, record_file.name, model.folder)
            continue
        if not fingerprint_matches(model.folder, recorded, computed):
            older = "" if recorded.startswith(FINGERPRINT_PREFIX) else (
                f", by the older sampled scheme {recorded.split(':', 1)[0]}:, which also differs when the same tensors "
                "are saved again in another order or beside another weight file: compute it again to check it by its "
                "tensors")
            raise UserError(f"{role} {stats.folder} was computed on another model than {model.folder} "
                            f"(its {record_file.name} names weights {recorded[:30]}…, the model's are "
                            f"{fingerprint_by(model.folder, recorded)[:30]}…{older}); --no-check-hessians merges anyway")


def read_record(path: Path) -> dict[str, Any]:
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


def _check_floating(child: Checkpoint, parent: Checkpoint, merged: list[str]) -> None:
    """A child stores every merged weight as numbers: integer or boolean codes of a weight the base stores as floating
    point are not the weights to merge."""
    for name in merged:
        info = child.info(name)
        if not info.dtype.is_floating_point:
            raise UserError(f"tensor {name!r} is {str(info.dtype).removeprefix('torch.')} in {info.file} but "
                            f"{str(parent.info(name).dtype).removeprefix('torch.')} in the base model: its stored "
                            "values are not the weights to merge")


def plan_merge(config: MergeConfig, *, check_inputs: bool = True, allow_config_mismatch: bool = False) -> MergePlan:
    """Open and validate every input (paths, headers, architectures, configs, key sets, shapes, scales, and that
    each Hessian and Gram was computed on the model it is paired with) before any work.

    A base of another architecture than its children (a pretrained ``BertModel`` under
    ``BertForSequenceClassification`` children) is their pretrained body: see :func:`pretrained_base`."""
    method = get_method(config.method)
    base = Checkpoint(_local_model(config.base, "base model"), "base model")
    if base.config is None:
        raise UserError(f"base model {base.folder} is not a model folder: it has no config.json")
    children = [Checkpoint(_local_model(entry.model, f"models[{i}]"), f"models[{i}]")
                for i, entry in enumerate(config.models)]
    for ckpt in (base, *children):
        _check_not_quantized(ckpt)
    pretrained = is_pretrained_base(base, children[0])
    for child in children:
        _check_same_architecture(children[0] if pretrained else base, child)
        if not allow_config_mismatch:  # against the parent, and against each other (label order, where the
            _check_same_function(base, child, ignore=HEAD_CONFIG_KEYS if pretrained else ())  # parent has none)
            _check_same_function(children[0], child)
    if pretrained:
        parent, output, head = pretrained_base(base, children, [i for i, w in enumerate(config.weights()) if w < 0])
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
        _check_floating(child, output, merged + averaged)
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
    grams, transposed = _plan_grams(config, output, merged) if method.uses_grams else ([], set())
    plan = MergePlan(config, method, parent, children, parent_hessian, hessians, config.weights(),
                     parent_scale, scales, merged, grams, sources, output=output,
                     template=children[0].folder if pretrained else base.folder, averaged=averaged, prior=prior,
                     head=head, transposed=transposed)
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
            for rows in row_blocks(info.shape):
                total += float(h.read(name, rows).sum(dtype=torch.float64))
            count += info.numel
        means.append(total / max(1, count))
    level = sum(means) / len(means)
    if not (math.isfinite(level) and level > 0):
        raise UserError(f"base_hessian: {PRIOR} takes its level from the children's Hessians, whose mean is {level}: "
                        "set base_hessian to a Hessian folder, or give the prior's precision as parameters.delta_0")
    return level


def _plan_grams(config: MergeConfig, parent: Checkpoint, merged: list[str]) -> tuple[list, set[str]]:
    """Every child's Gram matrices — the same layers for each, each a merged 2-D weight of the parent with a Gram of
    its input size — and the layers among them stored in × out (transformers Conv1D, GPT-2's: the input size is
    their first dimension, and the Gram applies from the other side)."""
    from gradmatch.gram import GramFile

    grams = [GramFile(e.gram, f"gram of models[{i}]") for i, e in enumerate(config.models)]
    linear, conv1d = _gram_layers(parent)
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
            size = shape[0] if name in conv1d else shape[-1]
            if len(shape) != 2 or info.shape[0] != size:
                stored = " (a Conv1D weight, stored in × out)" if name in conv1d else ""
                raise UserError(f"{g.role} {g.path}: the Gram of {name} is {info.shape[0]} × {info.shape[0]} but the "
                                f"weight's input size is {size}{stored} (the Gram of another model?)")
    _check_gram_coverage(grams, linear | conv1d, merged_set)
    return grams, conv1d & layers


def _gram_layers(parent: Checkpoint) -> tuple[set[str], set[str]]:
    """The checkpoint names of the base model's layers that get a Gram: its nn.Linear weights (not tied to an
    embedding) and its transformers Conv1D weights (a Linear stored in × out), from its architecture built on the
    meta device; both empty when transformers cannot build it from its config.json."""
    from transformers import AutoConfig

    from gradmatch.gram import conv1d_layers, embedding_weights
    from gradmatch.kinds import kind_of_config
    from gradmatch.models import checkpoint_names
    from gradmatch.models import skeleton as meta_skeleton

    try:
        config = AutoConfig.from_pretrained(parent.folder)
        skeleton = meta_skeleton(config, kind_of_config(config))
        tied = embedding_weights(skeleton)
        linear = [f"{name}.weight" for name, m in skeleton.named_modules()
                  if isinstance(m, torch.nn.Linear) and id(m.weight) not in tied]
        conv1d = [f"{name}.weight" for name in conv1d_layers(skeleton)]
        names = checkpoint_names(skeleton, linear + conv1d)
        return {names[n] for n in linear}, {names[n] for n in conv1d}
    except Exception:  # noqa: BLE001 - an architecture transformers does not know: the Grams' own records decide
        return set(), set()


def _check_gram_coverage(grams: list, layers: set[str], merged: set[str]) -> None:
    """RegMean needs a Gram for every Linear (or Conv1D) layer it merges: those the base model's architecture has
    (``layers``) and those each Gram's record lists (gram.json ``positions``, a layer that saw no input included). A
    layer without one would be averaged while the merge is called regmean; an empty Gram file merges nothing by
    RegMean."""
    for g in grams:
        if not g.tensors:
            raise UserError(f"{g.role} {g.path} holds no Gram matrices: RegMean would average every tensor "
                            "(compute it with gradmatch gram on this child)")
    linear = set(layers)
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


def check_output_not_input(out: Path, plan: MergePlan) -> None:
    """Refuse an output that is, contains or lies inside an input folder (one line naming both)."""
    from gradmatch.fsutil import check_not_input

    inputs = {f"the input {ckpt.role}": ckpt.folder for ckpt in plan.inputs}
    inputs.update({f"the input {g.role}": g.folder for g in plan.grams})  # RegMean's Gram folders are inputs too
    check_not_input(out, inputs, "output")


def default_out_dtype(plan: MergePlan) -> str | None:
    """None (each merged tensor keeps the parent's dtype) unless the parent stores merged tensors in a dtype a merge
    does not write — float8: its values are not a merge's without a scale the format lacks — then bfloat16."""
    stored = {plan.output.info(name).dtype for name in [*plan.merged, *plan.averaged]}
    odd = sorted(str(d).removeprefix("torch.") for d in stored if d not in OUT_TORCH_DTYPES.values())
    if not odd:
        return None
    log.warning("note: the base model stores %s tensors, which a merge does not write (it computes in float32 and "
                "float8 holds no scale for its results): writing bfloat16 (--out-dtype chooses another)",
                ", ".join(odd))
    return "bfloat16"


def method_inputs(plan: MergePlan) -> list:
    """The checkpoints the method reads for every merged tensor."""
    inputs = [plan.parent, *plan.children]
    if plan.method.uses_child_hessians:
        inputs += [h for h in plan.hessians if h is not None]
    if plan.method.uses_parent_hessian and plan.parent_hessian is not None:
        inputs.append(plan.parent_hessian)
    return inputs
