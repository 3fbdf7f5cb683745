"""Writing a merge: stream every tensor through the executor into shards in a temporary folder, with
``merge.json`` (provenance), ``merge.yaml`` (the config that rebuilds it) and a model card; rename at the end."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gradmatch.checkpoints import SafetensorsWriter, TensorSpec, copy_non_weight_files
from gradmatch.config.merge import MergeConfig
from gradmatch.config.options import MergeOptions, command_flags
from gradmatch.engine.execute import Executor, averaged_blocks, copied_blocks
from gradmatch.engine.plan import OUT_TORCH_DTYPES, MergePlan, read_record
from gradmatch.fsutil import atomic_dir

log = logging.getLogger("gradmatch.merge")


def _statistics(plan: MergePlan, executor: Executor) -> dict[str, Any]:
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
    value = read_record(Path(hessian.folder) / "fisher.json").get("estimator")
    return value if isinstance(value, str) else None


def _provenance(plan: MergePlan, params: dict[str, Any], options: MergeOptions, out_dtype: str | None,
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
        # every option that shapes the result, as given (its defaults included); not how the folder was replaced,
        # so that the same merge written with and without --overwrite is the same bytes
        "options": options.model_dump(mode="json", exclude=set(MergeOptions.NOT_REBUILT)),
        "precision": options.precision,
        **kernel,
        "out_dtype": out_dtype,
        "merged_entries": sum(plan.parent.info(name).numel for name in plan.merged),
        "prior_level": plan.prior,
        "pretrained_base": plan.head or None,
        "statistics": statistics,
        "scale_sources": plan.scale_sources,
        "inputs": _inputs_record(plan),
    }


def write_merge(plan: MergePlan, executor: Executor, out: Path, options: MergeOptions, *, shard_bytes: int,
                out_dtype: str | None, params: dict[str, Any], progress: bool, reproduce: tuple[str, str, str]) -> None:
    """Stream every tensor, block by block, through the executor into shards in a temporary folder, then
    rename it to ``out``. The shard layout is planned from the parent's names, shapes and output dtypes
    first, so each block goes to its place in its file as soon as it is merged: memory holds one block."""
    from tqdm.auto import tqdm

    merged, averaged = set(plan.merged), set(plan.averaged)
    specs = [TensorSpec(name, OUT_TORCH_DTYPES[out_dtype] if out_dtype and name in merged | averaged else info.dtype,
                        info.shape) for name, info in plan.output.tensors.items()]
    with atomic_dir(out, options.overwrite) as tmp:
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
                    blocks = averaged_blocks(plan.children, spec.name, spec.dtype, executor.compute)
                else:
                    blocks = copied_blocks(plan.output, spec.name)
                for first_row, block in blocks:
                    writer.write(spec.name, block, first_row)
                    bar.update(block.numel() * block.element_size())
            writer.finish()
        finally:
            writer.close()
            bar.close()
        record = _provenance(plan, params, options, out_dtype, _statistics(plan, executor),
                             executor.kernel_record(options.kernel))
        command, config_name, config_text = reproduce
        record["command"] = command
        (tmp / "merge.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        (tmp / "merge.yaml").write_text(config_text, encoding="utf-8")  # the config as given: rebuilds the merge
        if options.card:
            from gradmatch.card import model_card

            (tmp / "README.md").write_text(model_card(record, plan.method, command, config_name, config_text),
                                           encoding="utf-8")


def reproduction(config: Any, cfg: MergeConfig, options: MergeOptions) -> tuple[str, str, str]:
    """The command, config file name and config text that reproduce this merge (for merge.json and the model
    card): the config file as the user wrote it (a mergekit YAML stays one), or our YAML form of a dict, and every
    option that is not the default, spelled as `gradmatch merge` takes it (:func:`command_flags`)."""
    import yaml

    if isinstance(config, (str, os.PathLike)):
        name, text = Path(config).name, Path(config).read_text(encoding="utf-8")
    else:
        name = "merge.yaml"
        data = dict(config) if isinstance(config, Mapping) else cfg.model_dump(exclude_none=True, exclude_defaults=True)
        text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    return " ".join(["gradmatch merge", name, "OUT", *command_flags(options)]), name, text  # OUT: any new folder


def _set_config_dtype(config: Path, out_dtype: str) -> None:
    """Record a changed weight dtype in the copied config.json (the one change made to the parent's files)."""
    if not config.is_file():
        return
    data = json.loads(config.read_text(encoding="utf-8"))
    key = "dtype" if "dtype" in data or "torch_dtype" not in data else "torch_dtype"
    data[key] = out_dtype
    config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
