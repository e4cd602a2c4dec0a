"""Detecting real process failures (a killed worker, one that stopped answering) on a live rank.

``FailureDetector`` runs ``liveness.Liveness`` on the job's rendezvous store (with torchrun's
c10d rendezvous that store lives in the agent, so it outlives every worker, rank 0 included).

It runs where nothing replaces a dead rank in place (under ``--inprocess-restart`` the Wrapper's
monitor detects failures, and this detector is off). The failure policy's fallback applies on
every surviving rank within about one heartbeat: the main thread may be blocked in a collective with the dead rank that only its
timeout would end, so the heartbeat thread reports and exits the process (as torch's own NCCL
watchdog does), for a restart from the last persistent Megatron checkpoint, or, without one,
with ``EXIT_FATAL``. A main thread whose collective failed instead (the peer's connection reset)
waits for the verdict rather than dying at once and being taken for dead itself.

The one rank that declares the failure records the fallback for the restarted job and, once
every survivor has reported, fences the dead ranks it can reach (a process on its own host
that stopped answering is killed, so it cannot wake up mid-restart).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time

import torch.distributed as dist

from megatron_moetion.adapter.failure_policy import Outcome
from megatron_moetion.liveness import (
    STORE_BUDGET_OPS_S,
    Liveness,
    Verdict,
    scaled_interval,
    wait_for_verdict_on_collective_errors,
)

logger = logging.getLogger(__name__)


class FailureDetector:
    """Liveness for one rank's session (see module docstring).

    Args:
        cfg: the MoEtion configuration (heartbeat interval, detect timeout).
        rank, world_size: this rank and the job's size.
        policy: the failure policy (reports, fallback, exit).
        iteration: returns the iteration this rank is in.
    """

    def __init__(self, cfg, rank: int, world_size: int, policy, iteration):
        self.cfg, self.rank, self.policy, self.iteration = cfg, rank, policy, iteration
        store = dist.distributed_c10d._get_default_store()
        interval = scaled_interval(cfg.heartbeat_interval_s, world_size)
        if interval > cfg.heartbeat_interval_s and rank == 0:
            logger.warning("[moetion] heartbeat interval %.2f s instead of %.2f s: %d ranks "
                           "would offer the rendezvous store more than %.0f ops/s", interval,
                           cfg.heartbeat_interval_s, world_size, STORE_BUDGET_OPS_S)
        self.interval_s = interval
        self.liveness = Liveness(store, rank, world_size, interval,
                                 max(cfg.detect_timeout_s, 2 * interval), self._on_failure,
                                 self._on_declare)

    def start(self) -> None:
        self.liveness.start()
        wait_for_verdict_on_collective_errors(
            self.liveness, self.liveness.timeout_s + 2 * self.interval_s)

    def progress(self, iteration: int, phase: str) -> None:
        self.liveness.progress(iteration, phase)

    def stop(self) -> None:
        self.liveness.stop(finished=True)

    # ------------------------------------------------------------------ on the heartbeat thread
    def _report(self, verdict: Verdict) -> dict:
        # the dead rank's last heartbeat may be from the iteration before; this rank is in the
        # iteration the failure stopped
        fault_iteration = max([self.iteration()] + [v["iteration"]
                                                    for v in verdict.last_seen.values()])
        return self.policy.report(
            cause="process_failure", outcome=self.policy.fallback(), failed=verdict.dead,
            fault_iteration=fault_iteration, reason=verdict.describe(),
            fallback_reason="no reserve rank to replace it in place (--inprocess-restart)",
            detection_s=verdict.silent_s + max(0.0, time.time() - verdict.declared_wall),
            declared_by=verdict.declared_by)

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
        self.policy.record(self._report(verdict))

    def _on_failure(self, verdict: Verdict) -> None:
        report = self._report(verdict)
        try:
            self.policy.emit(report)
        except Exception:  # noqa: BLE001 - reporting must not stop the exit
            pass
        outcome = self.policy.fallback()
        detail = (f" (detected after {report['detection_s']:.1f} s)"
                  if report["outcome"] == "restart_from_checkpoint" else "")

        def last_words():
            self.liveness.settle(verdict)
            if verdict.declared_by == self.rank:
                self._fence(verdict)  # last: a dead process ends the job under torchrun

        error = "RecoveryError: " if outcome is Outcome.FATAL else ""
        self.policy.exit(outcome, f"rank {self.rank}: {error}{report['reason']}; "
                                  f"{self.policy.describe(outcome)}{detail}", before=last_words)
