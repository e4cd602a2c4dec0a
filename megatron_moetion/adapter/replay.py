"""Sparse-to-dense conversion and catch-up on the replaying ranks (one stage's slice).

From the anchor window (iterations ``a .. a+W-1``; slot ``j`` was taken after step ``a+j``):

1. load slot 0: slot-0 operators become ACTIVE (main weights + optimizer state), every other
   operator gets its compute weights of iteration ``a`` and stays FROZEN;
2. for ``t = a+1 .. a+W-1``: replay iteration ``t`` (FROZEN operators run forward and input
   gradient only: their linear layers go through Megatron's ``linear_with_frozen_weight``,
   and the optimizer skips their main weights), then load
   slot ``t-a``: its operators turn ACTIVE from their anchor, the still-FROZEN ones get their
   compute weights of iteration ``t``;
3. catch up ``a+W .. f-1`` with every operator ACTIVE.

Each replayed step injects that iteration's recorded global grad norm / found-inf, and the LR
scheduler steps by the recorded increment, so the result is the original state, bit for bit.
"""

from __future__ import annotations

import os
import re
import time

import torch

from megatron_moetion.adapter import training_state as ts
from megatron_moetion.adapter.capture import (
    OpCapture,
    frozen,
    linear_layers_by_weight,
    sync_model_params,
)
from megatron_moetion.adapter.replay_io import ReplayIterator
from megatron_moetion.errors import RecoveryError
from megatron_moetion.recovery_plan import RecoveryPlan
from megatron_moetion.snapshot import Window

# Tests only: a deliberately wrong recovery the checks must catch. "skip_conversion" resumes
# stale operators (MoC-style) and turns the survivors' self-check off, so the run completes and
# the bitwise oracle must see the damage; "skip_conversion,keep_checks" keeps the self-check.
# "skip_rng_restore" / "skip_buffer_restore": a replaying rank keeps the RNG streams / router
# buffers the failure left it; "group_step_off_by_one": the anchor's group-level optimizer step
# is restored one too high; "flip_frozen_ulp": a FROZEN expert weight of the anchor slot is one ULP
# off (``_flip_last_frozen_expert``) (tests/megatron/test_oracle_controls.py).
NEGATIVE_CONTROL_ENV = "MOETION_NEGATIVE_CONTROL"


def negative_control() -> set[str]:
    return set(filter(None, os.environ.get(NEGATIVE_CONTROL_ENV, "").split(",")))


def restore_slot(window: Window, slot: int, captures: list[OpCapture]) -> int:
    """Copy every item of ``slot`` back into the live tensors; return bytes restored."""
    targets = {}
    for cap in captures:
        for mode, items in (("active", cap.active), ("frozen", cap.frozen)):
            for item, target in items:
                targets[(item.key, mode)] = target
    nbytes = 0
    with torch.no_grad():
        for spec in window.items(slot):
            if spec.key.startswith("buffer/") and "skip_buffer_restore" in negative_control():
                continue
            target = targets.get((spec.key, spec.mode))
            if target is None or target.numel() != spec.numel:
                raise RecoveryError(f"window {window.window_id} slot {slot} holds {spec.key} "
                                    f"({spec.mode}), which this rank's model does not have")
            target.copy_(window.view(spec).to(target.device))
            nbytes += spec.nbytes
        if "flip_frozen_ulp" in negative_control() and slot == 0:
            _flip_last_frozen_expert(window.items(slot), targets)
    return nbytes


def _flip_last_frozen_expert(specs, targets) -> None:
    """Negative control: one FROZEN expert weight of the anchor slot, of the stage's last
    layer (its input gradient reaches every earlier layer's operators during conversion),
    one ULP up in every element (a single element's ULP can vanish in a dot product)."""
    def layer(spec):
        return int(re.search(r"layers\.(\d+)\.", spec.key).group(1))

    experts = [sp for sp in specs if sp.mode == "frozen" and ".experts." in sp.key
               and sp.key.endswith("/weight") and sp.dtype == "float32"]
    if experts:
        target = targets[(max(experts, key=layer).key, "frozen")]
        target.view(torch.int32).add_(1)


class Replayer:
    """Runs conversion and catch-up for one plan on one replaying rank.

    Args:
        session: the rank's ``MoEtionSession``.
        plan: the recovery plan.
        window: the anchor window (own, or pulled from a buddy).
        kwargs: the forward-backward call of the aborted iteration (template for replays).
        forward_backward_func: Megatron's schedule.
        on_first_iteration: called after the first replayed iteration (fault injection).
    """

    def __init__(self, session, plan: RecoveryPlan, window: Window, kwargs: dict,
                 forward_backward_func, on_first_iteration=None):
        self.s, self.plan, self.window = session, plan, window
        self.kwargs, self.fwd_bwd = kwargs, forward_backward_func
        self.on_first_iteration = on_first_iteration
        self.captures = session.fresh_captures()
        self.linears = linear_layers_by_weight(session.model)
        self.slots = [set(names) for names in window.meta["slots"]]
        # What every replayed iteration reads, fetched up front: a rank that loses its state
        # in the middle of the replay (a fault during recovery) still runs the same collectives
        # to the end, with garbage, and the end-of-recovery agreement then restarts recovery.
        iterations = list(plan.conversion) + list(plan.catch_up)
        missing = [t for t in iterations if t not in session.logs.records]
        if missing:
            raise RecoveryError(f"no global scalars for iterations {missing} on rank "
                                f"{session.rank}")
        self.records = {t: session.logs.records[t] for t in iterations}
        self.data = {t: session.logs.data_for(t) for t in iterations}
        self.phases = {"load": 0.0, "conversion": 0.0, "catch_up": 0.0}
        self.bytes_loaded = 0

    def _load_slot(self, slot: int) -> None:
        if not self.s.lost:  # after a fault during recovery only the collectives matter
            self.bytes_loaded += restore_slot(self.window, slot, self.captures)
            if "skip_rng_restore" not in negative_control():
                ts.restore_rng(self.window.slot_meta[slot]["rng_after"])
        sync_model_params(self.s.optimizer, self.s.model)

    def load_anchor(self) -> None:
        start = time.perf_counter()
        meta = self.window.slot_meta[0]
        self._load_slot(0)
        ts.restore_scheduler(self.s.scheduler, self.s.optimizer, meta["scheduler"],
                             meta["param_groups"])
        ts.restore_grad_scalers(self.s.optimizer, meta["grad_scalers"])
        if "group_step_off_by_one" in negative_control():
            for group in self.s.optimizer.param_groups:
                if "step" in group:
                    group["step"] += 1
        self.phases["load"] += time.perf_counter() - start

    def _frozen_after(self, loaded_slots: int) -> set[str]:
        return {name for k in range(loaded_slots, len(self.slots)) for name in self.slots[k]}

    def replay_iteration(self, t: int, frozen_ops: set[str]) -> None:
        s = self.s
        record = self.records[t]
        frozen_main = [p for c in self.captures if c.name in frozen_ops for p in c.main_params]
        for chunk in s.model:
            chunk.zero_grad_buffer()
        s.optimizer.zero_grad()
        s.flow.begin(t, replaying=True)
        kwargs = dict(self.kwargs)
        kwargs["num_microbatches"] = record["num_microbatches"]
        kwargs["data_iterator"] = ReplayIterator(self.data[t], t)
        with frozen(self.captures, frozen_ops, self.linears), s.ddp_without_overlap():
            self.fwd_bwd(**kwargs)
        with s.probe.replaying(record, frozen_main):
            s.optimizer.step()
        if record["update_successful"] and s.scheduler is not None:
            s.scheduler.step(increment=record["increment"])

    def run(self) -> None:
        if "skip_conversion" in negative_control():
            return self._run_without_conversion()
        self.load_anchor()
        first = True
        for t in self.plan.conversion:
            start = time.perf_counter()
            slot = t - self.plan.anchor_start
            self.replay_iteration(t, self._frozen_after(slot))
            self._load_slot(slot)
            self.phases["conversion"] += time.perf_counter() - start
            if first and self.on_first_iteration is not None:
                self.on_first_iteration()
            first = False
        for t in self.plan.catch_up:
            start = time.perf_counter()
            self.replay_iteration(t, set())
            self.phases["catch_up"] += time.perf_counter() - start
            if first and self.on_first_iteration is not None:
                self.on_first_iteration()
            first = False

    def _run_without_conversion(self) -> None:
        """Negative control (``MOETION_NEGATIVE_CONTROL=skip_conversion``): resume every
        operator from its own slot as MoC-System resumes partial expert checkpoints, without
        sparse-to-dense conversion, so operators captured early in the window are stale."""
        self.load_anchor()
        for slot in range(1, len(self.slots)):
            self._load_slot(slot)
        for t in self.plan.catch_up:
            self.replay_iteration(t, set())
