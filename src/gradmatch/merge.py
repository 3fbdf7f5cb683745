"""The merge engine's entry point: :func:`merge` validates the inputs (:mod:`gradmatch.engine.plan`), streams one
tensor name (or block of rows) at a time through a merge method (:mod:`gradmatch.engine.execute`) and writes the
result atomically as a Hugging Face folder (:mod:`gradmatch.engine.write`); a pretrained base under children of
another architecture is :mod:`gradmatch.engine.pretrained`."""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from gradmatch.checkpoints import parse_size
from gradmatch.config.merge import MergeConfig, load_merge_config
from gradmatch.config.options import MergeOptions, merge_options
from gradmatch.devices import parse_device
from gradmatch.engine.blocks import DEFAULT_BLOCK_ELEMENTS
from gradmatch.engine.execute import Executor, keep_freed_memory
from gradmatch.engine.plan import (
    MergePlan,
    check_output_not_input,
    default_out_dtype,
    method_inputs,
    plan_merge,
)
from gradmatch.engine.write import reproduction, write_merge
from gradmatch.errors import UserError
from gradmatch.fsutil import check_output_dir
from gradmatch.methods import MergeMethod, get_method, method_names

__all__ = ["DEFAULT_BLOCK_ELEMENTS", "MergeOptions", "MergePlan", "load_merge_config", "merge", "plan_merge"]

log = logging.getLogger(__name__)

#: ``kernel="auto"`` uses a method's fused kernel (gradmatch.kernels) when the merge reads at least this many bytes:
#: loading numba and the compiled kernel costs about 0.5 s and 105 MB per process, which a MiniLM merge (0.9 GB at
#: T = 4, float32 inputs, 1.8 s) does not win back; at 0.5B parameters in bf16 (9.7 GB) the kernel halves the time.
KERNEL_MIN_BYTES = 2 << 30

def merge(
    config: MergeConfig | Mapping[str, Any] | str | os.PathLike,
    out: str | os.PathLike,
    options: MergeOptions | Mapping[str, Any] | None = None,
    *,
    progress: bool = True,
    prefetch: bool | None = None,
    scale_sources: Mapping[str, str] | None = None,
    **settings: Any,
) -> Path:
    """Merge the children of ``config`` into a Hugging Face folder ``out``; return ``out``.

    ``config`` is a :class:`~gradmatch.config.MergeConfig`, a dict of the YAML form, or a YAML/JSON
    path. ``options`` (:class:`~gradmatch.config.options.MergeOptions`, or a dict of them) say how it runs and
    is written, and any of them may be given as a keyword argument instead (``kernel="fused"``, ``block_rows=7``;
    ``check_inputs`` is the older name of ``check_hessians``): tensors stream one name at a time (elementwise
    methods: blocks of ``block_rows`` rows) in ``precision`` on ``device``; floating outputs take the parent's dtype
    unless ``out_dtype`` (or the config's ``out_dtype``) says otherwise; non-floating entries are copied from the
    parent. The folder appears atomically; any bad input raises :class:`~gradmatch.errors.UserError` and leaves
    ``out`` as it was. ``threads`` sets torch's CPU threads during the merge (None: torch's default); one is the
    default because blockwise merging is memory-bound, and several threads on a shared or oversubscribed machine
    made merges 10-40x slower in our measurements. ``card``: write a model card (README.md, replacing the
    parent's). ``check_hessians``: refuse a Hessian or Gram whose record names another model;
    ``allow_config_mismatch``: merge children whose config would make their weights compute something else than
    the parent's. ``kernel``: ``fused`` computes with the method's fused kernel (one pass over the inputs as
    stored; a CPU, float32), ``reference`` with its torch formula, ``auto`` (default) fused where the method has a
    kernel and the merge reads at least KERNEL_MIN_BYTES (below, loading the kernel costs more than it saves).
    merge.json records every option, and its command (and the card's) every one that is not the default.

    Two arguments change how the merge runs but never what it writes: ``progress`` (a progress bar) and
    ``prefetch`` (read the next block's inputs on a thread while the current one is computed; None: only on a
    GPU, where it also uses pinned host buffers). ``scale_sources`` names where a caller that wrote a Hessian
    scale into ``config`` took it from (role → source, e.g. ``{"base": "--scaling_factor_pt"}``), recorded in
    merge.json's ``scale_sources`` instead of ``config``.
    """
    options = merge_options(options, **settings)
    cfg = load_merge_config(config)
    out = check_output_dir(out, options.overwrite)
    out_dtype = options.out_dtype or cfg.out_dtype
    shard_bytes = parse_size(options.max_shard_size)
    dev = parse_device(options.device)
    _check_kernel(options.kernel, get_method(cfg.method), dev, options.precision)  # before planning: it may print
    plan = plan_merge(cfg, check_inputs=options.check_hessians, allow_config_mismatch=options.allow_config_mismatch)
    for role, source in (scale_sources or {}).items():
        if plan.scale_sources.get(role) == "config":
            plan.scale_sources[role] = source
    check_output_not_input(out, plan)
    out_dtype = out_dtype or default_out_dtype(plan)
    params = dict(cfg.parameters)
    executor = Executor(plan, params, dev, getattr(torch, options.precision), options.block_rows, options.threads,
                        _choose_kernel(options.kernel, plan, dev, options.precision))

    saved_threads = torch.get_num_threads()
    if options.threads is not None:
        torch.set_num_threads(options.threads)
    keep_freed_memory()
    reproduce = reproduction(config, cfg, options)
    if prefetch is None:
        prefetch = dev.type == "cuda"
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    collecting = gc.isenabled()
    gc.disable()  # the loop makes no reference cycles; the collector's passes over torch's objects cost 5 %
    try:
        if prefetch:
            executor.start_reader(pinned=dev.type == "cuda")
        write_merge(plan, executor, out, options, shard_bytes=shard_bytes, out_dtype=out_dtype, params=params,
                    progress=progress, reproduce=reproduce)
    finally:
        executor.close()
        for ckpt in plan.inputs:
            ckpt.close()
        torch.set_num_threads(saved_threads)
        if collecting:
            gc.enable()
    if dev.type == "cuda":
        log.info("peak GPU memory: %.0f MB", torch.cuda.max_memory_allocated(dev) / 2**20)
    if options.kernel == "fused" and executor.fallbacks:
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


def _check_kernel(kernel: str, method: MergeMethod, device: torch.device, precision: str) -> None:
    """Refuse a ``kernel`` option that cannot compute this merge."""
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
               for ckpt in method_inputs(plan) for name in plan.merged if name in ckpt.tensors)
    return "fused" if read >= KERNEL_MIN_BYTES else "reference"


class _CallableModule(type(os)):
    """`gradmatch.merge` names both this module and the function: once the module is imported, Python
    binds the package attribute to the module, so the module itself forwards calls to :func:`merge`."""

    def __call__(self, *args, **kwargs) -> Path:
        return merge(*args, **kwargs)


import sys as _sys

_sys.modules[__name__].__class__ = _CallableModule
