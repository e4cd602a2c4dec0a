"""The snapshot pipeline of one rank: schedule, windows, copies, replication, persistence.

``SnapshotPipeline`` owns, for the life of the process (across generations of the in-place
replacement), the snapshot engine and its host buffers, the window manager (captured, shipped,
persisted windows), the buddy replicator with the copies it keeps for other ranks, the optional
writer to ``--moetion-persist-dir``, the host-memory cap, and the per-window schedule
(``snapshots.SnapshotController``: popularity order, Algorithm 1, slots). Per iteration the
session calls ``boundary`` at the start and ``capture`` after the optimizer step.
"""

from __future__ import annotations

import math
import os

from megatron_moetion.adapter import copy_points
from megatron_moetion.adapter.snapshots import SnapshotController
from megatron_moetion.agreement import Agreement
from megatron_moetion.host_copy import DEFERRED_COPIES_ENV, DeferredCopies, measure_copy_bandwidth
from megatron_moetion.replication import Replicator
from megatron_moetion.snapshot import SnapshotEngine, Window
from megatron_moetion.storage import PersistWriter, write_window
from megatron_moetion.upstream_log import LogStore
from megatron_moetion.window_manager import HostMemoryCap, WindowManager


class SnapshotPipeline:
    """See the module docstring.

    Args:
        cfg: the MoEtion configuration.
        ctx: the first generation's ``RankContext``.
        objects: the first generation's ``MegatronObjects``.
        logs: the rank's upstream log store (the host-memory cap covers it too).
        probe: measure the bandwidths that size W now (collective: every rank of the job's
            first generation); False on a reserve rank joining later, which takes the
            survivors' figures (``adopt_bandwidths``).
    """

    def __init__(self, cfg, ctx, objects, logs: LogStore, probe: bool = True):
        self.cfg, self.rank = cfg, ctx.rank
        copier = None
        if os.environ.get(DEFERRED_COPIES_ENV) == "1" and ctx.device.type == "cpu":
            copier = DeferredCopies()  # tests: the GPU copy path on CPU
        self.engine = SnapshotEngine(ctx.device, copier=copier)
        chunks = (self.engine.interleave(int(cfg.copy_chunk_mb * (1 << 20)))
                  if cfg.copy_interleave else None)
        self._copy_hooks = copy_points.install(objects.model, chunks) if chunks else []
        self.replicator = Replicator(ctx.transport, ctx.topology.buddies(ctx.rank),
                                     ctx.topology.owners(ctx.rank), self.engine.pool)
        self.persist = PersistWriter(cfg.persist_dir, ctx.rank) if cfg.persist_dir else None
        self.windows = WindowManager(self.engine, self.replicator, self.persist)
        self.copy_bandwidth, self.network_bandwidth = self._bandwidths(cfg, ctx, probe)
        self.schedule = SnapshotController(cfg, objects.bindings, objects.optimizer,
                                           self.windows, self.copy_bandwidth, ctx.rank,
                                           ctx.gather, network_bandwidth=self.network_bandwidth,
                                           replicas=len(ctx.topology.buddies(ctx.rank)))
        self.host_memory = HostMemoryCap(cfg.host_memory_cap_bytes, self.windows,
                                         self.replicator, logs, ctx.rank)
        # PP = 1: no pipeline partner reads a rank's micro-batches too; its buddies keep them
        self.ships_data = bool(ctx.topology.buddies(ctx.rank)) and ctx.topology.single_stage

    def _bandwidths(self, cfg, ctx, probe: bool) -> tuple[float, float]:
        """(device-to-host, network) bytes/s that size W, from the flags or measured with every
        rank at once (ranks sharing a PCIe switch or a NIC see their share), then the slowest
        rank's, so that every rank sizes W from the same figures."""
        copy = cfg.copy_bandwidth_gbps * 1e9
        if cfg.network_bandwidth_gbps:
            node = ctx.topology.infos[ctx.rank].node
            local = sum(1 for i in ctx.topology.infos.values() if i.node == node)
            network = cfg.network_bandwidth_gbps * 1e9 / local
        else:
            network = math.inf  # until measured (or adopted from the survivors)
        if not probe:
            return copy or math.inf, network
        if not copy:
            ctx.gather(None)  # start together
            copy = measure_copy_bandwidth(ctx.device)
        if not cfg.network_bandwidth_gbps:
            network = self.replicator.probe_bandwidth()
        everyone = ctx.gather((copy, network))
        return min(c for c, _ in everyone), min(n for _, n in everyone)

    def bandwidths(self) -> dict:
        """What sizes W (the same on every rank), for a reserve rank joining later
        (``adopt_bandwidths``)."""
        return {"copy": self.copy_bandwidth, "network": self.network_bandwidth}

    def adopt_bandwidths(self, figures: dict | None) -> None:
        """A reserve rank: size W with the figures a survivor measured at start-up."""
        if figures:
            self.copy_bandwidth = float(figures["copy"])
            self.network_bandwidth = float(figures["network"])
            self.schedule.copy_bandwidth = self.copy_bandwidth
            self.schedule.network_bandwidth = self.network_bandwidth

    # ------------------------------------------------------------------ generations
    def release(self) -> None:
        """Drop every reference into the failed generation's objects and groups (windows and
        copies stay)."""
        for handle in self._copy_hooks:
            handle.remove()
        self._copy_hooks = []
        self.schedule.release()
        self.replicator.rebind(None)

    def rebind(self, ctx, objects) -> None:
        if self.engine.chunks is not None:
            self._copy_hooks = copy_points.install(objects.model, self.engine.chunks)
        self.replicator.rebind(ctx.transport)
        self.schedule.rebind(objects.bindings, objects.optimizer, ctx.gather)

    def continue_numbering(self, next_window_id: int, last_round: int, iteration: int) -> None:
        """A reserve rank joining at ``iteration``: every rank numbers windows and replication
        rounds alike (the agreement compares them); its first window opens after one step."""
        self.windows.continue_numbering(next_window_id, last_round)
        self.replicator.continue_rounds(last_round)
        self.schedule.next_window_start = iteration + 1

    def numbering(self) -> dict:
        return {"next_window_id": self.windows.next_window_id,
                "last_round": self.windows.last_round}

    # ------------------------------------------------------------------ per iteration
    def start(self, iteration: int) -> None:
        """The first iteration of this process: the first window needs an agreement
        (world-wide window size) and the optimizer state of a first step."""
        self.schedule.next_window_start = iteration + 1

    def closes_now(self, iteration: int) -> bool:
        return self.schedule.closes_now(iteration)

    def boundary(self, iteration: int, agreed: Agreement, corrupt: bool) -> dict:
        return self.schedule.boundary(iteration, agreed, corrupt)

    def capture(self, iteration: int, meta: dict) -> dict:
        return self.schedule.capture(iteration, meta)

    def end_of_iteration(self, iteration: int, consumed_samples: int) -> None:
        self.schedule.note_end_of_iteration(iteration, consumed_samples)

    def note_fwd_bwd(self, seconds: float) -> None:
        self.schedule.fwd_bwd_times.append(seconds)

    def ship_data(self, iteration: int, blob: bytes) -> None:
        """The micro-batches this rank read in ``iteration`` to its buddies (``ships_data``)."""
        self.replicator.ship_data(iteration, blob)

    def truncate_data(self, floor: int) -> None:
        self.replicator.truncate_data(floor)

    def held_data(self) -> dict[int, tuple[int, int] | None]:
        """Other ranks' micro-batches held here: owner -> (first, last) iteration."""
        return self.replicator.data_held()

    def data_replica(self, owner: int, iterations) -> bytes:
        return self.replicator.data_export(owner, iterations)

    def proposal(self) -> int:
        return self.schedule.proposal()

    def status(self) -> tuple[int, int]:
        """(latest finished replication round, latest own window every buddy acknowledged)."""
        return self.replicator.status()

    def wait_for_copies(self) -> float:
        return self.engine.wait_for_copies()

    # ------------------------------------------------------------------ failures and recovery
    def quiesce(self) -> None:
        """No replication round in flight (the replication group is free for transfers)."""
        self.replicator.quiesce(self.cfg.timeout_s)

    def lose(self) -> None:
        """``lose_state``: forget every window, copy and schedule this rank held."""
        self.quiesce()  # no buffer is in flight while dropped
        self.windows.drop_all()
        self.replicator.wipe()
        self.schedule.forget()

    def stop_for_handover(self) -> None:
        self.quiesce()
        self.engine.wait_for_copies()

    def held_windows(self) -> dict[int, tuple[int, int]]:
        """Own complete windows: id -> (start iteration, W)."""
        out = {}
        for w in (self.windows.persisted, self.windows.shipped):
            if w is not None and w.buffer is not None and w.complete:
                out[w.window_id] = (w.start_iteration, w.window)
        return out

    def held_replicas(self) -> dict[int, dict[int, tuple[int, int]]]:
        """Copies held for other ranks: owner -> id -> (start iteration, W)."""
        out = {}
        for owner, ids in self.replicator.held().items():
            out[owner] = {}
            for wid in ids:
                rep = self.replicator.replica(owner, wid)
                out[owner][wid] = (rep.start_iteration, rep.window)
        return out

    def replica(self, owner: int, window_id: int) -> Window | None:
        return self.replicator.replica(owner, window_id)

    def local(self, window_id: int) -> Window | None:
        return self.windows.local(window_id)

    def adopt(self, window: Window) -> None:
        self.windows.adopt(window)

    def restart_windows(self, iteration: int, agreed: Agreement) -> None:
        """After a recovery: drop the window being captured and open a fresh one."""
        self.windows.discard_current()
        self.schedule.open_window(iteration, agreed)

    def buffer(self, nbytes: int):
        return self.engine.pool.get(nbytes)

    # ------------------------------------------------------------------ reporting
    def metrics(self) -> dict:
        rounds = self.replicator.history
        times = self.schedule.fwd_bwd_times
        copied = self.engine.copy_totals() or (None, None)
        return dict(
            copy_bytes_landed=copied[0], copy_seconds_landed=copied[1],
            fwd_bwd_ms=times[-1] * 1e3 if times else None,
            window_size=self.schedule.schedule.window if self.schedule.schedule else None,
            **self.schedule.window_metrics(),
            **(self.engine.chunks.stats() if self.engine.chunks is not None else {}),
            dense_bytes=self.schedule.dense_bytes(),
            host_bytes_held=self.windows.held_bytes() + self.replicator.held_bytes(),
            host_memory_cap_bytes=self.host_memory.limit(),
            replication_rounds=len(rounds),
            replication_failures=self.replicator.failures,
            corrupt_copies_detected=self.replicator.corrupt_detected,
            host_allocations=self.engine.pool.allocations,
            replication_last_s=rounds[-1].seconds if rounds else None,
            data_replica_bytes=self.replicator.data.nbytes(),
            data_bytes_shipped=self.replicator.data_bytes_sent,
            data_round_failures=self.replicator.data_failures,
            windows_skipped=self.windows.skipped,
            persisted_window=(self.windows.persisted.window_id
                              if self.windows.persisted is not None else None),
        )

    def dump_replicas(self, directory: str) -> None:
        """Tests: every buddy copy held here, in the persisted format."""
        for owner, ids in self.replicator.held().items():
            for wid in ids:
                write_window(f"{directory}/replicas/held_by{self.rank}", owner,
                             self.replicator.replica(owner, wid))

    def close(self) -> None:
        self.schedule.close()
        self.replicator.close(self.cfg.timeout_s)
        if self.persist is not None:
            self.persist.close(self.cfg.timeout_s)
