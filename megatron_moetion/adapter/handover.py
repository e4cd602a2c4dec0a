"""What a MoEtion session carries across generations of the in-place replacement.

``keep(s)``: a survivor of a failed generation stops what runs in the background, turns its
training state into plain tensors and drops every reference to the old Megatron objects and
process groups (``release``), and says where it stands. ``rebind(s, ...)``: in the next
generation it moves that state into the objects Megatron just built and rebuilds what points
into groups, model or optimizer. ``join(s, resume)``: a warm spare's fresh session takes the
dead rank's place holding nothing (see ``adapter.inprocess``).
"""

from __future__ import annotations

from megatron_moetion.adapter import training_state as ts
from megatron_moetion.adapter.failure_detection import FailureDetector
from megatron_moetion.adapter.optimizer_state import (
    detach_training_state,
    ensure_optimizer_state,
    restore_optimizer_caches,
    transplant,
)
from megatron_moetion.adapter.replay import negative_control


def join(s, resume: dict) -> None:
    """A warm spare taking a dead rank's place: it holds no window, replica or log, and
    its optimizer has no state yet (a restore writes into it)."""
    ensure_optimizer_state(s.optimizer)
    restore_optimizer_caches(s.optimizer, resume.get("optimizer_caches", []))
    s.lost = True
    # every rank numbers windows and replication rounds alike (the agreement compares them)
    s.windows.next_window_id = int(resume["next_window_id"])
    s.windows.last_round = int(resume["last_round"])
    s.replicator.finished_round = int(resume["last_round"])  # none of its own in flight
    s.first_iteration = int(resume["iteration"])
    s.snapshots.next_window_start = s.first_iteration + 1
    s._partners_checked = True  # the survivors checked data partners at the start


def keep(s) -> dict:
    """A survivor of a failed generation: stop what runs in the background and say where
    this rank's training state stands. Its model, optimizer, windows, replicas and logs
    stay in memory for ``rebind`` in the next generation."""
    s.detector.liveness.stop(finished=False)
    s.replicator.quiesce(s.cfg.timeout_s)
    s.engine.wait_for_copies()
    s._kept_state = detach_training_state(s.model, s.optimizer, s.scheduler)
    if "stale_survivors" in negative_control():  # tests: survivors lose optimizer state
        s._kept_state["main"] = [(n, a, b, m, {}) for n, a, b, m, _ in s._kept_state["main"]]
    # a rank the interrupted recovery was replaying holds a half-rebuilt state: it is
    # restored again, as a failed rank, in the next generation
    s._lost_again = s.recovery_role == "replaying"
    release(s)
    if s._stepped >= s.iteration:  # stopped after this iteration's optimizer step
        return {"iteration": s.iteration + 1, "after_step": True}
    s._resume_at = s.iteration
    for kind in ("data", "fwd", "bwd", "record"):  # the aborted attempt's, partial
        s.logs.drop_iteration(s.iteration, (kind,))
    return {"iteration": s.iteration,
            # the job's window and round numbering, which a spare continues
            "next_window_id": s.windows.next_window_id,
            "last_round": s.windows.last_round,
            "optimizer_caches": s._kept_state["caches"],
            "consumed_train_samples": s._start_state["consumed"],
            "flops": s._start_state["flops"],
            "last_checkpoint_iteration": s.last_checkpoint_iteration}


def release(s) -> None:
    """Drop every reference to the failed generation's Megatron objects and process
    groups: a group's sockets close only once nothing refers to it, and peers blocked on
    this rank are released by that."""
    s.probe.uninstall()
    s.snapshots.release()
    s.model = s.optimizer = s.scheduler = None
    s.bindings, s.router_buffers = [], []
    s.control_group = s.replication_group = s.pp_group = None
    s.pg_collection = s.transport = s.p2p = None
    s.replicator.transport = None


def rebind(s, model, optimizer, scheduler, args) -> None:
    """Next generation, on a survivor: move this rank's live training state into the
    objects Megatron just built on the new process groups (nothing is read from disk or
    replayed), and rebuild what points into groups, model or optimizer."""
    s.args = args
    transplant(s._kept_state, model, optimizer, scheduler)
    s._kept_state = None
    s._connect()
    s.replicator.transport = s.transport
    s._bind(model, optimizer, scheduler)
    s.snapshots.rebind(s.bindings, optimizer, s._gather)
    ts.restore_rng(s._start_state["rng"])
    ts.restore_buffers(s.router_buffers, s._start_state["buffers"])
    s.flow.replaying, s.flow.sources = False, {"fwd": {}, "bwd": {}}
    s.lost, s.recovery_role = s._lost_again, None
    s.detector = FailureDetector(s)
    s.detector.start()
