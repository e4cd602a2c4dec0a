"""Upstream logs: what a rank sent across pipeline boundaries, the data it read, and the
per-iteration global scalars, kept in host memory for as long as recovery may need them.

Three kinds of entries, all keyed by iteration:

* ``boundary``: (iteration, sequence number, 0, direction) -> the tensor exactly as sent
  (``fwd``: activation to the next stage; ``bwd``: gradient to the previous stage; the number
  counts sends per direction: the micro-batch in 1F1B, the position in the neighbour's stream
  in the interleaved schedule; the third slot is unused);
* ``data``: (iteration, index) -> the micro-batch object this rank's data iterator returned;
* ``record``: iteration -> global scalars of that iteration (the grad norm used for clipping,
  found-inf flags, whether the step was applied, micro-batch count, samples consumed).

Entries at or before the start of the persisted window are dropped (``truncate``): replay
never needs them. While window promotion stalls nothing would be dropped, so a host-memory
budget (``window_manager.HostMemoryCap``, ``--moetion-host-memory-cap-mb``) is consulted on
every write and may drop the oldest iterations early (``shed``); either way the *floor* rises
(iterations at or below it are gone, and later writes for them are ignored, so no iteration is
ever held in part) and ``coverage`` reports only the contiguous run of iterations actually held,
which is what recovery planning checks before it relies on a log.

On GPU, boundary tensors are copied on a side stream into pinned memory (the source is kept
alive until the copy ran); on CPU they are cloned. Every accessor that hands out logged values
(``boundary``, ``data``, ``records``, ``data_for``, ``export``) first waits for the pending
copies, so no reader (shipping logs to a recovering peer, replay) can see a tensor still being
written.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from types import MappingProxyType

import torch

from megatron_moetion.host_copy import SideStreamCopies

BoundaryKey = tuple[int, int, int, str]  # iteration, microbatch, chunk, direction


def newest_run(iterations) -> tuple[int, int] | None:
    """(first, last) of the newest run of consecutive ``iterations``, or None if empty."""
    if not iterations:
        return None
    hi = max(iterations)
    lo = hi
    while lo - 1 in iterations:
        lo -= 1
    return lo, hi


def _to_host(obj):
    if torch.is_tensor(obj):
        return obj.detach().to("cpu").clone() if obj.is_cuda else obj
    if isinstance(obj, dict):
        return {k: _to_host(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_to_host(v) for v in obj)
    return obj


def _nbytes(obj) -> int:
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(_nbytes(v) for v in obj)
    return 0


class LogStore:
    """This rank's upstream logs (see module docstring).

    Args:
        device: the training device (CUDA: asynchronous copies into pinned memory).
        copier: the asynchronous copier (default: ``host_copy.SideStreamCopies`` on CUDA, none
            on CPU); tests inject one to run the asynchronous path on CPU.

    Attributes:
        budget: consulted after every write (``budget.check(iteration)``), may call ``shed``.
        floor: iterations at or below it were dropped.
        dropped_iterations: iterations dropped early by ``shed`` (not by ``truncate``).
        peak_iteration_bytes: the most bytes one iteration's entries ever took.
    """

    def __init__(self, device: torch.device, copier=None):
        self.device = torch.device(device)
        if copier is None and self.device.type == "cuda":
            copier = SideStreamCopies(self.device)
        self.copier = copier
        self._boundary: dict[BoundaryKey, torch.Tensor] = {}
        self._data: dict[tuple[int, int], object] = {}
        self._records: dict[int, dict] = {}
        self._bytes: dict[int, int] = {}  # iteration -> bytes held (every iteration with entries)
        self._total = 0
        self._pending = None  # copier handle of the last asynchronous copy not known done
        self.floor = 0
        self.budget = None
        self.dropped_iterations = 0
        self.peak_iteration_bytes = 0

    # --------------------------------------------------------------- accounting
    def _count(self, iteration: int, delta: int) -> None:
        held = self._bytes.get(iteration, 0) + delta
        self._bytes[iteration] = held
        self._total += delta
        self.peak_iteration_bytes = max(self.peak_iteration_bytes, held)

    def _put(self, table: dict, key, iteration: int, value) -> None:
        old = table.get(key)
        if old is not None:
            self._count(iteration, -_nbytes(old))
        table[key] = value
        self._count(iteration, _nbytes(value))

    def _written(self, iteration: int) -> None:
        if self.budget is not None:
            self.budget.check(iteration)

    # --------------------------------------------------------------- writing
    def log_send(self, key: BoundaryKey, tensor: torch.Tensor, *, only_if_missing=False) -> None:
        if key[0] <= self.floor or (only_if_missing and key in self._boundary):
            return
        src = tensor.detach()
        if self.copier is None:
            out = src.clone()
        else:
            out = torch.empty(src.shape, dtype=src.dtype, pin_memory=self.copier.pinned)
            self._pending = self.copier.launch([(out, src)], keep_alive=(src,))
        self._put(self._boundary, key, key[0], out)
        self._written(key[0])

    def log_data(self, iteration: int, index: int, item, *, only_if_missing=False) -> None:
        if iteration <= self.floor or (only_if_missing and (iteration, index) in self._data):
            return
        self._put(self._data, (iteration, index), iteration, _to_host(item))
        self._written(iteration)

    def log_record(self, iteration: int, record: dict) -> None:
        if iteration <= self.floor:
            return
        self._put(self._records, iteration, iteration, dict(record))
        self._written(iteration)

    def synchronize(self) -> None:
        """Wait until every boundary copy has landed (every value accessor calls this)."""
        if self._pending is not None:
            self.copier.synchronize(self._pending)
            self._pending = None

    # --------------------------------------------------------------- reading
    @property
    def boundary(self) -> MappingProxyType:
        self.synchronize()
        return MappingProxyType(self._boundary)

    @property
    def data(self) -> MappingProxyType:
        self.synchronize()
        return MappingProxyType(self._data)

    @property
    def records(self) -> MappingProxyType:
        self.synchronize()
        return MappingProxyType(self._records)

    def data_for(self, iteration: int) -> list:
        self.synchronize()
        items = sorted((idx, v) for (it, idx), v in self._data.items() if it == iteration)
        return [v for _, v in items]

    def iterations(self, kind: str) -> set[int]:
        if kind == "record":
            return set(self._records)
        if kind == "data":
            return {it for it, _ in self._data}
        return {it for it, _, _, d in self._boundary if d == kind}

    def nbytes(self) -> int:
        return self._total

    # --------------------------------------------------------------- lifetime
    def truncate(self, floor: int) -> None:
        """Drop everything of iterations <= ``floor``."""
        self.floor = max(self.floor, floor)
        self._boundary = {k: v for k, v in self._boundary.items() if k[0] > self.floor}
        self._data = {k: v for k, v in self._data.items() if k[0] > self.floor}
        self._records = {k: v for k, v in self._records.items() if k > self.floor}
        for it in [it for it in self._bytes if it <= self.floor]:
            self._total -= self._bytes.pop(it)

    def shed(self, limit_bytes: int, keep_from: int) -> int:
        """Drop the oldest iterations, never ``keep_from`` or later (the iteration being logged,
        which a re-run of an aborted attempt reads back), until at most ``limit_bytes`` are
        held; return how many iterations were dropped."""
        total, floor, dropped = self._total, None, 0
        for it in sorted(self._bytes):
            if total <= limit_bytes or it >= keep_from:
                break
            total -= self._bytes[it]
            floor, dropped = it, dropped + 1
        if floor is not None:
            self.truncate(floor)
            self.dropped_iterations += dropped
        return dropped

    def drop_iteration(self, iteration: int, kinds: Iterable[str] = ("fwd", "bwd")) -> None:
        """Forget what was logged for ``iteration`` (an aborted attempt)."""
        kinds = set(kinds)
        gone = [k for k in self._boundary if k[0] == iteration and k[3] in kinds]
        if "data" in kinds:
            gone_data = [k for k in self._data if k[0] == iteration]
        else:
            gone_data = []
        for k in gone:
            self._count(iteration, -_nbytes(self._boundary.pop(k)))
        for k in gone_data:
            self._count(iteration, -_nbytes(self._data.pop(k)))
        if "record" in kinds and iteration in self._records:
            self._count(iteration, -_nbytes(self._records.pop(iteration)))

    def wipe(self) -> None:
        """Forget everything (lose_state), including what was dropped: a wiped rank rebuilds
        its logs from whatever iterations its recovery replays."""
        self._boundary.clear()
        self._data.clear()
        self._records.clear()
        self._bytes.clear()
        self._total = 0
        self.floor = 0

    # --------------------------------------------------------------- shipping
    def export(self, kind: str, iterations: Iterable[int]) -> bytes:
        """Serialise the entries of ``kind`` for ``iterations`` (tensors as raw tensors)."""
        self.synchronize()
        its = set(iterations)
        if kind == "record":
            payload = {it: self._records[it] for it in sorted(its) if it in self._records}
        elif kind == "data":
            payload = {k: v for k, v in self._data.items() if k[0] in its}
        else:
            payload = {k: v for k, v in self._boundary.items() if k[0] in its and k[3] == kind}
        return LogStore.encode(payload)

    @staticmethod
    def encode(entries: dict) -> bytes:
        """Entries as ``export`` ships them (``decode`` reads them back)."""
        buf = io.BytesIO()
        torch.save(entries, buf)
        return buf.getvalue()

    @staticmethod
    def decode(blob: bytes) -> dict:
        return torch.load(io.BytesIO(blob), weights_only=False)

    def absorb(self, kind: str, entries: dict) -> None:
        """Keep data or records received from another rank: a failed rank rebuilds its own
        logs this way (boundary logs it rebuilds by logging its replayed sends). Received
        entries are kept even below the floor: the replay they were sent for reads them."""
        if kind == "record":
            for it, rec in entries.items():
                if it not in self._records:
                    self._put(self._records, it, it, rec)
        elif kind == "data":
            for k, v in entries.items():
                if k not in self._data:
                    self._put(self._data, k, k[0], v)
        else:
            raise ValueError(f"cannot absorb {kind!r} entries; only 'data' and 'record'")

    def coverage(self, kind: str) -> tuple[int, int] | None:
        """(first, last) of the newest contiguous run of iterations held for ``kind``, or None.
        An iteration missing in the middle (dropped, or never logged) ends the run there, so a
        range reported here is one whose every iteration is held."""
        return newest_run(self.iterations(kind))
