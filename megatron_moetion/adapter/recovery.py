"""Localized recovery, run by every rank once the agreement names failed ranks.

Call order (all ranks, in the session right after the agreement of the aborted iteration ``f``)::

    quiesce replication                       # the replication group is free for transfers
    gather Holdings (one all_gather_object)   # what each rank still holds
    plan = plan_recovery(...)                 # identical on every rank
    transfers in plan order                   # windows from buddies, logs from neighbours
    replaying ranks: Replayer.run()           # conversion + catch-up to f-1
    paused ranks: wait                        # ... in the end-of-recovery agreement
    end-of-recovery agreement                 # a failure during recovery restarts it
    finish: check survivors' state, reset the paused ranks' start-of-f state, fresh windows

Afterwards every rank runs iteration ``f`` again. If no window can be recovered in memory, the
failure policy's fallback applies: every rank stops for a restart from the last persistent
checkpoint (Megatron's own ``--load``), or, without one, ``RecoveryError`` names what was lost.
"""

from __future__ import annotations

import logging
import time
import zlib

import torch

from megatron_moetion.adapter import rng_state
from megatron_moetion.adapter.failure_policy import FailurePolicy, Outcome
from megatron_moetion.adapter.rank_state import capture_buffers, restore_buffers
from megatron_moetion.adapter.replay import Replayer
from megatron_moetion.agreement import agree
from megatron_moetion.errors import RecoveryError
from megatron_moetion.recovery_plan import Holdings, RecoveryPlan, plan_recovery
from megatron_moetion.snapshot import unpack_meta
from megatron_moetion.transport import Parcel
from megatron_moetion.upstream_log import LogStore

logger = logging.getLogger(__name__)

RECOVERY_TAG = 10_000


def _scope(topology, plan: RecoveryPlan) -> str:
    """Who replays, in words (the report's ``scope``)."""
    if plan.paused:
        return "the failed ranks' stages replay, the other stages pause"
    if topology.single_stage:
        return ("every rank replays: with PP = 1 there are no pipeline boundaries to localize "
                "on (the failed ranks' micro-batches come from their buddies)")
    return "every rank replays: the failed ranks span every stage, or upstream logging is off"


class RecoveryCoordinator:
    """This rank's part of every localized recovery (see the module docstring).

    Args:
        cfg: the MoEtion configuration.
        policy: the failure policy (fallbacks, reports).
        pipeline: the rank's ``SnapshotPipeline`` (windows and buddy copies).
        upstream: the rank's ``UpstreamLog``.
        fire: fires planned faults of a phase (``recovery`` faults go off mid-recovery).
        shutdown: stops the rank's background work before a fallback exit.

    Attributes:
        lost: this rank lost its state and waits to be restored.
        role: ``"replaying"`` or ``"paused"`` while a recovery runs, else None.
        data_partner_ok: this rank's pipeline partner reads the same micro-batches.
        reads_data: this rank's schedule read micro-batches in its last forward-backward.
    """

    def __init__(self, cfg, policy: FailurePolicy, pipeline, upstream, fire, shutdown):
        self.cfg, self.policy, self.pipeline, self.upstream = cfg, policy, pipeline, upstream
        self.fire, self.shutdown = fire, shutdown
        self.ctx = self.objects = None
        self.lost = False
        self.role: str | None = None
        self.data_partner_ok = True
        self.reads_data: bool | None = None

    def rebind(self, ctx, objects) -> None:
        self.ctx, self.objects = ctx, objects

    def release(self) -> None:
        """Between generations. A rank the interrupted recovery was replaying holds a
        half-rebuilt state: it is restored again, as a failed rank, in the next one."""
        self.ctx = self.objects = None
        self.lost, self.role = self.lost or self.role == "replaying", None

    def mark_lost(self) -> None:
        """This rank lost its state (a ``lose_state`` fault, or a spare that holds nothing)."""
        self.lost = True

    # ------------------------------------------------------------------ before any failure
    def check_data_partners(self, iteration: int) -> None:
        """First and last stage of a pipeline must read the same micro-batches: a failed one
        gets its data from the other. Checked once, on the first iteration's digests."""
        items = self.upstream.store.data_for(iteration)
        digest = zlib.crc32(b"".join(
            t.numpy().tobytes() for item in items
            for _, t in sorted(item.items()) if torch.is_tensor(t))) if items else None
        digests = self.ctx.gather(digest)
        partner = self.ctx.topology.data_partner(self.ctx.rank)
        self.data_partner_ok = partner is not None and digests[partner] == digest
        if partner is not None and not self.data_partner_ok:
            logger.warning("[moetion] rank %d and its pipeline partner %d read different "
                           "micro-batches; a failure of either falls back to the persistent "
                           "checkpoint", self.ctx.rank, partner)

    def holdings(self) -> Holdings:
        logs = {k: self.upstream.store.coverage(k) for k in ("fwd", "bwd", "data", "record")}
        return Holdings(self.ctx.rank, self.lost, self.pipeline.held_windows(),
                        self.pipeline.held_replicas(), logs, self.data_partner_ok,
                        self.pipeline.held_data(), self.reads_data)

    # ------------------------------------------------------------------ the recovery
    def recover(self, failed, fault_iteration: int, start_state: dict, agreed, kwargs: dict,
                forward_backward_func) -> dict:
        """Recover from ``failed`` ranks losing their state during ``fault_iteration``;
        ``start_state`` is this rank's RNG and router buffers at the start of it."""
        ctx, start = self.ctx, time.perf_counter()
        failed = set(failed)
        fingerprint = self.objects.state.fingerprint() if ctx.rank not in failed else None
        details = {"attempts": 0, "phases": {}, "bytes_pulled": 0, "bytes_shipped": 0,
                   "bytes_restored": 0}
        phases = details["phases"]

        def phase(name, t0):
            phases[name] = phases.get(name, 0.0) + time.perf_counter() - t0

        while True:
            details["attempts"] += 1
            self._begin(fault_iteration, ctx.rank in failed)
            t0 = time.perf_counter()
            holdings = {h.rank: h for h in ctx.gather(self.holdings())}
            plan = plan_recovery(ctx.topology, sorted(failed), fault_iteration, holdings,
                                 upstream_logging=self.cfg.upstream_logging)
            phase("plan", t0)
            details.update(ranks_replaying=list(plan.replaying), ranks_paused=list(plan.paused),
                           scope=_scope(ctx.topology, plan))
            self.role = "replaying" if ctx.rank in plan.replaying else "paused"
            if plan.fallback:
                self._fall_back(plan, details)
            t0 = time.perf_counter()
            got = self._transfers(plan)
            details["bytes_pulled"] += got["bytes_in"]
            details["bytes_shipped"] += got["bytes_out"]
            phase("transfer", t0)
            if ctx.rank in plan.replaying:
                replayer = self._replay(plan, got, kwargs, forward_backward_func)
                details["bytes_restored"] += replayer.bytes_loaded
                for name, seconds in replayer.phases.items():
                    phases[name] = phases.get(name, 0.0) + seconds
            else:
                self.fire("recovery")
            t0 = time.perf_counter()
            finished, acked = self.pipeline.status()
            ended = agree(ctx.control_group, ctx.world_size, ctx.rank, lost=self.lost,
                          finished_round=finished, acked_window=acked, window_proposal=0)
            phase("wait", t0)
            if not ended.failed:
                break
            failed |= set(ended.failed)
            logger.warning("[moetion] ranks %s lost their state during recovery; restarting it",
                           list(ended.failed))
        self.upstream.end_replay()
        self._finish(plan, fingerprint, start_state, fault_iteration, agreed)
        self.role = None
        return self.policy.report(
            cause="lost_state", outcome=Outcome.RECOVER_IN_MEMORY, failed=plan.failed,
            fault_iteration=fault_iteration,
            reason=f"ranks {sorted(plan.failed)} lost their state", **details,
            anchor_window=plan.anchor_window, anchor_iteration=plan.anchor_start,
            window=plan.window, conversion_iterations=len(plan.conversion),
            catch_up_iterations=len(plan.catch_up), replayed_iterations=plan.replayed_iterations,
            rank_iterations_replayed=plan.replayed_iterations * len(plan.replaying),
            # what every rank replaying from the same window would have cost
            global_replay_from_window_rank_iterations=plan.replayed_iterations * ctx.world_size,
            seconds=time.perf_counter() - start)

    def _begin(self, fault_iteration: int, i_am_failed: bool) -> None:
        self.pipeline.quiesce()
        if i_am_failed:  # what it logged of the aborted attempt after losing state is partial
            self.upstream.store.drop_iteration(fault_iteration, ("data",))
        self.lost = False

    def _replay(self, plan: RecoveryPlan, got: dict, kwargs: dict, fwd_bwd) -> Replayer:
        window = got["window"] or self.pipeline.local(plan.anchor_window)
        if window is None:
            raise RecoveryError(f"rank {self.ctx.rank} has no copy of window "
                                f"{plan.anchor_window}")
        topo, rank = self.ctx.topology, self.ctx.rank
        self.upstream.route_replay({"fwd": got["fwd"], "bwd": got["bwd"]},
                                   prev_live=topo.prev_rank(rank) in plan.replaying,
                                   next_live=topo.next_rank(rank) in plan.replaying)
        replayer = Replayer(self.objects, self.upstream, plan, window, kwargs, fwd_bwd,
                            is_lost=lambda: self.lost, controls=self.cfg.negative_controls,
                            on_first_iteration=lambda: self.fire("recovery"))
        replayer.run()
        if got["window"] is not None:
            self.pipeline.adopt(got["window"])
        return replayer

    def _transfers(self, plan: RecoveryPlan) -> dict:
        """Run this rank's part of the transfers; return what it received."""
        rank, transport, logs = self.ctx.rank, self.ctx.transport, self.upstream.store
        got = {"window": None, "fwd": {}, "bwd": {}, "bytes_in": 0, "bytes_out": 0}
        for i, tr in enumerate(plan.transfers):
            tag = RECOVERY_TAG + i
            if tr.src == rank:
                if tr.kind == "window":
                    w = self.pipeline.replica(tr.owner, tr.window_id)
                    parcel = Parcel(w.buffer[:w.layout.total_bytes], w.meta_blob,
                                    (w.window_id,), w.crc)
                else:
                    lo, hi = tr.iterations
                    from_copies = (tr.kind == "data" and tr.owner is not None
                                   and "buddy_sends_own_data" not in self.cfg.negative_controls)
                    blob = (self.pipeline.data_replica(tr.owner, range(lo, hi + 1))
                            if from_copies else logs.export(tr.kind, range(lo, hi + 1)))
                    parcel = Parcel(torch.empty(0, dtype=torch.uint8), blob)
                transport.send(tr.dst, parcel, tag)
                got["bytes_out"] += parcel.data.numel() + len(parcel.blob)
            if tr.dst == rank:
                received = transport.recv(tr.src, tag, alloc=self.pipeline.buffer)
                if not received.ok:
                    raise RecoveryError(f"{tr.kind} from rank {tr.src} arrived corrupt "
                                        f"({received.reason}); refusing to resume from it")
                got["bytes_in"] += received.parcel.data.numel() + len(received.parcel.blob)
                if tr.kind == "window":
                    window = unpack_meta(received.parcel.blob, received.parcel.data)
                    window.crc = received.parcel.crc_data
                    got["window"] = window
                elif tr.kind in ("fwd", "bwd"):
                    for (it, mb, _chunk, _d), t in LogStore.decode(
                            received.parcel.blob).items():
                        got[tr.kind][(it, mb)] = t
                else:
                    logs.absorb(tr.kind, LogStore.decode(received.parcel.blob))
        return got

    def _fall_back(self, plan: RecoveryPlan, details: dict) -> None:
        """Nothing recoverable in memory: restart from the last persistent checkpoint, or fail."""
        outcome = self.policy.fallback()
        report = self.policy.report(cause="lost_state", outcome=outcome, failed=plan.failed,
                                    fault_iteration=plan.fault_iteration, reason=plan.reason,
                                    fallback_reason=plan.reason, lost=plan.lost, **details)
        self.policy.emit(report)
        if outcome is Outcome.FATAL:
            raise RecoveryError(f"iteration {plan.fault_iteration}: {plan.reason}; "
                                f"{self.policy.describe(outcome)}", lost=plan.lost)
        message = None
        if self.ctx.rank == 0:
            self.policy.record(report)
            message = (f"{plan.reason}; {self.policy.describe(outcome)}, a rollback of "
                       f"{report['rollback_iterations']} iterations")
        self.shutdown()
        self.ctx.barrier()
        self.policy.exit(outcome, message)

    def _finish(self, plan: RecoveryPlan, fingerprint, start: dict, iteration: int,
                agreed) -> None:
        """After the replay: check the survivors, reset the paused ranks, fresh windows."""
        from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker
        from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

        rank, objects = self.ctx.rank, self.objects
        controls = self.cfg.negative_controls
        check = (not controls & {"skip_conversion", "buddy_sends_own_data"}
                 or "keep_checks" in controls)
        if rank in plan.replaying and rank not in plan.failed and check:
            problems = []
            if fingerprint != objects.state.fingerprint():
                problems.append("parameters or optimizer state")
            if not rng_state.rng_equal(rng_state.capture_rng(), start["rng"]):
                problems.append("RNG streams")
            now = capture_buffers(objects.router_buffers)
            if any(not torch.equal(now[k], v) for k, v in start["buffers"].items()):
                problems.append("router buffers")
            if problems:
                raise RecoveryError(f"replay diverged on surviving rank {rank}: its "
                                    f"{', '.join(problems)} differ from before the failure")
        elif rank not in plan.replaying:
            rng_state.restore_rng(start["rng"])
            restore_buffers(objects.router_buffers, start["buffers"])
        self.upstream.store.drop_iteration(iteration)  # sends of the aborted attempt
        get_moe_metrics_tracker().clear()  # what the replay and the aborted attempt tracked
        MTPLossLoggingHelper.clean_metrics_in_tracker()
        self.pipeline.restart_windows(iteration, agreed)
