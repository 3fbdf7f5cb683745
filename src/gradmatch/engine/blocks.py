"""Blocks of rows: the unit in which the engine reads, merges, copies and writes a large tensor."""

from __future__ import annotations

import math
from collections.abc import Sequence

#: Elementwise methods read a large tensor in blocks of rows holding about this many entries per input.
#: 2^17 (64 rows of a 2048-wide LLM matrix): a 0.5B-parameter bf16 merge took 2.9 s (task arithmetic) and
#: 6.6 s (gradient matching) against 3.3 s and 7.8 s with 2^16 (fixed costs per block) and 2.5-3.9 s and
#: 7.6 s with 2^18 (blocks no longer fit the caches), best of 3-4 interleaved runs on the shared 2-core machine.
DEFAULT_BLOCK_ELEMENTS = 1 << 17
#: The same on a GPU: per-block costs there are kernel launches and host-device synchronisations (the
#: finiteness checks), so blocks are 32x larger: 8 MB of bf16 per input (the pinned pool: 4 blocks per input).
GPU_BLOCK_ELEMENTS = 1 << 22


def row_entries(shape: Sequence[int]) -> int:
    """Entries in one row (along the first dimension) of a tensor of ``shape``; 1 for a scalar or an empty one."""
    return max(1, math.prod(shape[1:])) if shape else 1


def block_entries(shape: Sequence[int], rows: slice | None) -> int:
    """Entries in the block ``rows`` of a tensor of ``shape`` (``None``: all of it)."""
    if rows is None:
        return math.prod(shape) if shape else 1
    return len(range(*rows.indices(shape[0]))) * (math.prod(shape[1:]) if shape else 1)


def row_blocks(shape: Sequence[int], *, gpu: bool = False, rows: int | None = None) -> list[slice | None]:
    """The blocks of rows a tensor of ``shape`` is taken in: about DEFAULT_BLOCK_ELEMENTS entries each
    (GPU_BLOCK_ELEMENTS on a GPU), or ``rows`` rows when given; ``[None]`` (all at once) for a scalar or a
    tensor that fits in one block."""
    if not shape:
        return [None]
    elements = GPU_BLOCK_ELEMENTS if gpu else DEFAULT_BLOCK_ELEMENTS
    step = rows or max(1, elements // row_entries(shape))
    if step >= shape[0]:
        return [None]
    return [slice(start, min(start + step, shape[0])) for start in range(0, shape[0], step)]
