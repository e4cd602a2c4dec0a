"""One failure policy: the outcomes of a failure, the one way a rank exits, one report schema.

Whoever learns of a failure (the agreement after a lost state, the liveness verdict on a dead or
hung rank, the in-place replacement's decision) ends in one of four outcomes:

* ``RECOVER_IN_MEMORY``: the localized recovery restores the failed ranks from their buddies'
  windows and their neighbours' logs; nobody stops (``adapter.recovery``);
* ``REPLACE_IN_PLACE``: a reserve rank takes a dead rank's place, the survivors keep their state
  (Megatron's ``--inprocess-restart``: ``adapter.nvrx_restart``), then the recovery restores
  the reserve rank;
* ``RESTART_FROM_CHECKPOINT``: nothing recoverable in memory; every rank exits with
  ``EXIT_RESTART_FROM_CHECKPOINT`` and the restarted job resumes from Megatron's ``--load``
  (the fallback is recorded beside the checkpoint for it, and for people);
* ``FATAL``: the same, without a persistent checkpoint to restart from: the state is lost.

``FailurePolicy.report`` builds every recovery record the metrics files hold (one schema,
``REPORT_FIELDS``), and ``FailurePolicy.exit`` is the only place a rank leaves the job.
"""

from __future__ import annotations

import enum
import json
import logging
import os
import sys
from collections.abc import Callable
from typing import NoReturn

logger = logging.getLogger(__name__)

EXIT_RESTART_FROM_CHECKPOINT = 75  # the job is restarted; Megatron --load resumes
EXIT_FATAL = 76  # a rank died or lost its state and there is no checkpoint to restart from
FALLBACK_RECORD = "moetion_fallback.json"


class Outcome(enum.Enum):
    RECOVER_IN_MEMORY = "recover_in_memory"
    REPLACE_IN_PLACE = "replace_in_place"
    RESTART_FROM_CHECKPOINT = "restart_from_checkpoint"
    FATAL = "fatal"

    @property
    def falls_back(self) -> bool:
        return self in (Outcome.RESTART_FROM_CHECKPOINT, Outcome.FATAL)


# Every recovery record has these fields; an outcome adds its own details after them.
REPORT_FIELDS = ("kind", "cause", "outcome", "fallback", "failed", "fault_iteration", "reason",
                 "checkpoint_iteration", "rollback_iterations",
                 "global_rollback_rank_iterations")


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


class FailurePolicy:
    """This rank's side of the policy (see the module docstring).

    Args:
        rank, world_size: this rank and the job's size (for the rollback it reports).
        args: Megatron's arguments (``--save`` / ``--load``).
        metrics: the rank's ``MetricsWriter``.
        last_checkpoint_iteration: the persistent checkpoint ``--load`` resumed, if any; moved
            on by ``checkpoint_saved``.
    """

    def __init__(self, rank: int, world_size: int, args, metrics,
                 last_checkpoint_iteration: int | None = None):
        self.rank, self.world_size, self.args, self.metrics = rank, world_size, args, metrics
        self.last_checkpoint_iteration = last_checkpoint_iteration

    def rebind(self, args) -> None:
        """A new generation's arguments."""
        self.args = args

    def checkpoint_saved(self, iteration: int) -> None:
        self.last_checkpoint_iteration = iteration

    def can_restart_from_checkpoint(self) -> bool:
        """A persistent checkpoint exists and the job resumes from it (``--load``) and records
        the fallback beside it (``--save``)."""
        return (self.last_checkpoint_iteration is not None
                and bool(getattr(self.args, "load", None))
                and bool(getattr(self.args, "save", None)))

    def fallback(self) -> Outcome:
        """The outcome when nothing can be recovered in memory or in place."""
        return (Outcome.RESTART_FROM_CHECKPOINT if self.can_restart_from_checkpoint()
                else Outcome.FATAL)

    def report(self, *, cause: str, outcome: Outcome, failed, fault_iteration: int,
               reason: str, **details) -> dict:
        """A recovery record: ``REPORT_FIELDS`` first, then ``details``."""
        checkpoint = self.last_checkpoint_iteration
        since = fault_iteration - 1 - (checkpoint or 0)
        record = {"kind": "recovery", "cause": cause, "outcome": outcome.value,
                  "fallback": outcome.falls_back, "failed": sorted(failed),
                  "fault_iteration": fault_iteration, "reason": reason,
                  "checkpoint_iteration": checkpoint,
                  "rollback_iterations": since if checkpoint is not None else None,
                  # what a global rollback costs: every rank from the last persistent
                  # checkpoint (from the start of training if there is none)
                  "global_rollback_rank_iterations": since * self.world_size}
        record.update(details)
        return record

    def emit(self, report: dict) -> None:
        self.metrics.write({"rank": self.rank, **report})
        if self.rank == 0:
            logger.warning("[moetion] recovery: %s", json.dumps(report, default=str))

    def report_restart(self, faults_fired_before: list[str]) -> None:
        """On a job restarted from its checkpoint after a failure: report the rollback (the
        last fallback recorded beside the checkpoint, and the planned faults that fired)."""
        history = fallbacks_recorded(getattr(self.args, "load", None))
        if (history or faults_fired_before) and self.last_checkpoint_iteration is not None:
            self.metrics.write({"rank": self.rank, "kind": "restart",
                                "checkpoint_iteration": self.last_checkpoint_iteration,
                                "fallbacks_before": len(history),
                                "last_fallback": history[-1] if history else None,
                                "faults_fired_before": faults_fired_before})

    def record(self, report: dict) -> None:
        """Record a fallback beside the checkpoint (one rank does, for the restarted job)."""
        if self.can_restart_from_checkpoint():
            record_fallback(self.args.save, report)

    def describe(self, outcome: Outcome) -> str:
        if outcome is Outcome.RESTART_FROM_CHECKPOINT:
            return (f"stopping for a restart from the persistent checkpoint of iteration "
                    f"{self.last_checkpoint_iteration} (Megatron --load)")
        return ("and there is no persistent checkpoint to fall back to (--save/--load), so the "
                "training state is lost")

    @staticmethod
    def exit(outcome: Outcome, message: str | None = None,
             before: Callable[[], None] | None = None) -> NoReturn:
        """Leave the job now with ``outcome``'s exit code: log ``message``, flush, run
        ``before`` (last words that must not be lost), and exit without unwinding (the main
        thread may be blocked in a collective that only a timeout would end)."""
        if outcome not in (Outcome.RESTART_FROM_CHECKPOINT, Outcome.FATAL):
            raise ValueError(f"a rank exits only to restart or on a fatal failure; got {outcome}")
        if message:
            logger.error("[moetion] %s", message)
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        if before is not None:
            before()
        os._exit(EXIT_RESTART_FROM_CHECKPOINT if outcome is Outcome.RESTART_FROM_CHECKPOINT
                 else EXIT_FATAL)
