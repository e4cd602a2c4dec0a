"""Window lifecycle on one rank: capturing, shipped (replicating), persisted.

A rank keeps at most three windows: the one being captured, the latest one shipped to its
buddies, and the latest *persisted* one (acknowledged by every buddy of every rank, which all
ranks learn from the agreement). When a window completes while the previous replication round
has not finished on every rank, it is skipped (its buffer reused) rather than queued, so host
memory stays bounded; the decision uses agreed values, so every rank skips the same windows
and replication rounds stay paired.

``HostMemoryCap`` bounds everything MoEtion holds in host memory on a rank (its windows, the
buddy copies it keeps, the free buffers of the pool, the upstream logs) by
``--moetion-host-memory-cap-mb``. Windows and copies are bounded by construction (three own
windows, at most three copies per rank this one is a buddy of); logs are not: they are dropped
only when a window is promoted, and promotion stalls while replication does. Past the cap the
free pool buffers go first, then the oldest logs (``LogStore.shed``), with one warning; the logs'
coverage then starts later, and recovery planning falls back (to an older anchor, or to the
persistent checkpoint) wherever it would have needed them, never replaying without them.
"""

from __future__ import annotations

import logging

from megatron_moetion.agreement import Agreement
from megatron_moetion.replication import Replicator
from megatron_moetion.snapshot import SnapshotEngine, Window, WindowLayout
from megatron_moetion.storage import PersistWriter
from megatron_moetion.upstream_log import LogStore

logger = logging.getLogger(__name__)

CAP_FLAG = "--moetion-host-memory-cap-mb"
# The automatic cap: room for the windows a rank may hold at once (3 own + 3 per owner) and for
# the logs of 3W + 2 * max(W, R) iterations, R the longest acknowledged replication round in
# iterations. With rounds of R, logs reach from the persisted window's start to the next
# promotion: at most 2W + 2R iterations; one more window is headroom. Only a stalled promotion
# (rounds that finish unacknowledged, or hang) goes past it.
OWN_WINDOWS, COPIES_PER_OWNER, AUTO_HEADROOM_WINDOWS = 3, 3, 1


class WindowManager:
    """Owns this rank's windows (see module docstring)."""

    def __init__(self, engine: SnapshotEngine, replicator: Replicator,
                 persist: PersistWriter | None = None):
        self.engine = engine
        self.replicator = replicator
        self.persist = persist
        self.current: Window | None = None
        self.shipped: Window | None = None
        self.persisted: Window | None = None
        self.next_window_id = 0
        self.open_id: int | None = None  # the window being captured (kept when it is lost)
        self.last_round = -1  # id of the latest window shipped (every rank ships the same ids)
        self.skipped = 0
        self.largest_window = (0, 0)  # (bytes, W) of the largest window opened so far
        self.longest_round_iters = 0  # the longest acknowledged round, in iterations
        self._ticks = 0  # advance() calls: one per iteration
        self._round: tuple[int, int] | None = None  # (window id, tick) of the round running

    def continue_numbering(self, next_window_id: int, last_round: int) -> None:
        """A reserve rank: continue the job's window and round numbering."""
        self.next_window_id, self.last_round = int(next_window_id), int(last_round)

    def open(self, start_iteration: int, layout: WindowLayout, meta: dict) -> Window:
        if self.current is not None:
            self.engine.release(self.current)
        self.current = self.engine.begin_window(self.next_window_id, start_iteration, layout, meta)
        self.largest_window = max(self.largest_window, (layout.total_bytes, len(layout.slots)))
        self.open_id = self.next_window_id
        self.next_window_id += 1
        return self.current

    def close_current(self, agreed: Agreement, corrupt: bool = False) -> str:
        """Seal the finished window and ship it, or skip it; returns which.

        Every rank ships the same windows (the decision uses agreed values), so a rank that
        lost the window it was capturing still takes part in the round, with nothing to give.
        """
        window, window_id, self.current, self.open_id = self.current, self.open_id, None, None
        if window_id is None:
            return "none"
        if window is not None and not window.complete:
            self.engine.release(window)
            return "incomplete"
        if window is not None:
            self.engine.seal(window)
        if agreed.finished_round < self.last_round:
            # some rank is still replicating the previous window: skip this one
            self.skipped += 1
            logger.info("[moetion] window %d skipped: replication of window %d still running",
                        window_id, self.last_round)
            self.engine.release(window)
            return "skipped"
        self.last_round = window_id
        if window is None:
            self.replicator.start_round(None, window_id=window_id)
            return "lost"
        if self.shipped is not None and self.shipped is not self.persisted:
            self._release(self.shipped)
        self.shipped = window
        self._round = (window.window_id, self._ticks)
        self.replicator.start_round(window, corrupt=corrupt)
        return "shipped"

    def advance(self, agreed: Agreement) -> Window | None:
        """Promote the shipped window once every rank's buddies acknowledged it (called once
        per iteration; also times the replication rounds, in iterations)."""
        self._ticks += 1
        if self._round is not None and agreed.finished_round >= self._round[0]:
            if agreed.acked_window >= self._round[0]:
                self.longest_round_iters = max(self.longest_round_iters,
                                               self._ticks - self._round[1])
            self._round = None
        if self.shipped is None or agreed.acked_window < self.shipped.window_id:
            return None
        if self.shipped is self.persisted:
            return None
        old, self.persisted = self.persisted, self.shipped
        if old is not None:
            self._release(old)
        self.replicator.drop_older_than(self.persisted.window_id)
        if self.persist is not None:
            self.persist.submit(self.persisted)
        return self.persisted

    def _release(self, window: Window) -> None:
        if self.persist is not None:
            self.persist.wait(window.window_id)
        self.engine.release(window)

    def local(self, window_id: int) -> Window | None:
        """This rank's own complete copy of a window, if it still holds one."""
        for w in (self.persisted, self.shipped):
            if w is not None and w.window_id == window_id and w.buffer is not None:
                return w
        return None

    def held_bytes(self) -> int:
        windows = {id(w): w for w in (self.current, self.shipped, self.persisted)
                   if w is not None and w.buffer is not None}
        return sum(w.buffer.numel() for w in windows.values()) + self.engine.pool.free_bytes()

    def discard_current(self) -> None:
        """Drop the window being captured (after a recovery, windows start afresh)."""
        if self.current is not None:
            self.engine.release(self.current)
        self.current, self.open_id = None, None

    def adopt(self, window: Window) -> None:
        """Keep a window pulled from a buddy as this rank's own persisted copy (a recovered
        rank can then serve as a survivor if a stage peer fails before the next persist)."""
        if self.persisted is not None and self.persisted is not self.shipped:
            self._release(self.persisted)
        self.persisted = window

    def drop_all(self) -> None:
        """Forget every local window (fault injection: lose_state; recovery restart)."""
        for w in {id(w): w for w in (self.current, self.shipped, self.persisted)
                  if w is not None}.values():
            self._release(w)
        self.current = self.shipped = self.persisted = None


class HostMemoryCap:
    """The host-memory bound of one rank (see the module docstring); the logs call ``check``
    after every write.

    Args:
        cap_bytes: the cap; 0 sizes it from the windows (``limit``).
        windows: this rank's window manager (own windows and the buffer pool).
        replicator: the buddy copies held here.
        logs: this rank's upstream logs (``logs.budget`` is set to this object).
        rank: for the warning.
    """

    def __init__(self, cap_bytes: int, windows: WindowManager, replicator: Replicator,
                 logs: LogStore, rank: int = 0):
        self.cap_bytes = int(cap_bytes)
        self.windows, self.replicator, self.logs, self.rank = windows, replicator, logs, rank
        self.warned = False
        logs.budget = self

    def limit(self) -> int | None:
        """The cap in bytes. Automatic (``cap_bytes == 0``): ``3 + 3 * owners`` times the
        largest window held (own or a buddy's copy), plus the largest iteration's logs (and, at
        PP = 1, each owner's largest iteration of micro-batches held here) times
        ``3W + 2 * max(W, R)`` iterations (R: the longest acknowledged round, in iterations);
        None until the first window opened."""
        if self.cap_bytes:
            return self.cap_bytes
        own_bytes, w = self.windows.largest_window
        window_bytes = max(own_bytes, self.replicator.largest_copy)
        if not window_bytes:
            return None
        windows = OWN_WINDOWS + COPIES_PER_OWNER * len(self.replicator.owners)
        log_iters = (2 + AUTO_HEADROOM_WINDOWS) * w + 2 * max(w, self.windows.longest_round_iters)
        data_copies = len(self.replicator.owners) * self.replicator.data_peak_iteration_bytes
        return windows * window_bytes + log_iters * (self.logs.peak_iteration_bytes + data_copies)

    def windows_bytes(self) -> int:
        """Own windows, free pool buffers and buddy copies."""
        return self.windows.held_bytes() + self.replicator.held_bytes()

    def check(self, iteration: int) -> None:
        """Keep windows plus logs under the cap: trim the pool, then drop the oldest logs (never
        those of ``iteration``, the one being logged)."""
        cap = self.limit()
        if cap is None or self.windows_bytes() + self.logs.nbytes() <= cap:
            return
        self.windows.engine.pool.trim()
        held = self.windows_bytes()
        if held + self.logs.nbytes() <= cap:
            return
        logs_before = self.logs.nbytes()
        dropped = self.logs.shed(max(0, cap - held), keep_from=iteration)
        if dropped:  # other ranks' micro-batches of the dropped iterations go too (PP = 1)
            self.replicator.truncate_data(self.logs.floor)
        if not self.warned and (dropped or held + self.logs.nbytes() > cap):
            self.warned = True
            self._warn(cap, held, logs_before)

    def _warn(self, cap: int, held: int, logs_before: int) -> None:
        persisted = self.windows.persisted.window_id if self.windows.persisted else None
        shipped = self.windows.shipped.window_id if self.windows.shipped else None
        how = "set" if self.cap_bytes else "automatic, sized from the window"
        over = ("; windows and buddy copies alone exceed it, so logs are kept only for the "
                "iteration being run" if held + self.logs.nbytes() > cap else "")
        mib = float(1 << 20)
        logger.warning(
            "[moetion] rank %d: host memory cap %s (%.1f MiB, %s) exceeded: windows and buddy "
            "copies %.1f MiB, upstream logs %.1f MiB. Window promotion has stalled (persisted "
            "window %s, newest shipped %s), so the oldest upstream logs are being dropped "
            "(kept from iteration %d on)%s. A failure that needs dropped logs can only recover "
            "from a window that starts after them, else it falls back to the persistent "
            "checkpoint. Raise %s or look at replication (this warning is shown once).",
            self.rank, CAP_FLAG, cap / mib, how, held / mib, logs_before / mib, persisted,
            shipped, self.logs.floor + 1, over, CAP_FLAG)
