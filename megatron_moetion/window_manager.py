"""Window lifecycle on one rank: capturing, shipped (replicating), persisted.

A rank keeps at most three windows: the one being captured, the latest one shipped to its
buddies, and the latest *persisted* one (acknowledged by every buddy of every rank, which all
ranks learn from the agreement). When a window completes while the previous replication round
has not finished on every rank, it is skipped (its buffer reused) rather than queued, so host
memory stays bounded; the decision uses agreed values, so every rank skips the same windows
and replication rounds stay paired.
"""

from __future__ import annotations

import logging

from megatron_moetion.agreement import Agreement
from megatron_moetion.replication import Replicator
from megatron_moetion.snapshot import SnapshotEngine, Window, WindowLayout
from megatron_moetion.storage import PersistWriter

logger = logging.getLogger(__name__)


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
        self.shipped_count = 0

    def open(self, start_iteration: int, layout: WindowLayout, meta: dict) -> Window:
        if self.current is not None:
            self.engine.release(self.current)
        self.current = self.engine.begin_window(self.next_window_id, start_iteration, layout, meta)
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
        self.shipped_count += 1
        self.replicator.start_round(window, corrupt=corrupt)
        return "shipped"

    def advance(self, agreed: Agreement) -> Window | None:
        """Promote the shipped window once every rank's buddies acknowledged it."""
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
