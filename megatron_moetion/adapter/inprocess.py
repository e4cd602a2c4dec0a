"""In-process replacement of a dead rank: survivors re-enter ``pretrain()`` keeping their state.

``run(pretrain_once)`` wraps one call of Megatron's ``pretrain()`` (``pretrain_once(store)``:
parse the arguments, ``prepare_arguments(args)``, ``pretrain(..., store=store)``). Without warm
spares (no ``MOETION_PROCESS_ID`` in the environment) it is one plain call. With them (see
``megatron_moetion.replacement``), per generation ``g``:

* a survivor whose ``pretrain()`` raised waits for the liveness verdict (none within the detect
  timeout: the error was not a peer's death and is raised), shuts its peer connections down
  (releasing every operation blocked on it, here and on its peers), suspends its MoEtion
  session (its state as plain tensors; windows, replicas, logs stay in memory), tears Megatron's
  global state and every process group down, publishes where it stands and reads the decision;
* a dead rank's place goes to the next warm spare, which was waiting with its imports done;
* everyone enters ``pretrain()`` again on generation ``g + 1``'s store prefix. Megatron builds
  the same groups in the same order and the same model and optimizer (every set-up collective
  is met because every rank runs the same code); ``--load`` is skipped; survivors move their
  kept state into the new objects (``MoEtionSession.resume``) and resume the iteration that
  was cut short; the spare resumes there too, holding nothing, so the first agreement names it
  failed and the localized recovery restores it from its buddies and neighbours.

When the survivors stopped at different points (one after an optimizer step the others did not
reach) or no spare is left, the failure policy's fallback applies: every rank stops for a restart
from the persistent checkpoint, as without spares.

The engine that restarts ranks in place sits behind two small interfaces, so that another one
(Megatron's own ``--inprocess-restart``, nvidia-resiliency-ext's ``Wrapper``) can take its place:
``RankAssignment`` (who replaces whom, and where the next generation resumes:
``replacement.Membership`` over the job's store) and ``Abort`` (release every operation of the
failed generation and tear its state down: ``StoreAbort``). The driver owns the process's
``Runtime``, the object the hooks act on.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Protocol

from megatron_moetion.adapter.failure_policy import Outcome
from megatron_moetion.adapter.runtime import Runtime, install
from megatron_moetion.replacement import (
    Assignment,
    Decision,
    membership_from_env,
    shut_down_peer_connections,
)

logger = logging.getLogger(__name__)

DECISION_TIMEOUT_S = 120.0


class RankAssignment(Protocol):
    """Who replaces a dead rank, and where the next generation resumes."""

    process_id: int
    is_spare: bool
    store: object

    def wait_for_assignment(self) -> Assignment | None: ...

    def hand_off(self, generation: int, rank: int, state: dict) -> None: ...

    def decide(self, generation: int, rank: int, dead: list[int],
               timeout_s: float) -> Decision: ...

    def finish(self) -> None: ...


class Abort(Protocol):
    """Leave a failed generation: release every operation still pending on its groups (here
    and on peers blocked on this rank), then tear Megatron's state and the groups down."""

    def release_peers(self) -> None: ...

    def teardown(self) -> None: ...


class StoreAbort:
    """The current engine's abort: shut this process's connections to its peers down (every
    pending operation of the generation fails now), then Megatron's global state and every
    process group."""

    def release_peers(self) -> None:
        shut_down_peer_connections(int(os.environ.get("MASTER_PORT", "0")))

    def teardown(self) -> None:
        import torch.distributed as dist
        from megatron.training.training import destroy_global_state

        try:
            destroy_global_state()
        except Exception:  # noqa: BLE001 - best effort: the next generation rebuilds all of it
            logger.exception("[moetion] tearing Megatron's global state down failed")
        if dist.is_initialized():
            dist.destroy_process_group()
        gc.collect()  # the last references to the old groups go: their sockets close


def spares_started() -> bool:
    """Whether the launcher started MoEtion's warm spares (``testing.launch.run_with_spares``)."""
    from megatron_moetion.replacement import ENV_PROCESS_ID

    return ENV_PROCESS_ID in os.environ


def _connect_store():
    from datetime import timedelta

    import torch.distributed as dist

    return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                         is_master=False, timeout=timedelta(seconds=300))


def run(pretrain_once: Callable[[object], None], *, assignment: RankAssignment | None = None,
        abort: Abort | None = None) -> None:
    """Run training, replacing dead ranks by warm spares where the launcher started some."""
    assignment = assignment or membership_from_env(_connect_store)
    runtime = install(Runtime(restart_engine="moetion" if assignment else None))
    if assignment is None:
        pretrain_once(None)
        return
    import torch.distributed as dist

    driver = _Driver(runtime, assignment, abort or StoreAbort())
    generation, rank = 0, assignment.process_id
    if assignment.is_spare:
        assigned = assignment.wait_for_assignment()
        if assigned is None:
            logger.info("[moetion] spare %d: the job finished without needing it",
                        assignment.process_id)
            return
        generation, rank = assigned.generation, assigned.rank
        runtime.join_next_generation(assigned.resume)
        logger.warning("[moetion] spare %d replaces rank %d in generation %d (resuming "
                       "iteration %s)", assignment.process_id, rank, generation,
                       assigned.resume.get("iteration"))
    while True:
        os.environ["RANK"] = str(rank)
        store = dist.PrefixStore(f"moetion/gen{generation}", assignment.store)
        try:
            pretrain_once(store)
        except BaseException as exc:  # noqa: BLE001 - decided below: replace, or raise
            try:
                generation = driver.after_failure(generation, rank, exc)
            except BaseException:
                driver.release_spares()  # the job ends: idle spares leave too
                raise
            restore_module_state(driver.fresh)
            continue
        if rank == 0:
            assignment.finish()
        return


_STATEFUL_MODULES = ("megatron.training.training", "megatron.training.checkpointing")


def module_state() -> dict:
    """Module-level state of Megatron's training code as a fresh process has it. Survivors
    restore it before re-entering ``pretrain()``: it decides which set-up collectives run
    (``_STARTUP_TIMESTAMPS`` adds an all-reduce once set), and a spare runs with it fresh."""
    import copy
    import importlib

    state = {}
    for name in _STATEFUL_MODULES:
        module = importlib.import_module(name)
        for key, value in vars(module).items():
            if key.startswith("_") and key[1:2].isupper() and (
                    value is None or isinstance(value, (bool, int, float, str, dict))):
                state[(name, key)] = copy.deepcopy(value)
    return state


def restore_module_state(state: dict) -> None:
    import copy

    for (name, key), value in state.items():
        setattr(sys.modules[name], key, copy.deepcopy(value))


class _Driver:
    """The generation changes of one process (see the module docstring)."""

    def __init__(self, runtime: Runtime, assignment: RankAssignment, abort: Abort):
        self.runtime, self.assignment, self.abort = runtime, assignment, abort
        self.fresh = module_state()

    def release_spares(self) -> None:
        try:
            self.assignment.finish()
        except Exception:  # noqa: BLE001 - the store may be gone with the job
            pass

    def after_failure(self, generation: int, rank: int, exc: BaseException) -> int:
        """Leave the failed generation; return the next one (or raise ``exc``)."""
        session = self.runtime.session
        if session is None or isinstance(exc, KeyboardInterrupt):
            raise exc
        t0 = time.monotonic()
        verdict = session.detector.await_verdict()
        if verdict is None:
            raise exc
        logger.warning("[moetion] rank %d left generation %d after %s: %s", rank, generation,
                       type(exc).__name__, str(exc)[:200])
        _drop_frames(exc)  # its traceback holds the failed generation's objects
        del exc
        # first of all: every operation of this generation still pending here or on a peer
        # blocked on this rank (a replication round, a pipeline receive) fails now, rather than
        # holding this rank or its peers until their timeouts
        self.abort.release_peers()
        kept = self.runtime.suspend_session()
        self.abort.teardown()
        self.assignment.hand_off(generation, rank, {"resume": kept})
        decision = self.assignment.decide(generation, rank, verdict.dead, DECISION_TIMEOUT_S)
        policy = session.policy
        outcome = policy.fallback() if decision.fallback else Outcome.REPLACE_IN_PLACE
        report = policy.report(
            cause="process_failure", outcome=outcome, failed=verdict.dead,
            fault_iteration=session.iteration, reason=verdict.describe(),
            fallback_reason=decision.fallback or None,
            detection_s=verdict.silent_s + max(0.0, time.time() - verdict.declared_wall),
            declared_by=verdict.declared_by, generation=decision.generation,
            replaced_by={str(k): v for k, v in decision.replaced_by.items()},
            seconds_to_decision=time.monotonic() - t0)
        policy.metrics.write({"rank": rank, **report})
        if decision.fallback:
            self.release_spares()
            policy.exit(outcome, f"rank {rank}: {decision.fallback}; {policy.describe(outcome)}")
        self.runtime.resume_next_generation(decision.resume)
        return decision.generation


def _drop_frames(exc: BaseException | None) -> None:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        exc.__traceback__ = None
        exc = exc.__context__ or exc.__cause__
