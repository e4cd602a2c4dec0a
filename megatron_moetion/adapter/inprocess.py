"""In-process replacement of a dead rank: survivors re-enter ``pretrain()`` keeping their state.

``run(pretrain_once)`` wraps one call of Megatron's ``pretrain()`` (``pretrain_once(store)``:
parse the arguments, ``prepare_arguments(args)``, ``pretrain(..., store=store)``). Without warm
spares (no ``MOETION_PROCESS_ID`` in the environment) it is one plain call. With them (see
``megatron_moetion.replacement``), per generation ``g``:

* a survivor whose ``pretrain()`` raised waits for the liveness verdict (none within the detect
  timeout: the error was not a peer's death and is raised), shuts its peer connections down
  (releasing every operation blocked on it, here and on its peers), keeps its MoEtion session
  (its state as plain tensors; windows, replicas, logs stay in memory), tears Megatron's global
  state and every process group down, publishes where it stands and reads the decision;
* a dead rank's place goes to the next warm spare, which was waiting with its imports done;
* everyone enters ``pretrain()`` again on generation ``g + 1``'s store prefix. Megatron builds
  the same groups in the same order and the same model and optimizer (every set-up collective
  is met because every rank runs the same code); ``--load`` is skipped; survivors move their
  kept state into the new objects (``handover.rebind``) and resume the iteration that
  was cut short; the spare resumes there too, holding nothing, so the first agreement names it
  failed and the localized recovery restores it from its buddies and neighbours.

When the survivors stopped at different points (one after an optimizer step the others did not
reach) or no spare is left, every rank stops for a restart from the persistent checkpoint, as
without spares.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import time
from collections.abc import Callable

from megatron_moetion import megatron_hooks
from megatron_moetion.adapter import handover
from megatron_moetion.replacement import (
    Membership,
    membership_from_env,
    shut_down_peer_connections,
)

logger = logging.getLogger(__name__)

DECISION_TIMEOUT_S = 120.0


def _connect_store():
    from datetime import timedelta

    import torch.distributed as dist

    return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                         is_master=False, timeout=timedelta(seconds=300))


def run(pretrain_once: Callable[[object], None]) -> None:
    """Run training, replacing dead ranks by warm spares where the launcher started some."""
    membership = membership_from_env(_connect_store)
    if membership is None:
        pretrain_once(None)
        return
    import torch.distributed as dist

    fresh = _module_state()
    generation, rank = 0, membership.process_id
    if membership.is_spare:
        assignment = membership.wait_for_assignment()
        if assignment is None:
            logger.info("[moetion] spare %d: the job finished without needing it",
                        membership.process_id)
            return
        generation, rank = assignment.generation, assignment.rank
        megatron_hooks.join_next_generation(assignment.resume)
        logger.warning("[moetion] spare %d replaces rank %d in generation %d (resuming "
                       "iteration %s)", membership.process_id, rank, generation,
                       assignment.resume.get("iteration"))
    while True:
        os.environ["RANK"] = str(rank)
        store = dist.PrefixStore(f"moetion/gen{generation}", membership.store)
        try:
            pretrain_once(store)
        except BaseException as exc:  # noqa: BLE001 - decided below: replace, or raise
            try:
                generation = _after_failure(membership, generation, rank, exc)
            except BaseException:
                _release_spares(membership)  # the job ends: idle spares leave too
                raise
            _restore_module_state(fresh)
            continue
        if rank == 0:
            membership.finish()
        return


def _release_spares(membership: Membership) -> None:
    try:
        membership.finish()
    except Exception:  # noqa: BLE001 - the store may be gone with the job
        pass


_STATEFUL_MODULES = ("megatron.training.training", "megatron.training.checkpointing")


def _module_state() -> dict:
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


def _restore_module_state(state: dict) -> None:
    import copy

    for (name, key), value in state.items():
        setattr(sys.modules[name], key, copy.deepcopy(value))


def _after_failure(membership: Membership, generation: int, rank: int,
                   exc: BaseException) -> int:
    """Leave the failed generation; return the next one (or raise ``exc``)."""
    session = megatron_hooks.session()
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
    shut_down_peer_connections(int(os.environ.get("MASTER_PORT", "0")))
    kept = handover.keep(session)
    _teardown()
    membership.hand_off(generation, rank, verdict.dead, {"resume": kept})
    decision = membership.decide(generation, rank, verdict.dead, DECISION_TIMEOUT_S)
    detection = verdict.silent_s + max(0.0, time.time() - verdict.declared_wall)
    report = {"kind": "recovery", "cause": "process_failure", "failed": verdict.dead,
              "reason": verdict.describe(), "declared_by": verdict.declared_by,
              "detection_s": detection, "generation": decision.generation,
              "fault_iteration": session.iteration,
              "replaced_by": {str(k): v for k, v in decision.replaced_by.items()},
              "fallback": bool(decision.fallback),
              "seconds_to_decision": time.monotonic() - t0}
    if decision.fallback:
        report["fallback_reason"] = decision.fallback
    session.metrics.write({"rank": rank, **report})
    if decision.fallback:
        _fall_back(membership, session, rank, decision.fallback)
    megatron_hooks.keep_for_next_generation(session, decision.resume)
    return decision.generation


def _teardown() -> None:
    """Megatron's global state and every process group of the failed generation."""
    import torch.distributed as dist
    from megatron.training.training import destroy_global_state

    megatron_hooks.forget_generation()
    try:
        destroy_global_state()
    except Exception:  # noqa: BLE001 - best effort: the next generation rebuilds all of it
        logger.exception("[moetion] tearing Megatron's global state down failed")
    if dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()  # the last references to the old groups go: their sockets close


def _drop_frames(exc: BaseException | None) -> None:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        exc.__traceback__ = None
        exc = exc.__context__ or exc.__cause__


def _fall_back(membership: Membership, session, rank: int, reason: str) -> None:
    """No in-place replacement: stop for a restart from the persistent checkpoint."""
    from megatron_moetion.adapter.failure_detection import EXIT_PEER_LOST
    from megatron_moetion.adapter.recovery import (
        EXIT_RESTART_FROM_CHECKPOINT,
        can_restart_from_checkpoint,
    )

    can = can_restart_from_checkpoint(session)
    logger.error("[moetion] rank %d: %s; %s", rank, reason,
                 f"stopping for a restart from the checkpoint of iteration "
                 f"{session.last_checkpoint_iteration}" if can else
                 "and there is no persistent checkpoint to fall back to, so the training state "
                 "is lost")
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    _release_spares(membership)
    os._exit(EXIT_RESTART_FROM_CHECKPOINT if can else EXIT_PEER_LOST)
