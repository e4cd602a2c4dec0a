"""Deterministic fault injection into a live Megatron rank (``--moetion-fault-plan``).

``FaultInjector.due(phase, iteration)`` returns the planned faults of this rank that fire now.
Each fires once per job: a fired fault is appended to ``<save>/moetion_faults_fired.jsonl``, and
a job restarted from its checkpoint does not fire it again. ``terminate_self`` carries out
``kill`` (SIGKILL of this worker) and ``hang`` (SIGSTOP: every thread of the process stops and
it answers nothing until something kills it). ``wipe_rank_state`` carries out ``lose_state``:
it overwrites the model's parameters and buffers, the optimizer's main weights and state, the LR
scheduler's counters and the RNG streams with garbage (NaN, where a dtype allows it), so
anything recovery fails to restore shows up in the bitwise comparison. The caller also drops the
rank's snapshots, the replicas it holds and its logs. The process and its process groups stay
up.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys

import torch

from megatron_moetion.adapter.optimizer_state import main_states
from megatron_moetion.testing.faults import Fault, FaultPlan

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


_GARBAGE = torch.Generator().manual_seed(0xBAD)


def _garbage(t: torch.Tensor) -> None:
    """Overwrite with small finite noise: NaN would trip Megatron's own NaN checks, whose
    rerun machinery then re-runs only some ranks' forward-backward, a divergence no real
    failure causes (a dead rank sends nothing at all)."""
    if t.is_floating_point():
        noise = torch.randn(t.shape, generator=_GARBAGE, dtype=torch.float32) * 0.02
        t.copy_(noise.abs().to(t.device, t.dtype))
    else:
        t.fill_(0)


@torch.no_grad()
def wipe_rank_state(model_chunks, optimizer, scheduler, bindings) -> None:
    """Destroy this rank's training state in place (see module docstring). Buffers that are
    state (every operator's captured buffers: router bias and token counters, persistent
    buffers) are wiped; constant non-persistent buffers (RoPE frequencies) are what a restarted
    process would rebuild from code, so they are left alone."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    for chunk in model_chunks:
        for p in chunk.parameters():
            _garbage(p.data)
    for binding in bindings:
        for _, b in binding.buffers:
            _garbage(b)
    for ms in main_states(optimizer):
        if not ms.shard_is_view:
            _garbage(ms.main_param.data)
        for value in ms.state().values():
            if torch.is_tensor(value):
                _garbage(value)
    if scheduler is not None:
        scheduler.num_steps = -12345
    for group in optimizer.param_groups:
        group["lr"] = 0.5
        if "step" in group:  # FusedAdam's group-level step
            group["step"] = 12345
    from megatron.core.tensor_parallel.random import _get_cuda_rng_state

    torch.manual_seed(0xDEAD)  # also reseeds the CUDA generator
    garbage = _get_cuda_rng_state(clone=True)  # valid, but not the state the rank had
    tracker = get_cuda_rng_tracker()
    tracker.set_states({k: garbage.clone() for k in tracker.get_states()})
