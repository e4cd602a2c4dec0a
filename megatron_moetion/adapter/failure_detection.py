"""Detecting real process failures (a killed worker, one that stopped answering) on a live rank.

``FailureDetector`` runs ``liveness.Liveness`` on the job's rendezvous store (with torchrun's
c10d rendezvous that store lives in the agent, so it outlives every worker, rank 0 included).
Its verdict ends the job on every surviving rank within about one heartbeat: the main thread
may be blocked in a collective with the dead rank that only its timeout would end, so the
heartbeat thread reports and exits the process, as torch's own NCCL watchdog does. A main
thread whose collective failed instead (the peer's connection reset) waits for the verdict
rather than dying at once and being taken for dead itself.

What happens then (today): the job restarts from the last persistent Megatron checkpoint
(``--save``/``--load``), a global rollback, reported with the detection time; without a
checkpoint it is a clear error naming the dead ranks. Survivors keeping their state while a
spare replaces the dead rank is not built yet (see docs/design.md).

The one rank that declares the failure records the fallback for the restarted job and, once
every survivor has reported, fences the dead ranks it can reach (a process on its own host
that stopped answering is killed, so it cannot wake up mid-restart).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import time

import torch.distributed as dist

from megatron_moetion.liveness import Liveness, Verdict, wait_for_verdict_on_collective_errors

logger = logging.getLogger(__name__)


def in_place_replacement() -> bool:
    """Warm spares replace dead ranks (the launcher started them; ``adapter.inprocess``)."""
    from megatron_moetion.replacement import ENV_PROCESS_ID

    return ENV_PROCESS_ID in os.environ

EXIT_PEER_LOST = 76  # a rank died and there is no persistent checkpoint to restart from


class FailureDetector:
    """Liveness for one MoEtion session (see module docstring)."""

    def __init__(self, session):
        self.s = session
        store = dist.distributed_c10d._get_default_store()
        self.liveness = Liveness(store, session.rank, session.world_size,
                                 session.cfg.heartbeat_interval_s, session.cfg.detect_timeout_s,
                                 self._on_failure, self._on_declare)

    def start(self) -> None:
        self.liveness.start()
        cfg = self.s.cfg
        wait_for_verdict_on_collective_errors(
            self.liveness, cfg.detect_timeout_s + 2 * cfg.heartbeat_interval_s)

    def progress(self, iteration: int, phase: str) -> None:
        self.liveness.progress(iteration, phase)

    def stop(self) -> None:
        self.liveness.stop(finished=True)

    # ------------------------------------------------------------------ on the heartbeat thread
    def _report(self, verdict: Verdict) -> dict:
        s = self.s
        checkpoint = s.last_checkpoint_iteration
        detection = verdict.silent_s + max(0.0, time.time() - verdict.declared_wall)
        # the dead rank's last heartbeat may be from the iteration before; this rank is in the
        # iteration the failure stopped
        fault_iteration = max([s.iteration] + [v["iteration"] for v in verdict.last_seen.values()])
        return {"kind": "recovery", "cause": "process_failure", "fallback": True,
                "failed": verdict.dead, "reason": verdict.describe(),
                "fault_iteration": fault_iteration, "detection_s": detection,
                "declared_by": verdict.declared_by, "checkpoint_iteration": checkpoint,
                "rollback_iterations": (s.iteration - 1 - checkpoint
                                        if checkpoint is not None else None),
                "global_rollback_rank_iterations": (s.iteration - 1 - (checkpoint or 0))
                * s.world_size}

    @staticmethod
    def _fence(verdict: Verdict) -> None:
        host = socket.gethostname()
        for rank, seen in verdict.last_seen.items():
            if seen.get("host") == host and seen.get("pid") not in (None, os.getpid()):
                try:
                    os.kill(int(seen["pid"]), signal.SIGKILL)
                    logger.warning("[moetion] fenced rank %d (pid %s): killed", rank,
                                   seen["pid"])
                except (ProcessLookupError, PermissionError):
                    pass

    def _on_declare(self, verdict: Verdict) -> None:
        from megatron_moetion.adapter.recovery import can_restart_from_checkpoint, record_fallback

        if in_place_replacement():
            self._fence(verdict)  # at once: survivors blocked on it are released by its death
        elif can_restart_from_checkpoint(self.s):
            record_fallback(self.s.args.save, self._report(verdict))

    def await_verdict(self) -> Verdict | None:
        """After a collective failed on this rank: the verdict, or None within the detect
        timeout (then the failure was not a peer's death)."""
        cfg = self.s.cfg
        return self.liveness.wait_for_verdict(cfg.detect_timeout_s + 2 * cfg.heartbeat_interval_s)

    def _on_failure(self, verdict: Verdict) -> None:
        if in_place_replacement():  # the main thread leaves the generation (adapter.inprocess)
            logger.error("[moetion] rank %d: %s; replacing it in place", self.s.rank,
                         verdict.describe())
            return
        from megatron_moetion.adapter.recovery import (
            EXIT_RESTART_FROM_CHECKPOINT,
            can_restart_from_checkpoint,
        )

        report = self._report(verdict)
        try:
            self.s.metrics.write({"rank": self.s.rank, **report})
        except Exception:  # noqa: BLE001 - reporting must not stop the exit
            pass
        if can_restart_from_checkpoint(self.s):
            logger.error("[moetion] rank %d: %s; stopping for a restart from the persistent "
                         "checkpoint of iteration %d (detected after %.1f s)", self.s.rank,
                         report["reason"], self.s.last_checkpoint_iteration,
                         report["detection_s"])
            code = EXIT_RESTART_FROM_CHECKPOINT
        else:
            logger.error("[moetion] rank %d: RecoveryError: %s; and there is no persistent "
                         "checkpoint to fall back to (--save/--load), so the training state is "
                         "lost", self.s.rank, report["reason"])
            code = EXIT_PEER_LOST
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        self.liveness.settle(verdict)
        if verdict.declared_by == self.s.rank:
            self._fence(verdict)  # last: a dead process ends the job under torchrun
        os._exit(code)
