"""Sparse snapshots on one rank: popularity, schedule, and what each iteration captures.

``SnapshotController`` keeps the operator order (least popular experts first, from the router
token counts of every rank, collected by forward hooks), opens each window with the world-wide
window size (Algorithm 1 proposals agreed with ``max``) and a world-wide slot assignment,
captures the slot of every iteration after the optimizer step, and at window boundaries seals,
ships (or skips) and promotes windows through the ``WindowManager``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import statistics
from collections import deque

import torch

from megatron_moetion.adapter import rng_state
from megatron_moetion.adapter.capture import build_captures
from megatron_moetion.agreement import Agreement
from megatron_moetion.operators import OpKind, order_operators
from megatron_moetion.schedule import (
    PopularityTracker,
    WindowChoice,
    WindowSchedule,
    budget_bytes,
    partition_for_window,
    size_window,
)
from megatron_moetion.snapshot import WindowLayout
from megatron_moetion.window_manager import WindowManager

logger = logging.getLogger(__name__)


class SnapshotController:
    """See the module docstring.

    Args:
        cfg: the MoEtion configuration.
        bindings: this rank's operators (``discover_operators``).
        optimizer: Megatron's optimizer (capture items point into its state).
        windows: this rank's window manager.
        copy_bandwidth: device-to-host bytes/s used for window sizing.
        rank: global rank (for log messages).
        gather: ``all_gather_object`` over every rank (MoEtion's control group).
        network_bandwidth: this rank's share of the network, bytes/s, for replication.
        replicas: buddies each window goes to.
    """

    def __init__(self, cfg, bindings, optimizer, windows: WindowManager, copy_bandwidth: float,
                 rank: int, gather, network_bandwidth: float = math.inf, replicas: int = 0):
        self.cfg, self.bindings, self.optimizer = cfg, bindings, optimizer
        self.windows, self.copy_bandwidth, self.rank = windows, copy_bandwidth, rank
        self.network_bandwidth, self.replicas = network_bandwidth, replicas
        self.gather = gather
        self.choice: WindowChoice | None = None  # this rank's last Algorithm 1 proposal
        self._logged_window: int | None = None
        self.popularity = PopularityTracker(cfg.popularity_window_iters, cfg.reorder_threshold,
                                            cfg.reorder_fraction)
        self.fwd_bwd_times: deque[float] = deque(maxlen=50)
        self.captures = None
        self._had_captures = False
        self.schedule = None
        self.order: list[str] = []
        self.slot_items: list = []
        self.next_window_start: int | None = None
        self._router_counts: dict[str, torch.Tensor] = {}
        self._hooks = [self._count_tokens(b) for b in bindings if b.kind is OpKind.ROUTER]

    # ------------------------------------------------------------------ popularity
    def _count_tokens(self, binding):
        key = f"layer{binding.layer}"

        def hook(module, inputs, output):
            if not module.training or not torch.is_grad_enabled():
                return
            counts = output[1].sum(dim=0).to(torch.float64)
            prev = self._router_counts.get(key)
            self._router_counts[key] = counts if prev is None else prev + counts

        return binding.modules[0].register_forward_hook(hook)

    # ------------------------------------------------------------------ scheduling
    def specs(self) -> dict:
        return {c.name: c.spec() for c in self.captures}

    def fwd_bwd_s(self) -> float:
        if self.cfg.iter_time_s:
            return self.cfg.iter_time_s
        return statistics.median(self.fwd_bwd_times) if self.fwd_bwd_times else 0.0

    def proposal(self) -> int:
        """The window size this rank wants for its next window: the smallest W whose slots fit
        the copy budget and whose replication to the buddies fits W iterations
        (``schedule.size_window``)."""
        if self.cfg.window:
            return self.cfg.window
        if self.captures is None or not self.fwd_bwd_times:
            return 1
        specs = self.specs()
        # the order is world-wide; this rank proposes for the operators it holds
        ordered = [specs[n] for n in self.order if n in specs] if self.order else \
            order_operators(specs.values())
        choice = size_window(ordered, copy_bytes_per_s=self.copy_bandwidth,
                             fwd_bwd_s=self.fwd_bwd_s(), network_bytes_per_s=self.network_bandwidth,
                             replicas=self.replicas)
        if not choice.fits and (self.choice is None or self.choice.fits):
            logger.warning("[moetion] rank %d: %s; snapshots or replication will fall behind",
                           self.rank, choice.describe())
        self.choice = choice
        return choice.window

    def window_metrics(self) -> dict:
        """This rank's last proposal: W, the constraint that set it, the replication budget."""
        if self.cfg.window:
            return {"window_binding": "forced"}
        c = self.choice
        if c is None:
            return {}
        return {"window_proposed": c.window, "window_binding": c.binding,
                "window_copy_only": c.copy_window,
                "replication_window_s": round(c.replication_s, 6),
                "replication_budget_s": round(c.replication_budget_s, 6)}

    def open_window(self, iteration: int, agreed: Agreement) -> None:
        """Open a window with a schedule identical on every rank.

        Every rank that holds a part of an operator (data-parallel shards, data-parallel
        replicas whose gradients are all-reduced) must treat it alike during a replay, so the
        operator order and slots are agreed world-wide: one ``all_gather_object`` of every
        rank's operators, token counts, order and reorder vote; the order and vote of the
        lowest rank that has an order (a rank recovered from a failure has none) win.
        """
        self.captures = build_captures(self.bindings, self.optimizer)
        local = self.specs()
        counts = self._local_counts()
        mine = {"specs": list(local.values()), "counts": counts, "order": list(self.order),
                "reorder": bool(self.order) and self.popularity.should_reorder(),
                "totals": self.popularity.totals()}
        everyone = self.gather(mine)
        merged = {}
        for rank_info in everyone:
            for spec in rank_info["specs"]:
                prev = merged.get(spec.name)
                merged[spec.name] = spec if prev is None else dataclasses.replace(
                    prev, num_params=prev.num_params + spec.num_params,
                    active_bytes=prev.active_bytes + spec.active_bytes,
                    frozen_bytes=prev.frozen_bytes + spec.frozen_bytes)
        summed: dict[str, float] = {}
        for rank_info in everyone:
            for name, c in rank_info["counts"].items():
                summed[name] = summed.get(name, 0.0) + c
        leader = next((x for x in everyone if x["order"]), None)
        if leader is None or leader["reorder"]:
            totals = dict(leader["totals"]) if leader else {}
            for name, c in summed.items():
                totals[name] = totals.get(name, 0.0) + c
            self.order = [op.name for op in order_operators(merged.values(), totals)]
            reordered = True
        else:
            self.order = list(leader["order"])
            reordered = False
        self.popularity.add(summed)
        window = self.cfg.window or max(1, agreed.window_proposal)
        if window != self._logged_window and self.rank == 0:
            self._logged_window = window
            logger.warning("[moetion] window W=%d agreed (world-wide maximum of the proposals; "
                           "rank 0 proposed %s)", window,
                           self.choice.describe() if self.choice else
                           ("a forced W" if self.cfg.window else "W=1 before any timing"))
        glob = partition_for_window([merged[n] for n in self.order if n in merged], window,
                                    budget_bytes(self.copy_bandwidth, self.fwd_bwd_s()))
        slots = tuple(tuple(n for n in names if n in local) for names in glob.slots)
        self.schedule = WindowSchedule(slots, tuple(
            sum(local[n].active_bytes for n in names)
            + sum(local[n].frozen_bytes for later in slots[k + 1:] for n in later)
            for k, names in enumerate(slots)), glob.budget_bytes, glob.fits)
        by_name = {c.name: c for c in self.captures}
        # Benchmark baseline only: MoC-System-style partial checkpoints capture each slot's
        # operators in full and nothing else (no frozen compute weights: no exact recovery).
        partial_only = self.cfg.bench_baseline == "moc"
        self.slot_items = []
        for k in range(window):
            items = [i for name in self.schedule.active(k) for i, _ in by_name[name].active]
            if not partial_only:
                items += [i for name in self.schedule.frozen(k)
                          for i, _ in by_name[name].frozen]
            self.slot_items.append(items)
        self.windows.open(iteration, WindowLayout.build(self.slot_items),
                          {"slots": self.schedule.slots, "slot_bytes": self.schedule.slot_bytes,
                           "reordered": reordered})
        self.next_window_start = iteration + window

    def _local_counts(self) -> dict[str, float]:
        """Tokens routed to each expert (global ids) by this rank's routers since last time."""
        counts = {f"{key}.expert{eid}": c for key, tensor in self._router_counts.items()
                  for eid, c in enumerate(tensor.tolist())}
        self._router_counts.clear()
        return counts

    def capture(self, iteration: int, meta: dict) -> dict:
        """Capture this iteration's slot of the open window; return metrics."""
        window = self.windows.current
        if window is None:
            return {}
        slot = iteration - window.start_iteration
        items = self.slot_items[slot]
        nbytes = self.windows.engine.capture(window, slot, items, meta)
        active = sum(i.source.numel() * i.source.element_size() for i in items
                     if i.mode == "active")
        return {"window": window.window_id, "slot": slot, "snapshot_bytes": nbytes,
                "active_bytes": active, "frozen_bytes": nbytes - active,
                "copy_s": self.windows.engine.last_copy_s}

    def note_end_of_iteration(self, iteration: int, consumed_samples: int) -> None:
        window = self.windows.current
        if window is not None and (iteration - window.start_iteration) in window.slot_meta:
            meta = window.slot_meta[iteration - window.start_iteration]
            meta["consumed_samples"] = consumed_samples
            meta["rng_after"] = rng_state.capture_rng()

    def closes_now(self, iteration: int) -> bool:
        """Whether a window ends with the previous iteration (a replication round starts)."""
        return (self.windows.open_id is not None and self.next_window_start is not None
                and iteration >= self.next_window_start)

    def boundary(self, iteration: int, agreed: Agreement, corrupt: bool) -> dict:
        """At the start of ``iteration``: close the finished window, promote, maybe open."""
        out = {}
        if self.closes_now(iteration):
            current = self.windows.current
            if current is not None and current.complete:
                last = current.window - 1
                rng_now = rng_state.capture_rng()
                if not rng_state.rng_equal(rng_now, current.slot_meta[last]["rng_after"]):
                    current.slot_meta[last]["rng_after"] = rng_now  # consumed between iterations
            out["window_closed"] = self.windows.close_current(agreed, corrupt)
        promoted = self.windows.advance(agreed)
        if promoted is not None:
            out["persisted_window"] = promoted.window_id
            out["persisted_start"] = promoted.start_iteration
        if self.next_window_start is not None and iteration >= self.next_window_start:
            self.open_window(iteration, agreed)
            out["window_opened"] = {"size": len(self.schedule.slots),
                                    "reordered": self.windows.current.meta["reordered"]}
        return out

    def dense_bytes(self) -> int | None:
        return sum(s.active_bytes for s in self.specs().values()) if self.captures else None

    def rebind(self, bindings, optimizer, gather) -> None:
        """A survivor's next generation: the same operators in new Megatron objects. The open
        window's capture items point into the old ones; recovery opens a fresh window before
        the next capture."""
        self.bindings, self.optimizer, self.gather = bindings, optimizer, gather
        self._hooks = [self._count_tokens(b) for b in bindings if b.kind is OpKind.ROUTER]
        if self._had_captures:
            self.captures = build_captures(bindings, optimizer)

    def release(self) -> None:
        """Drop every reference into the failed generation's model and optimizer."""
        self.close()
        self._had_captures = self.captures is not None
        self.bindings, self.optimizer, self.gather = [], None, None
        self.captures, self.slot_items, self._hooks = None, [], []

    def forget(self) -> None:
        """lose_state: the schedule and popularity are part of what a failed rank loses."""
        self.captures, self.order, self.schedule = None, [], None
        self.popularity = PopularityTracker(self.cfg.popularity_window_iters,
                                            self.cfg.reorder_threshold, self.cfg.reorder_fraction)

    def close(self) -> None:
        for handle in self._hooks:
            handle.remove()
