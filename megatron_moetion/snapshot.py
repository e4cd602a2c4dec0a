"""Snapshot engine: copies each iteration's capture items into reused host buffers.

A *window* is one flat host buffer holding ``W`` slots; slot ``k`` holds, for the iteration it
captures, the full state of that slot's ACTIVE operators and the compute weights of the
FROZEN ones (``WindowLayout`` fixes every item's offset). Buffers come from a pool and are
reused, so after warm-up no iteration allocates host memory.

Call order per iteration (one rank)::

    window = engine.begin_window(...)          # at a window's first iteration
    engine.capture(window, slot, items, meta)  # after the optimizer step
    engine.wait_for_copies()                   # before the next optimizer step (GPU)
    engine.seal(window)                        # once the window's last slot is in

On GPU the copies run on a side stream into pinned memory, after an event recorded on the
training stream (the optimizer step is done), and ``wait_for_copies`` makes the training
stream wait for them before the next optimizer step. That is enough only for what the optimizer
step alone writes (main weights, Adam state, compute weights). Capture items that are written
*outside* the optimizer step are marked ``CaptureItem.written_outside_step``: the router buffers
(``expert_bias`` is updated by Megatron's ``finalize_model_grads`` at the end of the next
backward, the token counters are accumulated by the next forward), which the side-stream copy
could otherwise read half-updated. The engine snapshots those on the training stream before
``capture`` returns (a device-side clone, ordered after the step and before the next forward;
they are a few floats per layer), and only the copy of that clone to the host runs on the side
stream. Nothing a side-stream copy reads can therefore change before ``wait_for_copies``.
A window buffer is never handed back to the pool while a copy into it may be pending
(``release`` waits for it), and ``seal`` waits too, before anyone reads the bytes. On CPU the
copies are plain memcpy, done before ``capture`` returns.

With ``interleave`` the asynchronous copies of a capture are not queued at once but staged in
a ``copy_schedule.ChunkedCopies``, which issues them in chunks at the quiet points of the next
forward (no expert-parallel all-to-all in flight); ``wait_for_copies`` and ``synchronize``
issue whatever is left first.

The asynchronous path goes through a *copier* (``host_copy.SideStreamCopies`` on CUDA):
``launch`` queues copies after the work already issued on the training stream,
``order_before_current`` makes the training stream wait for them, ``synchronize`` blocks the
host. Tests inject a copier that defers copies on CPU, to check the ordering rules above
without a GPU.
"""

from __future__ import annotations

import pickle
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from megatron_moetion.copy_schedule import ChunkedCopies
from megatron_moetion.host_copy import CopyTiming, HostBufferPool, SideStreamCopies

ALIGN = 64


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


@dataclass(frozen=True, slots=True)
class ItemSpec:
    """Where one captured tensor region lives in a window buffer (picklable, no tensors)."""

    key: str
    op: str
    mode: str  # "active" or "frozen"
    dtype: str
    numel: int
    offset: int  # bytes from the start of the window buffer

    @property
    def nbytes(self) -> int:
        return self.numel * _dtype(self.dtype).itemsize


@dataclass(frozen=True, slots=True)
class CaptureItem:
    """A live tensor region to capture: ``source`` is a 1-D view of what to copy.

    ``written_outside_step``: the tensor may change before the next optimizer step (router
    buffers: the next forward and backward write them), so an asynchronous capture snapshots it
    on the training stream before ``capture`` returns (see the module docstring).
    """

    key: str
    op: str
    mode: str
    source: torch.Tensor
    written_outside_step: bool = False


@dataclass(frozen=True)
class WindowLayout:
    """Offsets of every item in every slot; identical for all windows of one schedule."""

    slots: tuple[tuple[ItemSpec, ...], ...]
    total_bytes: int

    @classmethod
    def build(cls, slot_items: Sequence[Sequence[CaptureItem]]) -> WindowLayout:
        offset, slots = 0, []
        for items in slot_items:
            specs = []
            for item in items:
                offset = _align(offset)
                spec = ItemSpec(item.key, item.op, item.mode, _dtype_name(item.source.dtype),
                                item.source.numel(), offset)
                specs.append(spec)
                offset += spec.nbytes
            slots.append(tuple(specs))
        return cls(tuple(slots), _align(offset))

    def slot_bytes(self, slot: int) -> int:
        return sum(s.nbytes for s in self.slots[slot])


@dataclass
class Window:
    """One window's snapshots on the rank that took them (or a buddy's verified copy)."""

    window_id: int
    start_iteration: int
    layout: WindowLayout
    buffer: torch.Tensor  # uint8, host (pinned on GPU machines)
    meta: dict = field(default_factory=dict)  # window-level (schedule, operator names)
    slot_meta: dict[int, dict] = field(default_factory=dict)  # per captured slot
    sealed: bool = False
    crc: int | None = None
    meta_blob: bytes | None = None

    @property
    def window(self) -> int:
        return len(self.layout.slots)

    def iteration_of(self, slot: int) -> int:
        return self.start_iteration + slot

    @property
    def complete(self) -> bool:
        return len(self.slot_meta) == self.window

    def view(self, spec: ItemSpec) -> torch.Tensor:
        """A typed 1-D view of one item inside the buffer (no copy)."""
        raw = self.buffer[spec.offset:spec.offset + spec.nbytes]
        return raw.view(_dtype(spec.dtype))

    def items(self, slot: int) -> tuple[ItemSpec, ...]:
        return self.layout.slots[slot]


_TENSOR_TAG = "__moetion_tensor__"


def _encode(obj):
    """Replace tensors by plain (tag, dtype, shape, bytes) tuples so the pickle holds only
    builtins and this module's layout classes (portable, and safe to unpickle restrictedly)."""
    if torch.is_tensor(obj):
        t = obj.detach().to("cpu").contiguous()
        return (_TENSOR_TAG, _dtype_name(t.dtype), tuple(t.shape),
                bytes(t.view(-1).view(torch.uint8).numpy().tobytes()) if t.numel() else b"")
    if isinstance(obj, dict):
        return {k: _encode(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_encode(v) for v in obj)
    return obj


def _decode(obj):
    if isinstance(obj, tuple) and len(obj) == 4 and obj[0] == _TENSOR_TAG:
        _, dtype, shape, raw = obj
        flat = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else \
            torch.empty(0, dtype=torch.uint8)
        return flat.view(_dtype(dtype)).reshape(shape).clone()
    if isinstance(obj, dict):
        return {k: _decode(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_decode(v) for v in obj)
    return obj


class _MetaUnpickler(pickle.Unpickler):
    """Allows builtins and the layout classes of this module, nothing else."""

    _ALLOWED = {("megatron_moetion.snapshot", "WindowLayout"),
                ("megatron_moetion.snapshot", "ItemSpec")}

    def find_class(self, module, name):
        if module == "builtins" and name in {"dict", "list", "tuple", "set", "frozenset",
                                             "int", "float", "bool", "str", "bytes",
                                             "bytearray", "complex"}:
            return super().find_class(module, name)
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"window metadata may not contain {module}.{name}")


def pack_meta(window: Window) -> bytes:
    """Everything of a window besides its tensor bytes, for replication and persistence."""
    return pickle.dumps(_encode({
        "window_id": window.window_id, "start_iteration": window.start_iteration,
        "layout": window.layout, "meta": window.meta, "slot_meta": window.slot_meta,
    }), protocol=pickle.HIGHEST_PROTOCOL)


def unpack_meta(blob: bytes, buffer: torch.Tensor) -> Window:
    import io

    data = _decode(_MetaUnpickler(io.BytesIO(blob)).load())
    return Window(data["window_id"], data["start_iteration"], data["layout"], buffer,
                  data["meta"], data["slot_meta"], sealed=True, meta_blob=blob)


def checksum(buffer: torch.Tensor, nbytes: int | None = None) -> int:
    """CRC-32 of the first ``nbytes`` of a host uint8 tensor (no copy)."""
    n = buffer.numel() if nbytes is None else nbytes
    return zlib.crc32(buffer[:n].numpy())


class SnapshotEngine:
    """Captures operator state into window buffers; see the module docstring for call order.

    Args:
        device: the device the training tensors live on (``cpu`` or a CUDA device).
        stream: side stream for device-to-host copies (CUDA only; created if None).
        copier: the asynchronous copier (default: ``SideStreamCopies`` on CUDA, none on CPU,
            where copies are synchronous); tests inject one to run the asynchronous path on CPU.
    """

    def __init__(self, device: torch.device, stream=None, copier=None):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        if copier is None and self.cuda:
            copier = SideStreamCopies(self.device, stream)
        self.copier = copier
        self.pool = HostBufferPool(pinned=bool(getattr(copier, "pinned", False)))
        self._pending = None  # copier handle of the last capture not known to be done
        self.chunks: ChunkedCopies | None = None
        self.last_copy_s = 0.0
        self._sync_timing = CopyTiming()  # synchronous copies (no copier), timed on the host

    def interleave(self, chunk_bytes: int = 0) -> ChunkedCopies | None:
        """Issue each capture's copies in chunks at quiet points (``copy_schedule``); only
        with an asynchronous copier (on CPU copies are synchronous: nothing to interleave)."""
        if self.copier is not None:
            self.chunks = ChunkedCopies(self.copier, chunk_bytes)
        return self.chunks

    def _issue_all(self):
        """The last capture's copier handle, after issuing any chunks still staged."""
        if self._pending is self.chunks and self.chunks is not None:
            self._pending = self.chunks.flush()
        return self._pending

    def begin_window(self, window_id: int, start_iteration: int, layout: WindowLayout,
                     meta: dict) -> Window:
        buffer = self.pool.get(layout.total_bytes)
        return Window(window_id, start_iteration, layout, buffer, dict(meta))

    def release(self, window: Window | None) -> None:
        if window is not None and window.buffer is not None:
            self.synchronize()  # a pending copy may still be writing into this buffer
            self.pool.put(window.buffer)
            window.buffer = None

    def capture(self, window: Window, slot: int, items: Sequence[CaptureItem],
                meta: dict) -> int:
        """Copy ``items`` (in layout order) into ``slot``; return the bytes copied."""
        specs = window.items(slot)
        if len(specs) != len(items):
            raise ValueError(f"slot {slot} of window {window.window_id} expects {len(specs)} "
                             f"items, got {len(items)}")
        start = time.perf_counter()
        nbytes = 0
        with torch.no_grad():
            if self.copier is None:
                for spec, item in zip(specs, items):
                    window.view(spec).copy_(item.source.reshape(-1))
                    nbytes += spec.nbytes
            else:
                pairs, staged = [], []
                for spec, item in zip(specs, items):
                    src = item.source.reshape(-1)
                    if item.written_outside_step:  # snapshot now, in training-stream order
                        src = src.clone()
                        staged.append(src)
                    pairs.append((window.view(spec), src))
                    nbytes += spec.nbytes
                if self.chunks is not None:
                    self._issue_all()  # an earlier capture's chunks are due before these
                    self.chunks.stage(pairs, staged)
                    self._pending = self.chunks
                else:
                    self._pending = self.copier.launch(pairs, keep_alive=staged)
        window.slot_meta[slot] = dict(meta)
        self.last_copy_s = time.perf_counter() - start
        if self.copier is None:
            self._sync_timing.launched(nbytes, self.last_copy_s)
        return nbytes

    def copy_totals(self) -> tuple[int, float] | None:
        """Bytes and seconds of every snapshot copy that has landed so far (timed on the
        copier's stream where copies are asynchronous); None for a copier that keeps no
        times."""
        if self.copier is None:
            return self._sync_timing.totals()
        totals = getattr(self.copier, "totals", None)
        return totals() if totals is not None else None

    def wait_for_copies(self) -> float:
        """Make the training stream wait for the last capture (GPU); return host seconds."""
        if self._pending is None:
            return 0.0
        start = time.perf_counter()
        handle = self._issue_all()
        if handle is not None:
            self.copier.order_before_current(handle)
        return time.perf_counter() - start

    def synchronize(self) -> None:
        """Block the host until the last capture has landed (before reading the buffer)."""
        handle = self._issue_all()
        if handle is not None:
            self.copier.synchronize(handle)
        self._pending = None

    def seal(self, window: Window) -> None:
        """Freeze a complete window: its metadata blob. The checksum is left to whoever reads
        the bytes next (the replication thread), off the training loop's critical path."""
        if not window.complete:
            raise ValueError(f"window {window.window_id} has {len(window.slot_meta)} of "
                             f"{window.window} slots")
        self.synchronize()
        window.meta_blob = pack_meta(window)
        window.sealed = True

    @staticmethod
    def window_crc(window: Window) -> int:
        """The window's CRC-32, computed once."""
        if window.crc is None:
            window.crc = checksum(window.buffer, window.layout.total_bytes)
        return window.crc
