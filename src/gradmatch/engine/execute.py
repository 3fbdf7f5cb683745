"""Executing a plan: one output tensor (or block of rows) at a time through the method — its fused kernel or
its torch formula — with the method's statistics and a record of which path computed what."""

from __future__ import annotations

import hashlib
import logging
import math
from typing import Any

import numpy as np
import torch

from gradmatch.checkpoints import Checkpoint
from gradmatch.config.options import KERNEL_PATHS
from gradmatch.engine.blocks import block_entries, row_blocks
from gradmatch.engine.plan import MergePlan, method_inputs
from gradmatch.errors import UserError
from gradmatch.methods import MethodError
from gradmatch.prefetch import BlockInputs, BlockReader

log = logging.getLogger("gradmatch.merge")


# --------------------------------------------------------------------------- execution


def _tensor_seed(seed: int, name: str) -> int:
    """A per-tensor seed that does not depend on the order tensors are processed in."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


def _where(name: str, rows: slice | None) -> str:
    return f"tensor {name!r}" + (f" (rows {rows.start}:{rows.stop})" if rows is not None else "")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _finite(tensor: torch.Tensor) -> bool:
    """No NaN or Inf in ``tensor``: min and max propagate NaN, and are much faster than isfinite().all().
    One aminmax pass: 10x faster than min() and max() on a 2^16-entry block here (53 vs 527 µs)."""
    if not tensor.numel():
        return True
    lo, hi = torch.aminmax(tensor)
    return math.isfinite(float(lo)) and math.isfinite(float(hi))


class Executor:
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
        self.computed = dict.fromkeys(KERNEL_PATHS, 0)  # blocks of merged tensors each path computed
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
        """Block ``rows`` of ``ckpt``'s tensor ``name`` in the compute dtype, a Hessian's values judged as stored: a
        float64 input computed in float32 is converted only after that (−1e-300 would be −0 then, and 1e300 inf)."""
        narrowing = ckpt.info(name).dtype.itemsize > self.compute.itemsize  # float64 stored, float32 computed
        dtype = None if narrowing else self.compute
        tensor = None
        if self._ahead is not None:
            tensor = self.reader.to_device(self._ahead, ckpt, self.device, dtype)
        if tensor is None:
            tensor = ckpt.read(name, rows).to(self.device, dtype)
        stored = tensor if narrowing else None
        if narrowing:
            tensor = tensor.to(self.compute)
        self._loaded.append((ckpt, tensor, stored))
        judged = tensor if stored is None else stored
        if hessian and judged.numel() and float(torch.aminmax(judged).min) < 0:  # NaN: caught as non-finite
            raise UserError(f"{_where(name, rows)} of {ckpt.info(name).file} has negative values (down to "
                            f"{float(judged.min()):.3g}), which a Hessian (a Fisher: mean of squared gradients) cannot have")
        return tensor

    def _blame_non_finite(self, name: str, rows: slice | None) -> None:
        """Name the first input block holding NaN or Inf as stored, if any."""
        for ckpt, tensor, stored in self._loaded:
            if not _finite(tensor if stored is None else stored):
                raise UserError(f"{_where(name, rows)} of {ckpt.info(name).file} holds NaN or Inf values")

    def _overflow(self, name: str, rows: slice | None, out_dtype: torch.dtype) -> UserError:
        """What a block whose merged values are not finite, from finite inputs, ran into: the compute precision
        (float32) where float64 merges it — the block computed again in float64 says — or float64's range too."""
        where = f"{self.method.name}: {_where(name, rows)}"
        if self.compute == torch.float64:
            return UserError(f"{where}: the merged values overflow to NaN or Inf in float64")
        precision, largest = _dtype_name(self.compute), torch.finfo(self.compute).max
        beyond = [(ckpt, stored) for ckpt, tensor, stored in self._loaded if stored is not None and not _finite(tensor)]
        cause = (f"{beyond[0][0].info(name).file} holds {float(beyond[0][1].abs().max()):.3g}, beyond"
                 if beyond else "an intermediate value such as N·F exceeds") + f" {precision}'s largest {largest:.3g}"
        wide = self._in_float64(name, rows)
        if wide is None or not _finite(wide):
            return UserError(f"{where}: the merged values overflow to NaN or Inf, in {precision} ({cause}) and in "
                             "float64 too")
        peak = float(wide.abs().max()) if wide.numel() else 0.0
        if not _finite(wide.to(out_dtype)):
            hint = (f"in float64 the merged values reach {peak:.3g}, beyond the output dtype "
                    f"{_dtype_name(out_dtype)}: --precision float64 with --out-dtype float64 merges it")
        else:
            hint = f"in float64 the merged values are finite (largest {peak:.3g}): --precision float64 merges it"
        return UserError(f"{where}: the computation overflows {precision}, the compute precision ({cause}); {hint}")

    def _in_float64(self, name: str, rows: slice | None) -> torch.Tensor | None:
        """The block merged again in float64 from its stored inputs (None where the method refuses it), to say what
        float64 would do; the executor's state is as before afterwards."""
        saved = self.compute, self._ahead, self._loaded, self._cache_name, self._cache
        self.compute, self._ahead, self._cache_name = torch.float64, None, None
        try:
            self._loaded = []
            kwargs = self._inputs(name, rows)
            if "stats" in self.method.inputs:
                kwargs["stats"] = {}
            return self.method.function(**kwargs, **self.call_params)
        except (MethodError, UserError):
            return None
        finally:
            self.compute, self._ahead, self._loaded, self._cache_name, self._cache = saved

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
            if self._transposed(name):  # a Conv1D weight (in × out): the method takes a Linear's out × in
                kwargs["parent"], kwargs["children"] = kwargs["parent"].t(), [c.t() for c in kwargs["children"]]
        if "cache" in wanted:
            kwargs["cache"] = self._cache
        return {k: v for k, v in kwargs.items() if k in wanted}

    def _compute(self, name: str, rows: slice | None, out_dtype: torch.dtype) -> torch.Tensor:
        # (checkpoint, block in the compute dtype, block as stored where converting it narrowed, else None)
        self._loaded: list[tuple[Checkpoint, torch.Tensor, torch.Tensor | None]] = []
        kwargs = self._inputs(name, rows)
        stats: dict[str, int] = {}
        if "stats" in self.method.inputs:
            kwargs["stats"] = stats
        if not self.method.propagates_nan:
            self._blame_non_finite(name, rows)
            if not all(_finite(tensor) for _, tensor, _ in self._loaded):  # finite as stored, not once converted
                raise self._overflow(name, rows, out_dtype)
        where = _where(name, rows)
        try:
            result = self.method.function(**kwargs, **self.call_params)
        except MethodError as exc:
            self._blame_non_finite(name, rows)
            if not all(_finite(tensor) for _, tensor, _ in self._loaded):
                raise self._overflow(name, rows, out_dtype) from None
            raise UserError(f"{self.method.name}: {where} of {self.plan.parent.info(name).file}: {exc}") from None
        if not _finite(result):
            self._blame_non_finite(name, rows)
            raise self._overflow(name, rows, out_dtype)
        self._count(name, stats)
        self._loaded = []
        return result.t().contiguous() if self._transposed(name) else result

    def _transposed(self, name: str) -> bool:
        """Whether tensor ``name`` is a layer with a Gram stored in × out (transformers Conv1D): the method sees its
        transpose, a Linear's out × in, and the merged weight is turned back."""
        return "grams" in self.method.inputs and name in self.plan.transposed

    def _fused(self, name: str, rows: slice | None, out_dtype: torch.dtype) -> torch.Tensor | None:
        """The merged block from the method's fused kernel, or None where the reference must compute it
        (inputs or output in dtypes the kernels do not take, or a value the kernel leaves to the reference)."""
        from gradmatch import kernels

        if not kernels.writable(out_dtype) or any(kernels.bits_dtype(ckpt.info(name).dtype) is None
                                                  for ckpt in method_inputs(self.plan)):
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
        used = [path for path in KERNEL_PATHS if self.computed[path]]
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
        result = self._compute(name, rows, out_dtype).to("cpu", out_dtype)
        if not _finite(result):  # finite in the compute dtype, but beyond the output dtype's range
            raise UserError(f"{self.method.name}: {_where(name, rows)}: the merged values overflow "
                            f"{str(out_dtype).removeprefix('torch.')} (largest {torch.finfo(out_dtype).max:.4g}); "
                            "choose a wider --out-dtype or smaller weights")
        return result

    def row_blocks(self, name: str) -> list[slice | None]:
        """The blocks of rows in which tensor ``name`` is merged (``[None]``: all at once).

        Elementwise and rowwise methods take a large tensor in blocks of about DEFAULT_BLOCK_ELEMENTS
        entries per input (GPU_BLOCK_ELEMENTS on a GPU; ``block_rows`` rows when given); the others need
        whole tensors, and so does a rowwise method's Conv1D weight (stored in × out).
        """
        info = self.plan.parent.info(name)
        if not (self.method.elementwise or self.method.rowwise) or self._transposed(name):
            return [None]  # (a Conv1D weight's rows are its inputs: the merge of each needs them all)
        return row_blocks(info.shape, gpu=self.device.type != "cpu", rows=self.block_rows)

    def blocks(self) -> list[tuple[str, slice | None]]:
        """Every block of every merged tensor, in the order they are merged."""
        return [(name, rows) for name in self.plan.merged for rows in self.row_blocks(name)]

    def start_reader(self, pinned: bool) -> None:
        """Read each block's inputs on a thread while the block before it is computed (pinned: into
        page-locked buffers, for asynchronous copies to a GPU)."""
        inputs = method_inputs(self.plan)
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
    return block_entries(info.shape, rows) * info.dtype.itemsize


def averaged_blocks(children: list[Checkpoint], name: str, out_dtype: torch.dtype, compute: torch.dtype):
    """The children's plain mean of tensor ``name`` (a head the base lacks and no common initialisation)."""
    for first_row, block in copied_blocks(children[0], name):
        rows = slice(first_row, first_row + block.shape[0]) if block.dim() else None
        total = block.to(compute)
        for child in children[1:]:
            total += child.read(name, rows).to(compute)
        mean = (total / len(children)).to(out_dtype)
        if not _finite(mean):
            raise UserError(f"{_where(name, rows)}: the children's mean overflows {str(out_dtype).removeprefix('torch.')}"
                            " or they hold NaN or Inf values")
        yield first_row, mean


def copied_blocks(parent: Checkpoint, name: str):
    """A tensor the parent gives the output unchanged, in blocks of about DEFAULT_BLOCK_ELEMENTS entries."""
    for rows in row_blocks(parent.info(name).shape):
        yield (0 if rows is None else rows.start), parent.read(name, rows)


#: glibc's mallopt parameters: blocks below this size come from the heap and freed memory is kept for reuse.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _ALLOCATOR_KEEP = -1, -3, 64 << 20


def keep_freed_memory() -> None:
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
