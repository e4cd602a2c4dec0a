"""Sparse window sizing and capture order: Algorithm 1 of the paper (pure functions).

Within a window of ``W`` iterations every operator is captured in full (ACTIVE) exactly once,
in its slot; before its slot it is captured FROZEN (compute weights only) each iteration, after
it nothing. With operators in capture order split into contiguous slots, slot ``k`` costs::

    bytes(k) = sum(active_bytes in slot k) + sum(frozen_bytes in slots after k)

``find_window`` picks the smallest ``W`` whose every slot fits the budget (copy bandwidth x
forward+backward time) by filling each slot greedily (optimal: taking an operator into an
earlier slot never makes a later slot dearer). If even one operator per slot does not fit,
``W`` is the operator count and ``fits`` is False (the caller warns: snapshots will stall).
``partition_for_window`` spreads operators over a given ``W`` (all ranks use the world-wide
maximum) minimising the dearest slot; empty slots, if any, come last.

``size_window`` adds the second bottleneck: each window is replicated to ``r`` buddies over
the node's network link while the next window is captured, so ``r`` times a window's bytes
must cross this GPU's share of that link within ``W`` iterations. A larger ``W`` lowers the
bytes per iteration (each operator is ACTIVE once per window, and FROZEN captures shrink
towards the end of a window), so ``size_window`` takes the smallest ``W`` that satisfies both
the copy budget and the replication budget, and names the constraint that set it. Runtime
(``adapter.snapshots``) and calculator (``bench.calculator``) both call it.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from megatron_moetion.operators import OperatorSpec


@dataclass(frozen=True)
class WindowSchedule:
    """Which operators are ACTIVE in each slot of a window (FROZEN: those of later slots)."""

    slots: tuple[tuple[str, ...], ...]
    slot_bytes: tuple[int, ...]
    budget_bytes: float
    fits: bool

    @property
    def window(self) -> int:
        return len(self.slots)

    def active(self, slot: int) -> tuple[str, ...]:
        return self.slots[slot]

    def frozen(self, slot: int) -> tuple[str, ...]:
        return tuple(name for later in self.slots[slot + 1:] for name in later)


    @property
    def max_slot_bytes(self) -> int:
        return max(self.slot_bytes, default=0)


def slot_costs(ops: Sequence[OperatorSpec], bounds: Sequence[int]) -> list[int]:
    """Bytes per slot for slots ``ops[bounds[k]:bounds[k+1]]``."""
    costs = []
    for k in range(len(bounds) - 1):
        active = sum(op.active_bytes for op in ops[bounds[k]:bounds[k + 1]])
        frozen_tail = sum(op.frozen_bytes for op in ops[bounds[k + 1]:])
        costs.append(active + frozen_tail)
    return costs


def _greedy_bounds(ops: Sequence[OperatorSpec], budget: float) -> list[int]:
    """Slot boundaries filling each slot with as many operators as fit (at least one)."""
    suffix_frozen = [0] * (len(ops) + 1)
    for i in range(len(ops) - 1, -1, -1):
        suffix_frozen[i] = suffix_frozen[i + 1] + ops[i].frozen_bytes
    bounds, start = [0], 0
    while start < len(ops):
        end, active = start, 0
        while end < len(ops):
            candidate = active + ops[end].active_bytes + suffix_frozen[end + 1]
            if candidate > budget and end > start:
                break
            active += ops[end].active_bytes
            end += 1
            if candidate > budget:  # a single operator over budget still gets its own slot
                break
        bounds.append(end)
        start = end
    return bounds


def _schedule(ops: Sequence[OperatorSpec], bounds: Sequence[int], budget: float,
              window: int) -> WindowSchedule:
    costs = slot_costs(ops, bounds)
    slots = [tuple(op.name for op in ops[bounds[k]:bounds[k + 1]]) for k in range(len(costs))]
    slots += [()] * (window - len(slots))
    costs += [0] * (window - len(costs))
    return WindowSchedule(tuple(slots), tuple(costs), budget,
                          fits=all(c <= budget for c in costs))


def find_window(ops: Sequence[OperatorSpec], budget_bytes: float) -> WindowSchedule:
    """Smallest window whose slots all fit ``budget_bytes`` (see module docstring)."""
    if not ops:
        return WindowSchedule(((),), (0,), budget_bytes, True)
    bounds = _greedy_bounds(ops, budget_bytes)
    return _schedule(ops, bounds, budget_bytes, len(bounds) - 1)


def partition_for_window(ops: Sequence[OperatorSpec], window: int,
                         budget_bytes: float = math.inf) -> WindowSchedule:
    """Exactly ``window`` slots, contiguous in ``ops`` order, minimising the dearest slot."""
    if window < 1:
        raise ValueError(f"window must be >= 1; got {window}")
    if not ops:
        return WindowSchedule(((),) * window, (0,) * window, budget_bytes, True)
    if window >= len(ops):
        bounds = list(range(len(ops) + 1))
        return _schedule(ops, bounds, budget_bytes, window)
    lo = max(op.active_bytes for op in ops)  # no slot is cheaper than its dearest operator
    hi = sum(op.active_bytes for op in ops)      # everything ACTIVE in one slot
    while lo < hi:  # smallest per-slot budget that needs at most `window` slots
        mid = (lo + hi) // 2
        if len(_greedy_bounds(ops, mid)) - 1 <= window:
            hi = mid
        else:
            lo = mid + 1
    return _schedule(ops, _greedy_bounds(ops, lo), budget_bytes, window)


BINDINGS = ("none", "copy", "network")


@dataclass(frozen=True)
class WindowChoice:
    """The window ``size_window`` picked, and why.

    Attributes:
        schedule: the slots at that W (``partition_for_window``).
        binding: what set W: "copy" (a slot's device-to-host copy must fit forward+backward),
            "network" (a window's replication to r buddies must fit W iterations; W is larger
            than the copy budget alone needs) or "none" (W = 1: dense snapshots fit both).
        copy_window: the W the copy budget alone needs (``find_window``).
        replication_s: seconds to send one window to every buddy at the network bandwidth.
        replication_budget_s: W iterations, the time that replication has.
        fits: both budgets hold (False: snapshots or replication will fall behind).
    """

    schedule: WindowSchedule
    binding: str
    copy_window: int
    replication_s: float
    replication_budget_s: float
    fits: bool

    @property
    def window(self) -> int:
        return self.schedule.window

    def describe(self) -> str:
        verdict = "" if self.fits else ", does NOT fit (snapshots or replication fall behind)"
        return (f"W={self.window} (binding: {self.binding}; the copy budget alone needs "
                f"W={self.copy_window}; replicating a window takes {self.replication_s:.3g} s of "
                f"{self.replication_budget_s:.3g} s{verdict})")


def size_window(ops: Sequence[OperatorSpec], *, copy_bytes_per_s: float, fwd_bwd_s: float,
                network_bytes_per_s: float = math.inf, replicas: int = 0,
                iter_s: float | None = None) -> WindowChoice:
    """Smallest W whose slots fit the copy budget and whose replication fits W iterations.

    Args:
        ops: this rank's operators in capture order.
        copy_bytes_per_s: this GPU's device-to-host bandwidth (its share of a shared link).
        fwd_bwd_s: forward+backward seconds (the copy deadline, see ``budget_bytes``).
        network_bytes_per_s: this GPU's share of the node's network bandwidth for replication
            (``math.inf``: no network constraint).
        replicas: buddies each window goes to (0: local only, no network constraint).
        iter_s: iteration seconds for the replication deadline (default ``fwd_bwd_s``, the
            conservative choice: an iteration is never shorter than its forward+backward).
    """
    if not (copy_bytes_per_s > 0 and fwd_bwd_s > 0 and network_bytes_per_s > 0):
        raise ValueError(f"bandwidths and fwd_bwd_s must be > 0; got copy {copy_bytes_per_s!r}, "
                         f"network {network_bytes_per_s!r}, fwd_bwd_s {fwd_bwd_s!r}")
    if replicas < 0:
        raise ValueError(f"replicas must be >= 0, got {replicas}")
    iter_s = fwd_bwd_s if iter_s is None else iter_s
    budget = budget_bytes(copy_bytes_per_s, fwd_bwd_s)
    first = find_window(ops, budget)

    def replication_s(sched: WindowSchedule) -> float:
        if replicas == 0 or math.isinf(network_bytes_per_s):
            return 0.0
        return replicas * sum(sched.slot_bytes) / network_bytes_per_s

    def choice(sched: WindowSchedule, binding: str, fits: bool) -> WindowChoice:
        return WindowChoice(sched, binding, first.window, replication_s(sched),
                            sched.window * iter_s, fits)

    base = "copy" if first.window > 1 else "none"
    if replication_s(first) <= first.window * iter_s:
        return choice(first, base, first.fits)
    for w in range(first.window + 1, max(len(ops), first.window) + 1):
        sched = partition_for_window(ops, w, budget)
        if replication_s(sched) <= w * iter_s:
            return choice(sched, "network", sched.fits)
    last = partition_for_window(ops, max(len(ops), first.window), budget)
    return choice(last, "network", False)


def budget_bytes(copy_bandwidth_bytes_per_s: float, fwd_bwd_s: float) -> float:
    """What one iteration's snapshot may copy without stalling: it must drain during the next
    forward+backward (the next optimizer step is the only writer of what it reads)."""
    return copy_bandwidth_bytes_per_s * fwd_bwd_s


class PopularityTracker:
    """Rolling per-iteration token counts per expert, and the paper's reorder rule.

    Args:
        window_iters: how many recent iterations to keep.
        threshold: relative change in an expert's token share that counts as a change.
        fraction: reorder when at least this fraction of experts changed.
    """

    def __init__(self, window_iters: int = 100, threshold: float = 0.10, fraction: float = 0.25):
        self.window_iters = window_iters
        self.threshold = threshold
        self.fraction = fraction
        self._history: deque[dict[str, float]] = deque(maxlen=window_iters)

    def add(self, counts: Mapping[str, float]) -> None:
        """Record one iteration's token counts (expert name -> tokens routed to it)."""
        self._history.append(dict(counts))

    def totals(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for counts in self._history:
            for name, c in counts.items():
                out[name] = out.get(name, 0.0) + c
        return out

    @staticmethod
    def _shares(history) -> dict[str, float]:
        totals: dict[str, float] = {}
        for counts in history:
            for name, c in counts.items():
                totals[name] = totals.get(name, 0.0) + c
        grand = sum(totals.values()) or 1.0
        return {name: c / grand for name, c in totals.items()}

    def should_reorder(self) -> bool:
        """True if over ``threshold`` change for at least ``fraction`` of experts, comparing the
        older and the newer half of the rolling window."""
        if len(self._history) < 2:
            return False
        half = len(self._history) // 2
        items = list(self._history)
        old, new = self._shares(items[:half]), self._shares(items[half:])
        names = set(old) | set(new)
        if not names:
            return False
        changed = 0
        for name in names:
            a, b = old.get(name, 0.0), new.get(name, 0.0)
            base = max(a, 1e-12)
            if abs(b - a) / base > self.threshold:
                changed += 1
        return changed >= self.fraction * len(names)
