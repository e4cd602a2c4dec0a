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

import re
import time

import torch

from megatron_moetion.adapter import rng_state
from megatron_moetion.adapter.capture import (
    OpCapture,
    frozen,
    linear_layers_by_weight,
    sync_model_params,
)
from megatron_moetion.adapter.upstream import replay_iterator
from megatron_moetion.errors import RecoveryError
from megatron_moetion.recovery_plan import RecoveryPlan
from megatron_moetion.snapshot import Window


def restore_slot(window: Window, slot: int, captures: list[OpCapture],
                 controls: frozenset[str] = frozenset()) -> int:
    """Copy every item of ``slot`` back into the live tensors; return bytes restored.
    ``controls``: the negative controls of ``--moetion-negative-control`` (tests only)."""
    targets = {}
    for cap in captures:
        for mode, items in (("active", cap.active), ("frozen", cap.frozen)):
            for item, target in items:
                targets[(item.key, mode)] = target
    nbytes = 0
    with torch.no_grad():
        for spec in window.items(slot):
            if spec.key.startswith("buffer/") and "skip_buffer_restore" in controls:
                continue
            target = targets.get((spec.key, spec.mode))
            if target is None or target.numel() != spec.numel:
                raise RecoveryError(f"window {window.window_id} slot {slot} holds {spec.key} "
                                    f"({spec.mode}), which this rank's model does not have")
            target.copy_(window.view(spec).to(target.device))
            nbytes += spec.nbytes
        if "flip_frozen_ulp" in controls and slot == 0:
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
        objects: the rank's ``MegatronObjects``.
        upstream: the rank's ``UpstreamLog`` (logged data and scalars; replay routing).
        plan: the recovery plan.
        window: the anchor window (own, or pulled from a buddy).
        kwargs: the forward-backward call of the aborted iteration (template for replays).
        forward_backward_func: Megatron's schedule.
        is_lost: whether the rank lost its state again mid-replay (then only the collectives
            matter).
        controls: ``--moetion-negative-control`` (tests only): a deliberately wrong replay.
        on_first_iteration: called after the first replayed iteration (fault injection).
    """

    def __init__(self, objects, upstream, plan: RecoveryPlan, window: Window, kwargs: dict,
                 forward_backward_func, *, is_lost, controls: frozenset[str] = frozenset(),
                 on_first_iteration=None):
        self.objects, self.upstream, self.plan, self.window = objects, upstream, plan, window
        self.kwargs, self.fwd_bwd = kwargs, forward_backward_func
        self.is_lost, self.controls = is_lost, controls
        self.on_first_iteration = on_first_iteration
        self.captures = objects.fresh_captures()
        self.linears = linear_layers_by_weight(objects.model)
        self.slots = [set(names) for names in window.meta["slots"]]
        # What every replayed iteration reads, fetched up front: a rank that loses its state
        # in the middle of the replay (a fault during recovery) still runs the same collectives
        # to the end, with garbage, and the end-of-recovery agreement then restarts recovery.
        logs = upstream.store
        iterations = list(plan.conversion) + list(plan.catch_up)
        missing = [t for t in iterations if t not in logs.records]
        if missing:
            raise RecoveryError(f"no global scalars for iterations {missing} on this replaying "
                                f"rank")
        self.records = {t: logs.records[t] for t in iterations}
        self.data = {t: logs.data_for(t) for t in iterations}
        self.phases = {"load": 0.0, "conversion": 0.0, "catch_up": 0.0}
        self.bytes_loaded = 0

    def _load_slot(self, slot: int) -> None:
        if not self.is_lost():  # after a fault during recovery only the collectives matter
            self.bytes_loaded += restore_slot(self.window, slot, self.captures, self.controls)
            if "skip_rng_restore" not in self.controls:
                rng_state.restore_rng(self.window.slot_meta[slot]["rng_after"])
        sync_model_params(self.objects.optimizer, self.objects.model)

    def load_anchor(self) -> None:
        start = time.perf_counter()
        self._load_slot(0)
        self.objects.state.load_step_state(self.window.slot_meta[0])
        if "group_step_off_by_one" in self.controls:
            for group in self.objects.optimizer.param_groups:
                if "step" in group:
                    group["step"] += 1
        self.phases["load"] += time.perf_counter() - start

    def _frozen_after(self, loaded_slots: int) -> set[str]:
        return {name for k in range(loaded_slots, len(self.slots)) for name in self.slots[k]}

    def replay_iteration(self, t: int, frozen_ops: set[str]) -> None:
        objects, record = self.objects, self.records[t]
        frozen_main = [p for c in self.captures if c.name in frozen_ops for p in c.main_params]
        objects.zero_grads()
        self.upstream.begin(t, replaying=True)
        kwargs = dict(self.kwargs)
        kwargs["num_microbatches"] = record["num_microbatches"]
        kwargs["data_iterator"] = replay_iterator(self.data[t], t,
                                                  like=kwargs.get("data_iterator"))
        with frozen(self.captures, frozen_ops, self.linears), objects.ddp_without_overlap():
            self.fwd_bwd(**kwargs)
        with objects.probe.replaying(record, frozen_main):
            objects.optimizer.step()
        if record["update_successful"] and objects.scheduler is not None:
            objects.scheduler.step(increment=record["increment"])

    def run(self) -> None:
        if "skip_conversion" in self.controls:
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
        """Negative control (``--moetion-negative-control skip_conversion``): resume every
        operator from its own slot as MoC-System resumes partial expert checkpoints, without
        sparse-to-dense conversion, so operators captured early in the window are stale."""
        self.load_anchor()
        for slot in range(1, len(self.slots)):
            self._load_slot(slot)
        for t in self.plan.catch_up:
            self.replay_iteration(t, set())
