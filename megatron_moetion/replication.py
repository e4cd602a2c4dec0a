"""Buddy replication: ship each sealed window to ``r`` buddy ranks in the background.

Every rank runs the same replication *rounds* in the same order (the decision to start a round
is taken from values all ranks agreed on), so in round ``j`` of a window each rank sends its
window to ``buddies[j]`` while receiving ``owners[j]``'s. A receiver keeps a copy only if both
checksums match and acknowledges it; a window is *acked* on its owner once every buddy
acknowledged it. A failed or slow round never raises into training: it is logged and counted,
and the window simply stays un-acked.

What a rank keeps for each rank it is a buddy of is bounded whether or not promotion keeps up:
the copy of the persisted window and the newest copy (plus the one arriving). A copy between
the two can never become the persisted window (only the newest shipped window is ever
promoted), so it is returned to the host-buffer pool as soon as a newer one is kept.

Where a rank's data cannot be re-read from a pipeline partner (PP = 1), it also ships the
micro-batches it reads to the same buddies, one small *data round* per iteration
(``ship_data``), queued on the same thread in the same order on every rank. A buddy keeps them
(``DataCopies``) until they fall below the persisted window's start (``truncate_data``), so a
failed rank's replay can read them back. Data rounds are not acknowledged: a missing iteration
shows as a gap in ``data_held`` coverage, and a recovery that needs it falls back.

The group is gloo on every machine: the windows live in (pinned) host memory, and this module's
thread must never issue NCCL operations concurrently with training's (docs/design.md).

Call order (all ranks)::

    start_round(window)        # main thread, at a window boundary
    ... status() ...           # any time: latest finished round, latest acked window
    quiesce()                  # before recovery uses the same group from the main thread
    replica(owner, window_id)  # a verified copy held here
    close()
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from dataclasses import dataclass, field

import torch

from megatron_moetion.host_copy import HostBufferPool
from megatron_moetion.snapshot import SnapshotEngine, Window, unpack_meta
from megatron_moetion.transport import Parcel, ProcessGroupTransport
from megatron_moetion.upstream_log import LogStore, newest_run

logger = logging.getLogger(__name__)

ROUND_TAG = 100  # tags 100.. are replication rounds; recovery uses its own range
DATA_TAG = 300  # tags 300.. are data rounds
PROBE_TAG = 400  # the start-up bandwidth probe


@dataclass
class RoundStats:
    window_id: int
    ok: bool
    seconds: float
    bytes_sent: int
    reason: str = ""


@dataclass
class ReplicaStore:
    """Verified copies of other ranks' windows held on this rank."""

    copies: dict[int, dict[int, Window]] = field(default_factory=dict)  # owner -> id -> window

    def put(self, owner: int, window: Window) -> None:
        self.copies.setdefault(owner, {})[window.window_id] = window

    def get(self, owner: int, window_id: int) -> Window | None:
        return self.copies.get(owner, {}).get(window_id)

    def held(self) -> dict[int, list[int]]:
        return {o: sorted(w) for o, w in self.copies.items() if w}

    def drop(self, keep: set[int], pool: HostBufferPool) -> None:
        for windows in self.copies.values():
            for wid in [w for w in windows if w not in keep]:
                pool.put(windows.pop(wid).buffer)

    def drop_between(self, owner: int, floor: int, newest: int, pool: HostBufferPool) -> None:
        """Return ``owner``'s copies newer than ``floor`` (the persisted window) and older than
        ``newest`` to the pool: none of them can be persisted any more."""
        windows = self.copies.get(owner, {})
        for wid in [w for w in windows if floor < w < newest]:
            pool.put(windows.pop(wid).buffer)

    def clear(self, pool: HostBufferPool) -> None:
        self.drop(set(), pool)

    def nbytes(self) -> int:
        return sum(w.buffer.numel() for ws in self.copies.values() for w in ws.values())


class DataCopies:
    """The micro-batches other ranks read, held here: owner -> iteration -> serialized entries
    (``LogStore.export("data", ...)``, decoded only when a recovery needs them)."""

    def __init__(self):
        self.blobs: dict[int, dict[int, bytes]] = {}
        self.peak_iteration_bytes = 0

    def put(self, owner: int, iteration: int, blob: bytes) -> None:
        self.blobs.setdefault(owner, {})[iteration] = blob
        self.peak_iteration_bytes = max(self.peak_iteration_bytes, len(blob))

    def coverage(self, owner: int) -> tuple[int, int] | None:
        """(first, last) of the newest contiguous run of ``owner``'s iterations held here."""
        return newest_run(set(self.blobs.get(owner, ())))

    def export(self, owner: int, iterations) -> bytes:
        """``owner``'s entries of ``iterations`` in ``LogStore.export``'s format."""
        entries = {}
        for it in iterations:
            blob = self.blobs.get(owner, {}).get(it)
            if blob is not None:
                entries.update(LogStore.decode(blob))
        return LogStore.encode(entries)

    def truncate(self, floor: int) -> None:
        for its in self.blobs.values():
            for it in [i for i in its if i <= floor]:
                del its[it]

    def clear(self) -> None:
        self.blobs.clear()

    def nbytes(self) -> int:
        return sum(len(b) for its in self.blobs.values() for b in its.values())


class Replicator:
    """Background buddy replication (see module docstring).

    Args:
        transport: point-to-point transport on MoEtion's replication group.
        buddies: ranks this rank sends to, ``buddies[j]`` in round step ``j``.
        owners: ranks this rank receives from, ``owners[j]`` in step ``j``.
        pool: where received copies get their buffers.
    """

    def __init__(self, transport: ProcessGroupTransport, buddies: list[int], owners: list[int],
                 pool: HostBufferPool):
        self.transport = transport
        self.buddies = list(buddies)
        self.owners = list(owners)
        self.pool = pool
        self.store = ReplicaStore()
        self.data = DataCopies()
        self.data_bytes_sent = 0
        self.data_failures = 0
        self._lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue()
        self._idle = threading.Event()
        self._idle.set()
        self._generation = 0  # bumped by wipe(): results of a round in flight are dropped
        self.finished_round = -1  # window id of the latest finished round (ok or not)
        self.acked_window = -1  # latest own window every buddy acknowledged
        self.history: list[RoundStats] = []
        self.failures = 0
        self.corrupt_detected = 0
        self.persisted_floor = -1  # the persisted window (drop_older_than): copies kept
        self.largest_copy = 0  # bytes of the largest copy kept (host-memory cap sizing)
        self._thread = threading.Thread(target=self._run, name="moetion-replication", daemon=True)
        self._thread.start()

    def rebind(self, transport: ProcessGroupTransport | None) -> None:
        """The transport of a new generation's replication group (None: between two)."""
        self.transport = transport

    def continue_rounds(self, last_round: int) -> None:
        """A reserve rank: the job's rounds so far count as finished here (none is in flight)."""
        with self._lock:
            self.finished_round = int(last_round)

    def start_round(self, window: Window | None, corrupt: bool = False,
                    window_id: int | None = None) -> None:
        """Queue ``window`` (sealed) for replication; returns at once. ``window=None`` takes
        part in round ``window_id`` without a window (this rank lost it): the buddies keep
        nothing and it is never acked. Without buddies the round is finished (and the window
        acked) at once: snapshots stay local only."""
        wid = window.window_id if window is not None else window_id
        if not self.buddies:
            with self._lock:
                self.finished_round = max(self.finished_round, wid)
                if window is not None:
                    self.acked_window = max(self.acked_window, wid)
            return
        self._idle.clear()
        self._queue.put((window, wid, corrupt))

    def probe_bandwidth(self, nbytes: int = 32 << 20, repeats: int = 2) -> float:
        """Bytes/s this rank sends to its first buddy while every rank does the same
        (collective over the replication group: every rank calls it at the same point, before
        any round). ``math.inf`` without buddies (nothing to replicate)."""
        if not self.buddies:
            return math.inf
        data = torch.zeros(nbytes, dtype=torch.uint8)
        parcel = Parcel(data, b"", (0, 3), 0)
        best = math.inf
        for _ in range(repeats):
            start = time.perf_counter()
            got = self.transport.exchange(send_to=self.buddies[0], parcel=parcel,
                                          recv_from=self.owners[0], tag=PROBE_TAG)
            best = min(best, time.perf_counter() - start)
            del got
        return nbytes / max(best, 1e-9)

    def ship_data(self, iteration: int, blob: bytes) -> None:
        """Queue a data round: ``blob`` (the micro-batches this rank read in ``iteration``) to
        every buddy, while receiving each owner's of the same iteration; returns at once."""
        if not self.buddies:
            return
        self._idle.clear()
        self._queue.put(("data", iteration, blob))

    def data_held(self) -> dict[int, tuple[int, int] | None]:
        """owner -> the iterations of its micro-batches held here (``DataCopies.coverage``)."""
        with self._lock:
            return {o: self.data.coverage(o) for o in self.data.blobs}

    @property
    def data_peak_iteration_bytes(self) -> int:
        """The most bytes one owner's micro-batches of one iteration took here."""
        return self.data.peak_iteration_bytes

    def data_export(self, owner: int, iterations) -> bytes:
        with self._lock:
            return self.data.export(owner, iterations)

    def truncate_data(self, floor: int) -> None:
        """Drop the micro-batches of iterations <= ``floor`` (no replay reads them)."""
        with self._lock:
            self.data.truncate(floor)

    def quiesce(self, timeout_s: float) -> bool:
        """Wait until no round is queued or running; False on timeout."""
        return self._idle.wait(timeout_s)

    def status(self) -> tuple[int, int]:
        with self._lock:
            return self.finished_round, self.acked_window

    def replica(self, owner: int, window_id: int) -> Window | None:
        with self._lock:
            return self.store.get(owner, window_id)

    def held(self) -> dict[int, list[int]]:
        with self._lock:
            return self.store.held()

    def drop_older_than(self, window_id: int) -> None:
        """Free every copy older than ``window_id`` (the persisted window); newer copies are
        windows still being acknowledged and are kept."""
        with self._lock:
            self.persisted_floor = max(self.persisted_floor, window_id)
            keep = {wid for copies in self.store.copies.values() for wid in copies
                    if wid >= window_id}
            self.store.drop(keep, self.pool)

    def held_bytes(self) -> int:
        with self._lock:
            return self.store.nbytes() + self.data.nbytes()

    def wipe(self) -> None:
        """Forget every replica held here (fault injection: lose_state)."""
        with self._lock:
            self._generation += 1
            self.store.clear(self.pool)
            self.data.clear()
            self.acked_window = -1

    def close(self, timeout_s: float = 30.0) -> None:
        self.quiesce(timeout_s)
        self._queue.put(None)
        self._thread.join(timeout_s)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                self._idle.set()
                return
            if item[0] == "data":
                self._data_round(*item[1:])
                if self._queue.empty():
                    self._idle.set()
                continue
            window, wid, corrupt = item
            start = time.perf_counter()
            with self._lock:
                generation = self._generation
            try:
                ok, reason = self._round(window, wid, corrupt, generation)
            except Exception as exc:  # noqa: BLE001  (never raise into training)
                ok, reason = False, f"{type(exc).__name__}: {exc}"
                logger.warning("[moetion] replication of window %d failed: %s", wid, reason)
            nbytes = window.layout.total_bytes * len(self.buddies) if window is not None else 0
            stats = RoundStats(wid, ok, time.perf_counter() - start, nbytes, reason)
            with self._lock:
                self.history.append(stats)
                self.finished_round = max(self.finished_round, wid)
                if ok and generation == self._generation:
                    self.acked_window = max(self.acked_window, wid)
                elif not ok:
                    self.failures += 1
            if self._queue.empty():
                self._idle.set()

    def _round(self, window: Window | None, wid: int, corrupt: bool,
               generation: int) -> tuple[bool, str]:
        all_ok, reasons = window is not None, [] if window is not None else ["lost locally"]
        if window is not None:
            parcel = Parcel(window.buffer[:window.layout.total_bytes], window.meta_blob or b"",
                            (wid, 0), SnapshotEngine.window_crc(window))
        else:
            parcel = Parcel(torch.empty(0, dtype=torch.uint8), b"", (wid, 1))
        for j, (buddy, owner) in enumerate(zip(self.buddies, self.owners)):
            got = self.transport.exchange(send_to=buddy, parcel=parcel, recv_from=owner,
                                          tag=ROUND_TAG + j, alloc=self.pool.get,
                                          corrupt=corrupt and j == 0)
            keep = got.ok and got.parcel.ids[0] == wid and got.parcel.ids[1] == 0
            if not got.ok:
                self.corrupt_detected += 1
                logger.warning("[moetion] copy of rank %d's window %d is corrupt (%s); not kept",
                               owner, wid, got.reason)
            with self._lock:
                keep = keep and generation == self._generation
                if keep:
                    copy = unpack_meta(got.parcel.blob, got.parcel.data)
                    copy.crc = got.parcel.crc_data
                    self.store.put(owner, copy)
                    self.store.drop_between(owner, self.persisted_floor, wid, self.pool)
                    self.largest_copy = max(self.largest_copy, copy.buffer.numel())
                else:
                    self.pool.put(got.parcel.data)
            ack = self.transport.exchange_ints(send_to=owner, values=[wid, int(keep)],
                                               recv_from=buddy, n=2, tag=ROUND_TAG + j)
            if ack[0] != wid or ack[1] != 1:
                all_ok = False
                reasons.append(f"buddy {buddy} did not keep it")
        return all_ok, "; ".join(reasons)


    def _data_round(self, iteration: int, blob: bytes) -> None:
        with self._lock:
            generation = self._generation
        parcel = Parcel(torch.empty(0, dtype=torch.uint8), blob, (iteration, 2))
        for j, (buddy, owner) in enumerate(zip(self.buddies, self.owners)):
            try:
                got = self.transport.exchange(send_to=buddy, parcel=parcel, recv_from=owner,
                                              tag=DATA_TAG + j)
            except Exception as exc:  # noqa: BLE001  (never raise into training)
                self.data_failures += 1
                logger.warning("[moetion] data round of iteration %d with buddy %d failed: %s",
                               iteration, buddy, f"{type(exc).__name__}: {exc}")
                return
            self.data_bytes_sent += len(blob)
            ok = got.ok and tuple(got.parcel.ids[:2]) == (iteration, 2)
            if not ok:
                self.data_failures += 1
                logger.warning("[moetion] rank %d's micro-batches of iteration %d arrived "
                               "corrupt (%s); not kept", owner, iteration, got.reason)
                continue
            with self._lock:
                if generation == self._generation:
                    self.data.put(owner, iteration, got.parcel.blob)


def new_group_for(ranks=None, backend: str = "gloo", timeout_s: float = 300.0):
    """A process group of MoEtion's own (every rank must call this in the same order): gloo,
    whatever the device (see the module docstring); another ``backend`` is refused."""
    from datetime import timedelta

    import torch.distributed as dist

    if backend != "gloo":
        raise ValueError(f"MoEtion's replication group is gloo on every machine; got {backend!r}")
    return dist.new_group(ranks=ranks, backend="gloo", timeout=timedelta(seconds=timeout_s))
