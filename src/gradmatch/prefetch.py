"""Reading a merge's next blocks while the current one is computed: a reader thread that fills the
block inputs ahead (into reused pinned host buffers when the compute device is a GPU)."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch

from gradmatch.checkpoints import Checkpoint
from gradmatch.engine.blocks import block_entries

#: One block of a merge: a tensor name and its rows (None: the whole tensor).
Block = tuple[str, "slice | None"]


@dataclass
class _Buffer:
    """A reused host buffer (pinned for a GPU) and the event after which its last copy to the device is done."""

    data: torch.Tensor
    copied: torch.cuda.Event | None = None


@dataclass
class BlockInputs:
    """The inputs of one block, read ahead: a tensor per checkpoint, in its stored dtype."""

    block: Block
    tensors: dict[int, torch.Tensor] = field(default_factory=dict)  # id(checkpoint) -> tensor
    buffers: dict[int, _Buffer] = field(default_factory=dict)


class BlockReader:
    """Reads the inputs of ``blocks`` (every checkpoint of ``checkpoints`` for each block, in order) on a
    thread, at most ``ahead`` blocks before the block being computed.

    ``pinned``: read into page-locked host buffers, ``ahead + 2`` per checkpoint, reused; a buffer is
    refilled only after the copy that :meth:`to_device` started from it has finished (a CUDA event), so
    the copies to the GPU can be asynchronous. Without it every block gets fresh tensors, converted to
    ``convert`` (the compute dtype) on the reader thread when given and the stored dtype is not wider.
    Errors of the thread (a file that cannot be read) are raised where the block is taken.
    """

    def __init__(self, checkpoints: list[Checkpoint], blocks: Iterable[Block], *, ahead: int = 1,
                 pinned: bool = False, block_bytes: int = 0, convert: torch.dtype | None = None):
        self.checkpoints = checkpoints
        self.pinned = pinned
        self.convert = None if pinned else convert
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, ahead))
        self._stop = threading.Event()
        self._pools: dict[int, queue.Queue] = {}
        if pinned:
            for ckpt in checkpoints:
                pool: queue.Queue = queue.Queue()
                for _ in range(ahead + 2):
                    # page-locked where a GPU exists (on a CPU-only build the same pool logic runs on plain memory)
                    data = torch.empty(block_bytes, dtype=torch.uint8, pin_memory=torch.cuda.is_available())
                    pool.put(_Buffer(data))
                self._pools[id(ckpt)] = pool
        self._thread = threading.Thread(target=self._run, args=(iter(blocks),), name="gradmatch-reader", daemon=True)
        self._thread.start()

    def _run(self, blocks: Iterator[Block]) -> None:
        try:
            for block in blocks:
                name, rows = block
                item = BlockInputs(block)
                for ckpt in self.checkpoints:
                    buffer = self._buffer(ckpt, name, rows) if self.pinned else None
                    if buffer is not None:
                        item.buffers[id(ckpt)] = buffer
                    tensor = ckpt.read(name, rows, out=None if buffer is None else buffer.data)
                    # a float64 input computed in float32 stays as stored: its values are judged before conversion
                    narrowing = self.convert is not None and tensor.dtype.itemsize > self.convert.itemsize
                    item.tensors[id(ckpt)] = tensor if self.convert is None or narrowing else tensor.to(self.convert)
                if not self._put(item):
                    return
        except _Stopped:
            return
        except BaseException as exc:  # handed to the consumer, raised where it takes the block
            self._put(exc)
            return
        self._put(None)

    def _buffer(self, ckpt: Checkpoint, name: str, rows: slice | None) -> _Buffer | None:
        """A free pinned buffer of ``ckpt`` large enough for the block (None: read into a fresh tensor)."""
        info = ckpt.info(name)
        n = block_entries(info.shape, rows)
        pool = self._pools[id(ckpt)]
        while not self._stop.is_set():
            try:
                buffer = pool.get(timeout=0.1)
            except queue.Empty:
                continue
            if n * info.dtype.itemsize > buffer.data.numel():
                pool.put(buffer)
                return None
            if buffer.copied is not None:
                buffer.copied.synchronize()  # its last copy to the device has finished
            return buffer
        raise _Stopped

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def next(self, block: Block) -> BlockInputs:
        """The inputs of ``block``, which must be the next block of the plan."""
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        if item is None or item.block[0] != block[0] or _start(item.block[1]) != _start(block[1]):
            raise RuntimeError(f"the block reader is out of step: expected {block}, got {item and item.block}")
        return item

    def to_device(self, item: BlockInputs, ckpt: Checkpoint, device: torch.device,
                  dtype: torch.dtype | None) -> torch.Tensor | None:
        """``ckpt``'s tensor of ``item`` on ``device`` in ``dtype`` (None: as read), or None when it was not
        read ahead. From a reused buffer the result is always a copy, and the buffer goes back to its pool."""
        tensor = item.tensors.pop(id(ckpt), None)
        if tensor is None:
            return None
        dtype = dtype or tensor.dtype
        buffer = item.buffers.pop(id(ckpt), None)
        if buffer is None:
            result = tensor.to(device, dtype)
        elif device.type == "cpu":
            result = tensor.to(dtype, copy=True)  # never a view of the buffer, which is refilled next
        else:  # an asynchronous copy of the stored bytes, then the conversion on the device (stream-ordered)
            result = tensor.to(device, non_blocking=True).to(dtype)
        if buffer is not None:
            if device.type == "cuda":
                buffer.copied = torch.cuda.Event()
                buffer.copied.record()
            self._pools[id(ckpt)].put(buffer)
        return result

    def release(self, item: BlockInputs) -> None:
        """Give back the buffers of inputs that were read ahead but not used."""
        for key, buffer in item.buffers.items():
            self._pools[key].put(buffer)
        item.buffers.clear()
        item.tensors.clear()

    def close(self) -> None:
        self._stop.set()
        while True:  # unblock a reader waiting for room
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, BlockInputs):
                self.release(item)
        self._thread.join()


class _Stopped(Exception):
    """The consumer closed the reader."""


def _start(rows: slice | None) -> int:
    return 0 if rows is None else rows.start
