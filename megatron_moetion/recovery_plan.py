"""Planning a localized recovery (pure): who replays, from which window, fed by what.

Given the failed ranks, the iteration whose attempt was aborted (``fault_iteration``) and what
every rank still holds (``Holdings``: its own complete windows, the copies it keeps for other
ranks, the range of its logs), ``plan_recovery`` picks the newest window every replaying rank
can load (survivors from their own memory, failed ranks from a surviving buddy) for which every
log the replay needs is still held, and lists the transfers in one global order. Every rank
computes the same plan from the same gathered table.

Log coverage is a contiguous range of iterations (``LogStore.coverage``). Logs dropped early
because host memory hit its cap (``--moetion-host-memory-cap-mb``) shorten it, so a window whose
replay would need them is passed over, and with none left the plan is a fallback: never a replay
with missing inputs. Micro-batches and global scalars a replaying rank lacks (lost with it, or
dropped) come from a rank that holds them (its pipeline partner, or at PP = 1, where there is
none, a buddy the rank shipped them to; global scalars from any rank).

The replay covers ``anchor_start + 1 .. fault_iteration - 1``: the first ``window - 1``
iterations convert the sparse window into a dense state, the rest catch up. The aborted
iteration itself is then run again by every rank as a normal iteration.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_moetion.topology import Topology


@dataclass(frozen=True)
class Holdings:
    """What one rank holds at the start of a recovery."""

    rank: int
    lost: bool
    windows: dict[int, tuple[int, int]] = field(default_factory=dict)  # id -> (start, W)
    replicas: dict[int, dict[int, tuple[int, int]]] = field(default_factory=dict)  # owner -> id
    logs: dict[str, tuple[int, int] | None] = field(default_factory=dict)  # kind -> (lo, hi)
    data_partner_ok: bool = True  # its pipeline partner reads the same micro-batches
    data_replicas: dict[int, tuple[int, int] | None] = field(default_factory=dict)  # owner ->
    # whether its schedule reads micro-batches from a data iterator (None: by its stage, first
    # or last; with TP > 1 only TP rank 0 reads, the others receive them by broadcast)
    reads_data: bool | None = None


@dataclass(frozen=True)
class Transfer:
    """``src`` sends ``dst`` a window (``kind == 'window'``) or logs of ``iterations``."""

    kind: str  # window | fwd | bwd | data | record
    src: int
    dst: int
    window_id: int | None = None
    owner: int | None = None  # whose window, or whose micro-batches a buddy sends
    iterations: tuple[int, int] | None = None  # inclusive range


@dataclass(frozen=True)
class RecoveryPlan:
    failed: tuple[int, ...]
    replaying: tuple[int, ...]
    paused: tuple[int, ...]
    fault_iteration: int
    anchor_window: int | None = None
    anchor_start: int | None = None
    window: int | None = None
    transfers: tuple[Transfer, ...] = ()
    fallback: bool = False
    reason: str = ""
    lost: dict[int, str] = field(default_factory=dict)

    @property
    def conversion(self) -> range:
        if self.anchor_start is None:
            return range(0)
        return range(self.anchor_start + 1,
                     min(self.anchor_start + self.window, self.fault_iteration))

    @property
    def catch_up(self) -> range:
        if self.anchor_start is None:
            return range(0)
        return range(self.anchor_start + self.window, self.fault_iteration)

    @property
    def replayed_iterations(self) -> int:
        return len(self.conversion) + len(self.catch_up)


def _covers(span: tuple[int, int] | None, lo: int, hi: int) -> bool:
    if lo > hi:
        return True
    return span is not None and span[0] <= lo and hi <= span[1]


def _reads_data(topology: Topology, holding: Holdings) -> bool:
    if holding.reads_data is not None:
        return holding.reads_data
    info = topology.infos[holding.rank]
    return info.stage == 0 or info.stage == len(info.pipeline) - 1


def _data_source(topology: Topology, holdings: dict[int, Holdings], rank: int,
                 need: tuple[int, int], alive: set[int]) -> tuple[Transfer | None, str]:
    """Who can send ``rank`` the micro-batches it read in ``need``: its pipeline partner, else
    (PP = 1) a live buddy holding its shipped copies; (None, why) if nobody can."""
    what = f"the micro-batches it read in iterations {need[0]}-{need[1]}"
    partner = topology.data_partner(rank)
    if partner is not None:
        if (holdings[partner].lost or not holdings[rank].data_partner_ok
                or not _covers(holdings[partner].logs.get("data"), *need)):
            return None, f"{what} (its pipeline partner {partner} cannot supply them)"
        return Transfer("data", partner, rank, iterations=need), ""
    buddies = topology.buddies(rank)
    source = next((b for b in buddies if b in alive and b != rank
                   and _covers(holdings[b].data_replicas.get(rank), *need)), None)
    if source is None:
        return None, (f"{what} (no pipeline partner, and none of its buddies {buddies} holds "
                      f"them all)")
    return Transfer("data", source, rank, owner=rank, iterations=need), ""


def plan_recovery(topology: Topology, failed: list[int], fault_iteration: int,
                  holdings: dict[int, Holdings], *, upstream_logging: bool = True) -> RecoveryPlan:
    """Plan the recovery (see module docstring); a plan with ``fallback`` says why not."""
    failed_t = tuple(sorted(set(failed)))
    if upstream_logging:
        replaying = tuple(topology.affected_slice(failed_t))
    else:
        replaying = tuple(range(topology.world_size))
    # sets for membership: at 16k ranks the tuple scans made planning quadratic (docs/scale.md)
    replaying_set, failed_set = set(replaying), set(failed_t)
    paused = tuple(r for r in range(topology.world_size) if r not in replaying_set)
    survivors = [r for r in replaying if r not in failed_set]
    alive = [r for r in range(topology.world_size) if not holdings[r].lost]
    alive_set = set(alive)
    candidates = sorted({wid for r in survivors for wid in holdings[r].windows}
                        | {wid for h in holdings.values() for copies in h.replicas.values()
                           for wid in copies}, reverse=True)
    base = dict(failed=failed_t, replaying=replaying, paused=paused,
                fault_iteration=fault_iteration)
    if not candidates:
        return RecoveryPlan(**base, fallback=True,
                            reason="no window has been captured and replicated yet",
                            lost={r: "its state (no persisted window exists yet)"
                                  for r in failed_t})
    best_lost: dict[int, str] = {}
    for wid in candidates:
        lost: dict[int, str] = {}
        transfers: list[Transfer] = []
        span = None
        for r in survivors:
            if wid not in holdings[r].windows:
                lost[r] = f"window {wid} is no longer held locally"
            else:
                span = holdings[r].windows[wid]
        for r in failed_t:
            if wid in holdings[r].windows:  # recovered earlier in this recovery: has a copy
                span = holdings[r].windows[wid]
                continue
            source = next((b for b in topology.buddies(r) if b in alive_set and b != r
                           and wid in holdings[b].replicas.get(r, {})), None)
            if source is None:
                lost[r] = (f"every copy of its window {wid} is gone (buddies "
                           f"{topology.buddies(r)})")
            else:
                span = holdings[source].replicas[r][wid]
                transfers.append(Transfer("window", source, r, window_id=wid, owner=r))
        if lost or span is None:
            best_lost = best_lost or lost
            continue
        start, window = span
        if start + window - 1 > fault_iteration - 1:
            continue  # the window is not complete before the aborted iteration
        lo, hi = start + 1, fault_iteration - 1
        for r in replaying:
            for neighbour, kind in ((topology.prev_rank(r), "fwd"), (topology.next_rank(r), "bwd")):
                if neighbour is None or neighbour in replaying_set or lo > hi:
                    continue
                if holdings[neighbour].lost or not _covers(holdings[neighbour].logs.get(kind),
                                                           lo, hi):
                    lost[r] = (f"rank {neighbour}'s {kind} logs for iterations {lo}-{hi} are "
                               f"gone")
                else:
                    transfers.append(Transfer(kind, neighbour, r, iterations=(lo, hi)))
            if _reads_data(topology, holdings[r]):
                need = (lo, fault_iteration)
                if not _covers(holdings[r].logs.get("data"), *need):
                    # lost with the rank, or dropped (host-memory cap): its partner read them
                    # too; at PP = 1 its buddies hold what it shipped them
                    transfer, why = _data_source(topology, holdings, r, need, alive_set)
                    if transfer is None:
                        lost[r] = why
                    else:
                        transfers.append(transfer)
        for r in replaying:  # a survivor may have dropped old records (host-memory cap) too
            if lo > hi or _covers(holdings[r].logs.get("record"), lo, hi):
                continue
            source = next((s for s in alive if s != r
                           and _covers(holdings[s].logs.get("record"), lo, hi)), None)
            if source is None:
                lost[r] = f"the global scalars of iterations {lo}-{hi}"
            else:
                transfers.append(Transfer("record", source, r, iterations=(lo, hi)))
        if lost:
            best_lost = best_lost or lost
            continue
        order = {"window": 0, "fwd": 1, "bwd": 2, "data": 3, "record": 4}
        transfers.sort(key=lambda t: (order[t.kind], t.dst, t.src))
        return RecoveryPlan(**base, anchor_window=wid, anchor_start=start, window=window,
                            transfers=tuple(transfers))
    return RecoveryPlan(**base, fallback=True, lost=best_lost,
                        reason="no window can be recovered in memory: " + "; ".join(
                            f"rank {r}: {why}" for r, why in sorted(best_lost.items())))
