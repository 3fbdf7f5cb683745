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
from gradmatch.devices import parse_device
from gradmatch.engine.blocks import DEFAULT_BLOCK_ELEMENTS
from gradmatch.engine.execute import Executor, keep_freed_memory
from gradmatch.engine.plan import (OUT_TORCH_DTYPES, PRECISIONS, MergePlan, check_output_not_input, default_out_dtype,
                                   method_inputs, plan_merge)
from gradmatch.engine.write import reproduction, write_merge
from gradmatch.errors import UserError
from gradmatch.fsutil import check_output_dir
from gradmatch.methods import MergeMethod, get_method, method_names

__all__ = ["merge", "load_merge_config", "plan_merge", "MergePlan", "DEFAULT_BLOCK_ELEMENTS"]

log = logging.getLogger(__name__)

#: ``kernel="auto"`` uses a method's fused kernel (gradmatch.kernels) when the merge reads at least this many bytes:
#: loading numba and the compiled kernel costs about 0.5 s and 105 MB per process, which a MiniLM merge (0.9 GB at
#: T = 4, float32 inputs, 1.8 s) does not win back; at 0.5B parameters in bf16 (9.7 GB) the kernel halves the time.
KERNEL_MIN_BYTES = 2 << 30

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
    if precision not in PRECISIONS:
        raise UserError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    out_dtype = out_dtype or cfg.out_dtype
    if out_dtype is not None and out_dtype not in OUT_TORCH_DTYPES:
        raise UserError(f"out dtype must be one of {', '.join(OUT_TORCH_DTYPES)}, not {out_dtype!r}")
    if threads is not None and threads <= 0:
        raise UserError(f"threads must be positive, got {threads}")
    if block_rows is not None and block_rows <= 0:
        raise UserError(f"block rows must be positive, got {block_rows}")
    shard_bytes = parse_size(max_shard_size)
    dev = parse_device(device)
    _check_kernel(kernel, get_method(cfg.method), dev, precision)  # before planning, which may print notes
    plan = plan_merge(cfg, check_inputs=check_inputs, allow_config_mismatch=allow_config_mismatch)
    check_output_not_input(out, plan)
    out_dtype = out_dtype or default_out_dtype(plan)
    params = dict(cfg.parameters)
    executor = Executor(plan, params, dev, PRECISIONS[precision], block_rows, threads,
                         _choose_kernel(kernel, plan, dev, precision))

    saved_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    keep_freed_memory()
    reproduce = reproduction(config, cfg, out_dtype_option=out_dtype if out_dtype != cfg.out_dtype else None,
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
        write_merge(plan, executor, out, overwrite=overwrite, shard_bytes=shard_bytes, out_dtype=out_dtype, params=params,
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
               for ckpt in method_inputs(plan) for name in plan.merged if name in ckpt.tensors)
    return "fused" if read >= KERNEL_MIN_BYTES else "reference"



class _CallableModule(type(os)):
    """`gradmatch.merge` names both this module and the function: once the module is imported, Python
    binds the package attribute to the module, so the module itself forwards calls to :func:`merge`."""

    def __call__(self, *args, **kwargs) -> Path:
        return merge(*args, **kwargs)


import sys as _sys  # noqa: E402

_sys.modules[__name__].__class__ = _CallableModule
