"""Deterministic fault injection into a live Megatron rank (``--moetion-fault-plan``).

``FaultInjector.due(phase, iteration)`` returns the planned faults of this rank that fire now.
Each fires once per job: a fired fault is appended to ``<save>/moetion_faults_fired.jsonl``, and
a job restarted from its checkpoint does not fire it again. ``terminate_self`` carries out
``kill`` (SIGKILL of this worker) and ``hang`` (SIGSTOP: every thread of the process stops and
it answers nothing until something kills it). ``lose_state`` is carried out by the session:
``RankState.wipe`` overwrites the rank's training state with garbage, and every component drops
what it holds (windows, the replicas it keeps, logs); the process and its groups stay up.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys

import torch

from megatron_moetion.fault_plan import Fault, FaultPlan

logger = logging.getLogger(__name__)


class FaultInjector:
    """This rank's part of a fault plan."""

    def __init__(self, plan: FaultPlan, rank: int, world_size: int, fired_log: str = ""):
        plan.validate_world(world_size)
        self.fired_log = fired_log
        self.fired_before = sorted(fired_faults(fired_log))  # by any rank, earlier attempts
        self.pending = [f for f in plan.for_rank(rank) if str(f) not in self.fired_before]
        self.skipped = len(plan.for_rank(rank)) - len(self.pending)
        self.fired: list[tuple[Fault, int]] = []

    def due(self, phase: str, iteration: int, *, at_or_after: bool = False) -> list[Fault]:
        """Faults of ``phase`` planned for ``iteration`` (or earlier, with ``at_or_after``)."""
        hits = [f for f in self.pending if f.phase == phase and (
            f.iteration == iteration or (at_or_after and f.iteration <= iteration))]
        for f in hits:
            self.pending.remove(f)
            self.fired.append((f, iteration))
            logger.warning("[moetion] injecting fault %s (at iteration %d)", f, iteration)
            if self.fired_log:
                os.makedirs(os.path.dirname(self.fired_log) or ".", exist_ok=True)
                line = json.dumps({"fault": str(f), "iteration": iteration}) + "\n"
                fd = os.open(self.fired_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                try:
                    os.write(fd, line.encode())  # one small O_APPEND write: ranks never mix
                finally:
                    os.close(fd)
        return hits


FIRED_LOG = "moetion_faults_fired.jsonl"


def fired_faults(path: str) -> set[str]:
    """The faults (as text) already fired by earlier attempts of this job."""
    if not path or not os.path.exists(path):
        return set()
    with open(path) as f:
        return {json.loads(line)["fault"] for line in f if line.strip()}


def terminate_self(kind: str) -> None:
    """``kill``: SIGKILL this process; ``hang``: SIGSTOP it (it never resumes by itself)."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os.kill(os.getpid(), signal.SIGKILL if kind == "kill" else signal.SIGSTOP)
    signal.pause()  # not reached for kill; a stopped process never gets here either


def firing_forward_step(forward_step_func, faults: FaultInjector, iteration: int, fire):
    """``forward_step_func``, firing ``fwd`` faults before the first forward micro-batch of
    ``iteration`` and ``bwd`` faults when its first backward micro-batch reaches this rank
    (``fire(phase)``); unchanged when none is planned."""
    if not any(f.phase in ("fwd", "bwd") and f.iteration == iteration for f in faults.pending):
        return forward_step_func
    state = {"first": True}

    def forward_step(*args, **kwargs):
        first, state["first"] = state["first"], False
        if first:
            fire("fwd")
        output, loss_func = forward_step_func(*args, **kwargs)
        if first and torch.is_tensor(output) and output.requires_grad:
            output.register_hook(lambda grad: fire("bwd"))
        elif first:
            fire("bwd")
        return output, loss_func

    return forward_step
