"""Liveness: heartbeats in the job's rendezvous store and a ring watch over them.

Each rank runs one background thread that, every ``interval_s``:

1. writes its heartbeat ``hb/<rank>`` (a sequence number, the iteration and phase the main
   thread last reported, wall time, host and pid);
2. reads the job-wide verdict ``failure``: once any rank has published one, every rank acts on
   it (``on_failure``), so all learn of a failure within about one interval of the verdict;
3. watches one peer, the next rank in the ring that is neither finished nor already declared
   dead, and declares it dead once its heartbeat has not changed for ``timeout_s`` by this
   rank's own monotonic clock (no clock comparison between hosts). A killed process and one
   that stopped answering look the same here.

Declaring: one scan of every heartbeat names all ranks silent for longer than the timeout (by
wall time, for the report only), the declaring rank wins a compare-and-set on ``claim`` (so
exactly one rank acts for the job: ``on_declare``, e.g. fencing and recording the fallback),
then publishes the verdict. A store that stops answering for longer than the timeout is
itself a verdict (its host died). Load on the store: per interval, one write and two reads per
rank (the verdict, the watched peer's heartbeat; its ``done`` mark only when the heartbeat did
not change; counted by ``bench/scale.py``). Before exiting, each survivor acknowledges the verdict and
waits briefly for the others' acknowledgements, so that
all of them have reported before the launcher tears the job down.

A rank that finishes training marks ``done/<rank>``: a finished rank is not a dead one. Pure
logic over a store with ``set/get/add/check/compare_set`` (``torch.distributed.Store``, or the
in-memory one in the unit tests); no torch.distributed, no Megatron.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

PREFIX = "moetion/liveness"
OPS_PER_TICK = 3  # steady state: write the heartbeat, read the verdict, read the peer's
# Heartbeat round trips per second the job's one store should carry at most: 40% of the 50k
# ops/s a libuv TCPStore served on 2 cores (docs/scale.md; the rest for the launcher).
STORE_BUDGET_OPS_S = 20_000.0


def scaled_interval(interval_s: float, world_size: int,
                    budget_ops_s: float = STORE_BUDGET_OPS_S) -> float:
    """The heartbeat interval for ``world_size`` ranks: ``interval_s``, or longer where every
    rank beating at it would offer the store more than ``budget_ops_s`` (1 s up to 6.7k ranks,
    2.5 s at 16k: detection is then a few seconds later, the store stays responsive)."""
    return max(interval_s, world_size * OPS_PER_TICK / budget_ops_s)


@dataclass
class Verdict:
    """A job-wide failure: who is dead, what each was last doing, who saw it and when."""

    dead: list[int]
    last_seen: dict[int, dict] = field(default_factory=dict)
    declared_by: int = -1
    silent_s: float = 0.0  # how long the watched peer had been silent when declared
    declared_wall: float = 0.0
    reason: str = ""

    def to_json(self) -> str:
        return json.dumps({"dead": self.dead, "last_seen": self.last_seen,
                           "declared_by": self.declared_by, "silent_s": self.silent_s,
                           "declared_wall": self.declared_wall, "reason": self.reason})

    @classmethod
    def from_json(cls, text: str) -> Verdict:
        d = json.loads(text)
        return cls(list(d["dead"]), {int(k): v for k, v in d["last_seen"].items()},
                   int(d["declared_by"]), float(d["silent_s"]), float(d["declared_wall"]),
                   d.get("reason", ""))

    def describe(self) -> str:
        if not self.dead:
            return self.reason
        parts = []
        for r in self.dead:
            seen = self.last_seen.get(r, {})
            where = (f"last seen in iteration {seen['iteration']}, phase {seen['phase']}"
                     if seen else "never seen")
            parts.append(f"rank {r} ({where})")
        return (f"{', '.join(parts)} stopped answering: no heartbeat for {self.silent_s:.1f} s "
                f"(declared by rank {self.declared_by})")


def _decode(raw) -> str:
    return raw.decode() if isinstance(raw, bytes | bytearray) else str(raw)


class Liveness:
    """This rank's heartbeat thread and ring watch (see module docstring).

    Args:
        store: the job's rendezvous store (must outlive any single worker to see rank 0 die).
        on_failure: called once, on the heartbeat thread, with the ``Verdict``.
        on_declare: called on the one rank that declares, before the verdict is published.
    """

    def __init__(self, store, rank: int, world_size: int, interval_s: float, timeout_s: float,
                 on_failure: Callable[[Verdict], None],
                 on_declare: Callable[[Verdict], None] | None = None, *,
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time):
        self.store, self.rank, self.world_size = store, rank, world_size
        self.interval_s, self.timeout_s = interval_s, timeout_s
        self.on_failure, self.on_declare = on_failure, on_declare
        self.clock, self.wall = clock, wall
        self.iteration, self.phase = 0, "setup"
        self.verdict: Verdict | None = None
        self.waiting_after: str | None = None  # the collective error this rank waits after
        self.handled = threading.Event()  # on_failure returned (it normally exits instead)
        self._seq = 0
        self._dead: set[int] = set()
        self._finished: set[int] = set()
        self._watched: int | None = None
        self._seen = False  # the watched peer's heartbeat key exists
        self._last_value: str | None = None
        self._last_change = clock()
        self._store_failing_since: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._host, self._pid = socket.gethostname(), os.getpid()

    def _key(self, *parts) -> str:
        return "/".join((PREFIX,) + tuple(str(p) for p in parts))

    # ------------------------------------------------------------------ main thread
    def progress(self, iteration: int, phase: str) -> None:
        """What the training loop is doing now (read by the next heartbeat)."""
        self.iteration, self.phase = iteration, phase

    def start(self) -> None:
        self.tick()  # first heartbeat before the thread, so peers see this rank at once
        self._thread = threading.Thread(target=self._run, name="moetion-liveness", daemon=True)
        self._thread.start()

    def stop(self, finished: bool = True) -> None:
        """Stop the thread; a rank that ``finished`` is marked done, so no peer declares it."""
        if finished:
            try:
                self.store.set(self._key("done", self.rank), "1")
            except Exception:  # noqa: BLE001 - the store may be gone at the end of a job
                pass
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=2 * self.interval_s + 1)

    def wait_for_verdict(self, timeout_s: float) -> Verdict | None:
        """Block up to ``timeout_s`` for a verdict (after a collective failed on this rank)."""
        deadline = self.clock() + timeout_s
        while self.verdict is None and self.clock() < deadline and not self._stop.is_set():
            time.sleep(min(self.interval_s, 0.1))
        return self.verdict

    def settle(self, verdict: Verdict, wait_s: float | None = None) -> int:
        """Acknowledge the verdict and wait (by default up to three heartbeats, at least 2 s)
        until every survivor has: the first to exit ends the job under torchrun, before the
        others could report. Returns how many acknowledged."""
        expected = self.world_size - len(verdict.dead)
        if wait_s is None:
            wait_s = max(3 * self.interval_s, 2.0)
        deadline = time.monotonic() + wait_s
        try:
            count = self.store.add(self._key("acks"), 1)
            while count < expected and time.monotonic() < deadline:
                time.sleep(min(self.interval_s, 0.05))
                count = self.store.add(self._key("acks"), 0)
        except Exception:  # noqa: BLE001 - the store may be gone with its host
            return 0
        return int(count)

    # ------------------------------------------------------------------ the thread
    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            if self.tick() is not None:
                return

    def tick(self) -> Verdict | None:
        """One heartbeat, verdict check and watch; returns the verdict once there is one."""
        if self.verdict is not None:
            return self.verdict
        try:
            verdict = self._tick()
            self._store_failing_since = None
        except Exception as exc:  # noqa: BLE001 - any store error may mean the store is gone
            # only after the detect timeout: a hiccup is not a death, and at the normal end of
            # a job whose store lives in rank 0 the others stop their heartbeats in the meantime
            if self._store_failing_since is None:
                self._store_failing_since = self.clock()
            if self.clock() - self._store_failing_since <= self.timeout_s:
                return None
            verdict = Verdict([], declared_by=self.rank, declared_wall=self.wall(),
                              silent_s=self.clock() - self._store_failing_since,
                              reason=f"the job's rendezvous store stopped answering "
                                     f"({type(exc).__name__}: {exc})")
        if verdict is not None:
            self.verdict = verdict
            self.on_failure(verdict)  # normally reports and exits the process
            self.handled.set()
        return verdict

    def _tick(self) -> Verdict | None:
        self._seq += 1
        self.store.set(self._key("hb", self.rank), json.dumps(
            {"seq": self._seq, "iteration": self.iteration, "phase": self.phase,
             "wall": self.wall(), "host": self._host, "pid": self._pid}))
        if self.store.check([self._key("failure")]):
            return Verdict.from_json(_decode(self.store.get(self._key("failure"))))
        peer = self._watched
        if peer is None or peer in self._dead or peer in self._finished:
            peer = self._peer()
            if peer is None:
                return None
            self._watched, self._last_value, self._last_change = peer, None, self.clock()
            self._seen = False
        key = self._key("hb", peer)
        if not self._seen:  # until its first heartbeat: a get would block on a missing key
            self._seen = self.store.check([key])
        value = _decode(self.store.get(key)) if self._seen else None
        now = self.clock()
        if value != self._last_value:
            self._last_value, self._last_change = value, now
            return None
        # unchanged since the last tick: finished, late or dead (only now is "done" read)
        if self.store.check([self._key("done", peer)]):
            self._finished.add(peer)
            self._watched = None
            return None
        if now - self._last_change <= self.timeout_s:
            return None
        return self._declare(peer, now - self._last_change)

    def _peer(self) -> int | None:
        for step in range(1, self.world_size):
            r = (self.rank + step) % self.world_size
            if r in self._dead or r in self._finished:
                continue
            if self.store.check([self._key("done", r)]):
                self._finished.add(r)
                continue
            return r
        return None

    def _declare(self, peer: int, silent_s: float) -> Verdict | None:
        now_wall = self.wall()
        last_seen, dead = {}, {peer}
        for r in range(self.world_size):
            key = self._key("hb", r)
            if r == self.rank or not self.store.check([key]):
                continue
            hb = json.loads(_decode(self.store.get(key)))
            last_seen[r] = {k: hb[k] for k in ("iteration", "phase", "host", "pid")}
            if now_wall - hb["wall"] > self.timeout_s and not self.store.check(
                    [self._key("done", r)]):
                dead.add(r)
        verdict = Verdict(sorted(dead), {r: last_seen[r] for r in sorted(dead) if r in last_seen},
                          self.rank, silent_s, now_wall)
        claim = _decode(self.store.compare_set(self._key("claim"), "", str(self.rank)))
        if claim != str(self.rank):  # another rank declares for the job; read its verdict
            self._dead |= dead
            return None
        if self.on_declare is not None:
            try:
                self.on_declare(verdict)
            except Exception:  # noqa: BLE001 - the verdict must be published regardless
                logger.exception("[moetion] rank %d: acting on the verdict failed", self.rank)
        self.store.set(self._key("failure"), verdict.to_json())
        return verdict



def _is_collective_failure(exc: BaseException) -> bool:
    """Errors a collective raises when a peer died (gloo/NCCL transport, timeouts, the store)."""
    if type(exc).__name__ in ("DistError", "DistBackendError", "DistNetworkError",
                              "DistStoreError"):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        k in text for k in ("gloo", "NCCL", "Connection reset", "Connection closed",
                            "Timed out", "Broken pipe"))


def wait_for_verdict_on_collective_errors(liveness: Liveness, wait_s: float) -> None:
    """Install a ``sys.excepthook``: a collective error that escapes the main thread (a peer
    died under it) waits up to ``wait_s`` for the liveness verdict before the process dies. The
    rank keeps beating meanwhile, so no peer takes it for dead, and the verdict's
    ``on_failure`` (which reports and exits) names only the rank that really died. Any other
    exception goes straight to the previous hook."""
    previous = sys.excepthook

    def hook(kind, value, tb):
        if not liveness._stop.is_set() and _is_collective_failure(value):
            if liveness.verdict is None:
                liveness.waiting_after = f"{kind.__name__}: {value}"
                logger.error("[moetion] rank %d: a collective failed (%s: %s); waiting up to "
                             "%.0f s for the liveness verdict", liveness.rank, kind.__name__,
                             str(value)[:200], wait_s)
                liveness.wait_for_verdict(wait_s)
            if liveness.verdict is not None:
                liveness.handled.wait(wait_s)  # on_failure ends the process meanwhile
        previous(kind, value, tb)

    sys.excepthook = hook
