"""Localized recovery, run by every rank once the agreement names failed ranks.

Call order (all ranks, in ``MoEtionSession`` right after the agreement of the aborted
iteration ``f``)::

    quiesce replication                       # the replication group is free for transfers
    gather Holdings (one all_gather_object)   # what each rank still holds
    plan = plan_recovery(...)                 # identical on every rank
    transfers in plan order                   # windows from buddies, logs from neighbours
    replaying ranks: Replayer.run()           # conversion + catch-up to f-1
    paused ranks: wait                        # ... in the end-of-recovery agreement
    end-of-recovery agreement                 # a failure during recovery restarts it
    finish: check survivors' state, reset the paused ranks' start-of-f state, fresh windows

Afterwards every rank runs iteration ``f`` again. If no window can be recovered in memory,
every rank stops the job for a restart from the last persistent checkpoint (Megatron's own
``--load``), or raises ``RecoveryError`` naming what was lost if there is none.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

import torch
import torch.distributed as dist

from megatron_moetion.adapter import training_state as ts
from megatron_moetion.adapter.replay import Replayer
from megatron_moetion.agreement import agree
from megatron_moetion.errors import RecoveryError
from megatron_moetion.recovery_plan import RecoveryPlan, plan_recovery
from megatron_moetion.snapshot import unpack_meta
from megatron_moetion.transport import Parcel
from megatron_moetion.upstream_log import LogStore

logger = logging.getLogger(__name__)

RECOVERY_TAG = 10_000
EXIT_RESTART_FROM_CHECKPOINT = 75  # the job is restarted; Megatron --load resumes


def _execute_transfers(s, plan: RecoveryPlan) -> dict:
    """Run this rank's part of the transfers; return what it received."""
    got = {"window": None, "fwd": {}, "bwd": {}, "bytes_in": 0, "bytes_out": 0}
    for i, tr in enumerate(plan.transfers):
        tag = RECOVERY_TAG + i
        if tr.src == s.rank:
            if tr.kind == "window":
                w = s.replicator.replica(tr.owner, tr.window_id)
                parcel = Parcel(w.buffer[:w.layout.total_bytes], w.meta_blob, (w.window_id,),
                                w.crc)
            else:
                lo, hi = tr.iterations
                parcel = Parcel(torch.empty(0, dtype=torch.uint8),
                                s.logs.export(tr.kind, range(lo, hi + 1)))
            s.transport.send(tr.dst, parcel, tag)
            got["bytes_out"] += parcel.data.numel() + len(parcel.blob)
        if tr.dst == s.rank:
            received = s.transport.recv(tr.src, tag, alloc=s.engine.pool.get)
            if not received.ok:
                raise RecoveryError(f"{tr.kind} from rank {tr.src} arrived corrupt "
                                    f"({received.reason}); refusing to resume from it")
            got["bytes_in"] += received.parcel.data.numel() + len(received.parcel.blob)
            if tr.kind == "window":
                window = unpack_meta(received.parcel.blob, received.parcel.data)
                window.crc = received.parcel.crc_data
                got["window"] = window
            elif tr.kind in ("fwd", "bwd"):
                for (it, mb, _chunk, _d), t in LogStore.decode(received.parcel.blob).items():
                    got[tr.kind][(it, mb)] = t
            else:
                s.logs.absorb(tr.kind, LogStore.decode(received.parcel.blob))
    return got


FALLBACK_RECORD = "moetion_fallback.json"


def record_fallback(save_dir: str, report: dict) -> None:
    """Append the fallback to ``<save>/moetion_fallback.json``: the restarted job reads it (a
    fault plan is not applied twice) and so do people (the rollback is reported)."""
    path = os.path.join(save_dir, FALLBACK_RECORD)
    history = json.loads(open(path).read()) if os.path.exists(path) else []
    history.append(report)
    with open(path + ".tmp", "w") as f:
        json.dump(history, f, indent=1, default=str)
    os.replace(path + ".tmp", path)


def fallbacks_recorded(load_dir: str | None) -> list:
    path = os.path.join(load_dir or "", FALLBACK_RECORD)
    return json.loads(open(path).read()) if load_dir and os.path.exists(path) else []


def can_restart_from_checkpoint(s) -> bool:
    """A persistent checkpoint exists and the job resumes from it (``--load``) and records
    the fallback beside it (``--save``)."""
    return (s.last_checkpoint_iteration is not None and bool(getattr(s.args, "load", None))
            and bool(getattr(s.args, "save", None)))


def _fallback(s, plan: RecoveryPlan, report: dict) -> None:
    """Nothing recoverable in memory: restart from the last persistent checkpoint, or fail."""
    checkpoint = s.last_checkpoint_iteration
    report.update(fallback=True, reason=plan.reason, lost=plan.lost,
                  checkpoint_iteration=checkpoint,
                  rollback_iterations=(plan.fault_iteration - 1 - checkpoint)
                  if checkpoint is not None else None)
    s.emit_recovery(report)
    if can_restart_from_checkpoint(s):
        if s.rank == 0:
            record_fallback(s.args.save, report)
            logger.error("[moetion] %s; stopping for a restart from the persistent checkpoint "
                         "of iteration %d (Megatron --load), a rollback of %d iterations",
                         plan.reason, checkpoint, plan.fault_iteration - 1 - checkpoint)
        s.shutdown()
        dist.barrier(group=s.control_group)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_RESTART_FROM_CHECKPOINT)
    raise RecoveryError(
        f"iteration {plan.fault_iteration}: {plan.reason}; and there is no persistent "
        f"checkpoint to fall back to (--save/--load), so the training state is lost",
        lost=plan.lost)


def recover(s, failed, fault_iteration: int, kwargs: dict, forward_backward_func) -> dict:
    """Recover from ``failed`` ranks losing their state during ``fault_iteration``."""
    start = time.perf_counter()
    failed = set(failed)
    fingerprint = ts.state_fingerprint(s.model, s.optimizer) if s.rank not in failed else None
    report = {"kind": "recovery", "fault_iteration": fault_iteration, "attempts": 0,
              "phases": {}, "bytes_pulled": 0, "bytes_shipped": 0}
    phases = report["phases"]

    def phase(name, t0):
        phases[name] = phases.get(name, 0.0) + time.perf_counter() - t0

    while True:
        report["attempts"] += 1
        i_am_failed = s.rank in failed
        s.begin_recovery(fault_iteration, i_am_failed)
        t0 = time.perf_counter()
        gathered = [None] * s.world_size
        dist.all_gather_object(gathered, s.holdings(), group=s.control_group)
        holdings = {h.rank: h for h in gathered}
        plan = plan_recovery(s.topology, sorted(failed), fault_iteration, holdings,
                             upstream_logging=s.cfg.upstream_logging)
        phase("plan", t0)
        report.update(failed=list(plan.failed), ranks_replaying=list(plan.replaying),
                      ranks_paused=list(plan.paused))
        s.recovery_role = "replaying" if s.rank in plan.replaying else "paused"
        if plan.fallback:
            _fallback(s, plan, report)
        t0 = time.perf_counter()
        got = _execute_transfers(s, plan)
        report["bytes_pulled"] += got["bytes_in"]
        report["bytes_shipped"] += got["bytes_out"]
        phase("transfer", t0)
        if s.rank in plan.replaying:
            window = got["window"] or s.windows.local(plan.anchor_window)
            if window is None:
                raise RecoveryError(f"rank {s.rank} has no copy of window {plan.anchor_window}")
            s.flow.sources = {"fwd": got["fwd"], "bwd": got["bwd"]}
            s.flow.prev_live = s.topology.prev_rank(s.rank) in plan.replaying
            s.flow.next_live = s.topology.next_rank(s.rank) in plan.replaying
            replayer = Replayer(s, plan, window, kwargs, forward_backward_func,
                                on_first_iteration=lambda: s.fire("recovery"))
            replayer.run()
            for name, seconds in replayer.phases.items():
                phases[name] = phases.get(name, 0.0) + seconds
            if got["window"] is not None:
                s.windows.adopt(got["window"])
        else:
            s.fire("recovery")
        t0 = time.perf_counter()
        finished, acked = s.replicator.status()
        ended = agree(s.control_group, s.world_size, s.rank, lost=s.lost,
                      finished_round=finished, acked_window=acked, window_proposal=0)
        phase("wait", t0)
        if not ended.failed:
            break
        failed |= set(ended.failed)
        logger.warning("[moetion] ranks %s lost their state during recovery; restarting it",
                       list(ended.failed))
    s.flow.replaying, s.flow.sources = False, {"fwd": {}, "bwd": {}}
    s.finish_recovery(plan, fingerprint)
    s.recovery_role = None
    report.update(
        anchor_window=plan.anchor_window, anchor_iteration=plan.anchor_start,
        window=plan.window, conversion_iterations=len(plan.conversion),
        catch_up_iterations=len(plan.catch_up), replayed_iterations=plan.replayed_iterations,
        rank_iterations_replayed=plan.replayed_iterations * len(plan.replaying),
        seconds=time.perf_counter() - start,
        last_checkpoint_iteration=s.last_checkpoint_iteration,
    )
    # What the alternatives would have replayed: every rank from the last persistent checkpoint
    # (from the start of training if there is none), or every rank from the same window.
    rollback = fault_iteration - 1 - (s.last_checkpoint_iteration or 0)
    report["global_rollback_rank_iterations"] = rollback * s.world_size
    report["global_replay_from_window_rank_iterations"] = plan.replayed_iterations * s.world_size
    return report
