"""Fused CPU kernels: a merge formula in one pass over its inputs as stored, compiled by numba.

The methods' formulas (``gradmatch.methods``) are whole-tensor torch operations on float32 copies of
the inputs: at T = 4 gradient matching makes about 25 passes over each block besides converting its ten
inputs, and at LLM size in bf16 it ran at 2.6x the time of merely reading and converting every input
once (docs/benchmarks.md). A kernel here computes the same formula in float32 entry by entry, reading
each input where it was read (bf16, fp16, float32 or float64, as stored) and writing the output dtype
(bf16, fp16 or float32) directly: one pass, in chunks that stay in the L1 cache.

A kernel does not judge: it counts what the reference formula would refuse or flag (a negative Hessian
entry, a denominator that is not positive, a result that is not finite in the output dtype) and
returns the counts; the engine computes a flagged block again with the reference, which names the
problem. With a removal (some α_t < 0) a non-positive denominator is no error but the guard's case: the
kernel applies the guard and counts the entries it bounded. Compiled on first use (one to two seconds
per method and number of children) and cached on disk beside this file (numba's ``cache=True``; a
user-wide cache directory where this one cannot be written; compiled in each process where neither can).
"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["bits", "bits_dtype", "gradient_matching", "task_arithmetic", "writable"]

#: Entries per chunk: each chunk's scratch (a few float32 arrays) stays in the L1 cache.
CHUNK = 1024

# Counts a kernel returns (indices into its int64 result).
NEGATIVE_HESSIAN, NONPOSITIVE_DENOMINATOR, NONFINITE, GUARDED = range(4)


# --- bit-level conversions (LLVM bitcasts: they vectorise) -------------------------------------------

@intrinsic
def _f32_from_bits(typingctx, bits):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.uint32), codegen


@intrinsic
def _bits_from_f32(typingctx, x):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))
    return types.uint32(types.float32), codegen


@intrinsic
def _f32_from_f16_bits(typingctx, bits):
    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
    return types.float32(types.uint16), codegen


@intrinsic
def _f16_bits_from_f32(typingctx, x):
    def codegen(context, builder, signature, args):  # IEEE round to nearest even, overflow to ±inf
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))
    return types.uint16(types.float32), codegen


def load(a, i):  # pragma: no cover - replaced by the overload inside compiled code
    """Entry ``i`` of ``a`` as float32 (int16: bf16 bits; uint16: fp16 bits)."""
    raise NotImplementedError


@overload(load, inline="always")
def _load(a, i):
    if a.dtype == types.int16:  # bf16: the high half of a float32
        return lambda a, i: _f32_from_bits(np.uint32(np.uint16(a[i])) << np.uint32(16))
    if a.dtype == types.uint16:
        return lambda a, i: _f32_from_f16_bits(a[i])
    if a.dtype in (types.float32, types.float64):
        return lambda a, i: np.float32(a[i])
    return None


def is_negative(a, i, f):  # pragma: no cover - replaced by the overload inside compiled code
    """Whether entry ``i`` of ``a`` (``f``: its float32 value) is negative as stored: a float64 entry is judged
    before conversion (−1e-300 is −0 in float32); the other dtypes convert to float32 exactly."""
    raise NotImplementedError


@overload(is_negative, inline="always")
def _negative(a, i, f):
    if a.dtype == types.float64:
        return lambda a, i, f: a[i] < 0
    return lambda a, i, f: f < 0


def store(out, i, x):  # pragma: no cover - replaced by the overload inside compiled code
    """Write float32 ``x`` into ``out[i]`` in ``out``'s dtype; 1 if the stored value is not finite, else 0."""
    raise NotImplementedError


@overload(store, inline="always")
def _store(out, i, x):
    if out.dtype == types.int16:  # bf16, rounded to nearest even as torch does; NaN stays a (quiet) NaN
        def impl(out, i, x):
            u = _bits_from_f32(x)
            rounded = (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
            nan = np.uint32(np.isnan(x))
            bits = rounded * (np.uint32(1) - nan) + np.uint32(0x7FC0) * nan
            out[i] = np.int16(np.uint16(bits))
            return np.int64((bits & np.uint32(0x7F80)) == np.uint32(0x7F80))
        return impl
    if out.dtype == types.uint16:
        def impl(out, i, x):
            bits = _f16_bits_from_f32(x)
            out[i] = bits
            return np.int64((bits & np.uint16(0x7C00)) == np.uint16(0x7C00))
        return impl
    if out.dtype == types.float32:
        def impl(out, i, x):
            out[i] = x
            return np.int64((_bits_from_f32(x) & np.uint32(0x7F800000)) == np.uint32(0x7F800000))
        return impl
    return None


# --- the formulas ------------------------------------------------------------------------------------

def _compiled(function):
    """``function`` compiled by numba (GIL released; IEEE division: x/0 is ±inf or NaN, not an exception),
    cached on disk where numba finds a writable place for it, else compiled anew in each process."""
    options = {"nogil": True, "error_model": "numpy", "boundscheck": False}
    try:
        return njit(cache=True, **options)(function)
    except RuntimeError:  # no cache locator: an installation and a home that cannot be written
        return njit(**options)(function)


@_compiled
def _gradient_matching(out, parent, children, parent_fisher, fishers, alphas, scales, alpha_scales,
                       parent_scale, delta_0, guard, radius_scales):  # pragma: no cover - compiled
    n = out.shape[0]
    T = len(children)
    chunks = (n + CHUNK - 1) // CHUNK
    negative = 0
    nonpositive = 0
    nonfinite = 0
    guarded = 0
    theta0 = np.empty(CHUNK, np.float32)
    H0 = np.empty(CHUNK, np.float32)
    D = np.empty(CHUNK, np.float32)
    num = np.empty(CHUNK, np.float32)
    rho = np.empty(CHUNK, np.float32)
    for k in range(chunks):
        start = k * CHUNK
        m = min(CHUNK, n - start)
        p0 = parent[start:start + m]
        f0 = parent_fisher[start:start + m]
        neg = 0
        for j in range(m):
            f = load(f0, j)
            neg += is_negative(f0, j, f)
            h = f * parent_scale + delta_0  # H_0 = N_0 F_0 + δ
            theta0[j] = load(p0, j)
            H0[j] = h
            D[j] = h
            num[j] = 0
            rho[j] = 0
        for t in range(T):
            c = children[t][start:start + m]
            ft = fishers[t][start:start + m]
            a = alphas[t]
            s = scales[t]
            aS = alpha_scales[t]
            for j in range(m):
                f = load(ft, j)
                neg += is_negative(ft, j, f)
                tau = load(c, j) - theta0[j]
                D[j] += aS * f  # + α_t N_t F_t
                num[j] += a * ((H0[j] + s * f) * tau)  # + α_t (H_0 + H_t) τ_t
            if guard:
                r = radius_scales[t]
                for j in range(m):
                    rho[j] += r * abs(load(c, j) - theta0[j])  # ρ = R Σ_t |α_t τ_t|
        o = out[start:start + m]
        bad = 0
        inf = 0
        clipped = 0
        if guard:
            for j in range(m):
                d = D[j]
                x = num[j]
                bound = rho[j]
                if d > 0:
                    step = x / d
                    if step > bound:
                        step = bound
                        clipped += 1
                    elif step < -bound:
                        step = -bound
                        clipped += 1
                else:  # the end of the trust region the objective descends to; sign(0) = 0, NaN stays NaN
                    step = bound if x > 0 else (-bound if x < 0 else x * bound)
                    clipped += 1
                inf += store(o, j, theta0[j] + step)
        else:
            for j in range(m):
                d = D[j]
                bad += not (d > 0)
                inf += store(o, j, theta0[j] + num[j] / d)
        negative += neg
        nonpositive += bad
        nonfinite += inf
        guarded += clipped
    result = np.zeros(4, np.int64)
    result[NEGATIVE_HESSIAN] = negative
    result[NONPOSITIVE_DENOMINATOR] = nonpositive
    result[NONFINITE] = nonfinite
    result[GUARDED] = guarded
    return result


@_compiled
def _task_arithmetic(out, parent, children, weights):  # pragma: no cover - compiled
    n = out.shape[0]
    T = len(children)
    chunks = (n + CHUNK - 1) // CHUNK
    nonfinite = 0
    theta0 = np.empty(CHUNK, np.float32)
    merged = np.empty(CHUNK, np.float32)
    for k in range(chunks):
        start = k * CHUNK
        m = min(CHUNK, n - start)
        p0 = parent[start:start + m]
        for j in range(m):
            theta0[j] = load(p0, j)
            merged[j] = theta0[j]
        for t in range(T):
            c = children[t][start:start + m]
            w = weights[t]
            for j in range(m):
                merged[j] += w * (load(c, j) - theta0[j])  # + λ α_t τ_t / Z
        o = out[start:start + m]
        inf = 0
        for j in range(m):
            inf += store(o, j, merged[j])
        nonfinite += inf
    result = np.zeros(4, np.int64)
    result[NONFINITE] = nonfinite
    return result


# --- arrays in, arrays out ---------------------------------------------------------------------------

def bits_dtype(dtype: torch.dtype) -> np.dtype | None:
    """The numpy dtype of the flat arrays that carry values stored in torch ``dtype`` to the kernels (bf16 as
    its int16 bits, fp16 as its uint16 bits); None for a dtype the kernels do not read."""
    return _bits_dtypes().get(dtype)


@functools.cache
def _bits_dtypes() -> dict:
    import torch
    return {torch.bfloat16: np.dtype(np.int16), torch.float16: np.dtype(np.uint16),
            torch.float32: np.dtype(np.float32), torch.float64: np.dtype(np.float64)}


def writable(dtype: torch.dtype) -> bool:
    """The kernels write outputs in this dtype."""
    import torch
    return dtype in (torch.bfloat16, torch.float16, torch.float32)


def bits(tensor: torch.Tensor) -> np.ndarray:
    """A contiguous CPU tensor's entries as the flat array a kernel reads or writes in place."""
    import torch
    if not tensor.is_contiguous():
        raise ValueError("the kernels take contiguous tensors")
    as_int = {torch.bfloat16: torch.int16, torch.float16: torch.uint16}.get(tensor.dtype, tensor.dtype)
    return tensor.reshape(-1).view(as_int).numpy()


def _float32(array: np.ndarray) -> np.ndarray:
    """The values of a bits array as float32 (a copy)."""
    if array.dtype == np.int16:  # bf16: the high half of a float32
        return (array.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    if array.dtype == np.uint16:
        return array.view(np.float16).astype(np.float32)
    return array.astype(np.float32)


def _group(arrays) -> tuple:
    """A tuple of arrays of one type, which a kernel indexes by child: float32 copies where the dtypes differ
    (children stored in different dtypes)."""
    if len({a.dtype for a in arrays}) > 1:
        return tuple(_float32(a) for a in arrays)
    return tuple(arrays)


@functools.lru_cache(maxsize=64)
def _constants(*values: tuple[float, ...]) -> tuple[np.ndarray, ...]:
    """Per-child constants as float32 arrays, made once per merge rather than once per block."""
    return tuple(np.asarray(v, np.float32) for v in values)


def _run(kernel, out: np.ndarray, per_entry: tuple, rest: tuple, threads: int) -> np.ndarray:
    """``kernel`` over ``out`` and the same entries of the arrays in ``per_entry`` (arrays or tuples of
    arrays), on ``threads`` threads that each take a contiguous part (the kernels release the GIL);
    the counts of the parts summed."""
    n = out.shape[0]
    parts = max(1, min(threads, n // (16 * CHUNK)))  # a part below 16 chunks is not worth a thread
    if parts == 1:
        return kernel(out, *per_entry, *rest)
    bounds = [n * i // parts // CHUNK * CHUNK for i in range(parts)] + [n]

    def part(i: int) -> np.ndarray:
        cut = slice(bounds[i], bounds[i + 1])
        args = [tuple(a[cut] for a in x) if isinstance(x, tuple) else x[cut] for x in per_entry]
        return kernel(out[cut], *args, *rest)

    return sum(_pool(parts).map(part, range(parts)))


@functools.cache
def _pool(workers: int) -> ThreadPoolExecutor:
    """A pool of ``workers`` threads, made once (the merge calls the kernels for every block)."""
    return ThreadPoolExecutor(workers, thread_name_prefix="gradmatch-kernel")


def gradient_matching(out: np.ndarray, parent: np.ndarray, children, parent_fisher: np.ndarray, fishers, *,
                      alphas, parent_scale: float, scales, delta_0: float, max_update_ratio: float, stats: dict,
                      threads: int = 1) -> bool:
    """gradmatch.methods.gradient_matching's formula (with its guard where some α_t < 0) into ``out``.

    Every argument array is flat, of one length, in the bits form of :func:`bits_dtype`. False when the
    block needs the reference formula, which names the problem: a negative Hessian entry, a denominator
    that is not positive (without the guard) or a result that is not finite in ``out``'s dtype. With the
    guard, the entries it bounded are added to ``stats["guarded_entries"]``.
    """
    guard = any(a < 0 for a in alphas)
    constants = _constants(tuple(alphas), tuple(scales), tuple(a * s for a, s in zip(alphas, scales)),
                           tuple(abs(a) * max_update_ratio for a in alphas))
    rest = (*constants[:3], np.float32(parent_scale), np.float32(delta_0), guard, constants[3])
    counts = _run(_gradient_matching, out, (parent, _group(children), parent_fisher, _group(fishers)), rest, threads)
    if counts[NEGATIVE_HESSIAN] or counts[NONFINITE] or (counts[NONPOSITIVE_DENOMINATOR] and not guard):
        return False
    if guard:
        stats["guarded_entries"] = stats.get("guarded_entries", 0) + int(counts[GUARDED])
    return True


def task_arithmetic(out: np.ndarray, parent: np.ndarray, children, *, weights, threads: int = 1) -> bool:
    """θ_0 + Σ_t w_t (θ_t − θ_0) into ``out`` (w_t = λ α_t / Z in gradmatch.methods.task_arithmetic);
    False where a result is not finite in ``out``'s dtype (the reference then names the input)."""
    counts = _run(_task_arithmetic, out, (parent, _group(children)), _constants(tuple(weights)), threads)
    return not counts[NONFINITE]
