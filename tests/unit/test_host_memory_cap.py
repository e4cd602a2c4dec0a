"""Bounded host memory while window promotion stalls: buddy copies, the buffer pool and the
upstream logs stay under --moetion-host-memory-cap-mb, the cap warns once, and the logs'
coverage shows what was dropped so that recovery planning falls back instead of replaying
without it."""

import logging

import pytest
import torch

from megatron_moetion.agreement import Agreement
from megatron_moetion.config import MoEtionConfig
from megatron_moetion.recovery_plan import Holdings, plan_recovery
from megatron_moetion.replication import Replicator
from megatron_moetion.snapshot import CaptureItem, SnapshotEngine, WindowLayout
from megatron_moetion.topology import RankInfo, Topology
from megatron_moetion.transport import Parcel, Received
from megatron_moetion.upstream_log import LogStore
from megatron_moetion.window_manager import CAP_FLAG, HostMemoryCap, WindowManager

W = 2
SLOT_NUMEL = 1024  # float32: 4 KiB per slot, 8 KiB per window
SEND_NUMEL = 2048  # float32: 8 KiB per logged send
MICROBATCHES = 2


class BuddyNeverAcks:
    """A transport whose buddy receives nothing and never acknowledges (a stalled round);
    with ``deliver`` the owner's copy does arrive here, so this rank keeps copies."""

    def __init__(self, deliver: bool):
        self.deliver = deliver
        self.bytes_sent = 0

    def exchange(self, *, send_to, parcel, recv_from, tag, alloc=None, corrupt=False):
        if not self.deliver:
            raise TimeoutError("buddy never answered")
        n = parcel.data.numel()
        data = alloc(n)
        data[:n].copy_(parcel.data)
        return Received(Parcel(data, parcel.blob, parcel.ids, parcel.crc_data), True)

    def exchange_ints(self, *, send_to, values, recv_from, n, tag):
        return [values[0], 0]  # "the buddy did not keep it": never acked


def _stalled_run(cap_mb: float, iterations: int, deliver: bool = False, check=None):
    """One rank through ``iterations`` with windows of W, sends and data logged every
    iteration, and a replicator whose rounds never get acknowledged."""
    engine = SnapshotEngine(torch.device("cpu"))
    replicator = Replicator(BuddyNeverAcks(deliver), buddies=[1], owners=[1], pool=engine.pool)
    windows = WindowManager(engine, replicator)
    logs = LogStore(torch.device("cpu"))
    cap = HostMemoryCap(int(cap_mb * (1 << 20)), windows, replicator, logs, rank=0)
    state = torch.zeros(SLOT_NUMEL)
    items = [[CaptureItem(f"op{k}", f"op{k}", "active", state)] for k in range(W)]
    layout = WindowLayout.build(items)
    try:
        for it in range(1, iterations + 1):
            if (it - 1) % W == 0:  # window boundary: close (ship), promote, open
                assert replicator.quiesce(10)
                finished, acked = replicator.status()
                agreed = Agreement((), finished, acked, W)
                windows.close_current(agreed)
                promoted = windows.advance(agreed)
                if promoted is not None:
                    logs.truncate(promoted.start_iteration)
                windows.open(it, layout, {})
            for mb in range(MICROBATCHES):
                logs.log_send((it, mb, 0, "fwd"), torch.full((SEND_NUMEL,), float(it)))
                if check:
                    check(cap, it)
            logs.log_data(it, 0, {"tokens": torch.arange(256)})
            logs.log_record(it, {"grad_norm": float(it)})
            if check:
                check(cap, it)
            state.add_(1)  # the optimizer step
            engine.capture(windows.current, (it - 1) % W, items[(it - 1) % W], {"iteration": it})
        assert replicator.quiesce(10)
    finally:
        replicator.close(10)
    return cap, windows, replicator, logs


def _under_cap(cap, it):
    held = cap.windows_bytes() + cap.logs.nbytes()
    assert held <= cap.limit(), f"iteration {it}: {held} bytes held, cap {cap.limit()}"


def test_the_flag_exists_defaults_to_automatic_and_refuses_negative_values():
    from megatron_moetion.errors import ConfigError

    assert MoEtionConfig().host_memory_cap_mb == 0
    assert MoEtionConfig(host_memory_cap_mb=3).host_memory_cap_bytes == 3 << 20
    with pytest.raises(ConfigError, match=f"^{CAP_FLAG} must be an integer >= 0"):
        MoEtionConfig(host_memory_cap_mb=-1)


def test_stalled_promotion_stays_under_the_cap_warns_once_and_reports_the_gap(caplog):
    per_iteration = MICROBATCHES * SEND_NUMEL * 4 + 256 * 8
    windows_max = 3 * (W * SLOT_NUMEL * 4)
    cap_mb = (windows_max + 5 * per_iteration) / (1 << 20)  # room for 5 iterations of logs
    with caplog.at_level(logging.WARNING, logger="megatron_moetion"):
        cap, windows, replicator, logs = _stalled_run(cap_mb, 40, check=_under_cap)
    assert windows.persisted is None and replicator.failures > 0  # promotion stalled
    warnings = [r for r in caplog.records if CAP_FLAG in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "oldest upstream logs" in warnings[0].getMessage()
    # the oldest iterations are gone, the newest kept, and coverage says exactly which
    assert logs.dropped_iterations >= 30 and logs.floor >= 30
    for kind in ("fwd", "data", "record"):
        assert logs.coverage(kind) == (logs.floor + 1, 40)
    assert logs.nbytes() <= 5 * per_iteration
    # dropped iterations are not logged again in part (e.g. by a replay's re-sends)
    logs.log_send((logs.floor, 0, 0, "fwd"), torch.zeros(1))
    assert logs.coverage("fwd") == (logs.floor + 1, 40)


def test_automatic_cap_is_sized_from_the_window_and_bounds_a_stall_too():
    engine = SnapshotEngine(torch.device("cpu"))
    replicator = Replicator(BuddyNeverAcks(False), buddies=[1], owners=[1], pool=engine.pool)
    try:
        cap = HostMemoryCap(0, WindowManager(engine, replicator), replicator,
                            LogStore(torch.device("cpu")))
        assert cap.limit() is None  # nothing to size it from before the first window
    finally:
        replicator.close(10)
    cap, windows, _, logs = _stalled_run(0, 40, check=_under_cap)
    window_bytes = W * SLOT_NUMEL * 4
    per_iteration = MICROBATCHES * SEND_NUMEL * 4 + 256 * 8
    assert logs.peak_iteration_bytes == per_iteration
    assert windows.longest_round_iters == 0  # no round was ever acknowledged
    assert cap.limit() == (3 + 3 * 1) * window_bytes + (3 * W + 2 * W) * per_iteration
    assert logs.dropped_iterations > 0 and logs.coverage("fwd")[0] == logs.floor + 1


class SlowButAcked:
    """A replicator stand-in: rounds take as long as the test says, and are acknowledged."""

    owners, largest_copy, data_peak_iteration_bytes = [1], 0, 0

    def start_round(self, window, corrupt=False, window_id=None):
        pass

    def drop_older_than(self, window_id):
        pass

    def held_bytes(self):
        return 0


def test_slow_acknowledged_rounds_raise_the_automatic_cap_failed_ones_do_not():
    engine = SnapshotEngine(torch.device("cpu"))
    windows = WindowManager(engine, SlowButAcked())
    logs = LogStore(torch.device("cpu"))
    cap = HostMemoryCap(0, windows, SlowButAcked(), logs)
    items = [[CaptureItem(f"op{k}", f"op{k}", "active", torch.zeros(4))] for k in range(W)]
    layout = WindowLayout.build(items)
    logs.log_send((1, 0, 0, "fwd"), torch.zeros(100))
    win = windows.open(1, layout, {})
    for k in range(W):
        engine.capture(win, k, items[k], {})
    base = cap.limit()
    assert windows.close_current(Agreement((), -1, -1, W)) == "shipped"
    for _ in range(6):  # the round runs for 7 iterations
        windows.advance(Agreement((), -1, -1, W))
    windows.advance(Agreement((), 0, -1, W))  # finished, not acknowledged: a failed round
    assert windows.longest_round_iters == 0 and cap.limit() == base
    win = windows.open(9, layout, {})
    for k in range(W):
        engine.capture(win, k, items[k], {})
    assert windows.close_current(Agreement((), 0, -1, W)) == "shipped"
    for _ in range(6):
        windows.advance(Agreement((), 0, -1, W))
    windows.advance(Agreement((), 1, 1, W))  # finished and acknowledged after 7 iterations
    assert windows.longest_round_iters == 7
    assert cap.limit() == base + 2 * (7 - W) * logs.peak_iteration_bytes


def test_buddy_copies_stay_bounded_while_nothing_is_acknowledged():
    cap, windows, replicator, _ = _stalled_run(1024, 40, deliver=True)
    assert windows.persisted is None and replicator.status()[1] == -1
    held = replicator.held()
    assert list(held) == [1] and len(held[1]) == 1  # only the newest copy (nothing persisted)
    allocations = windows.engine.pool.allocations
    assert allocations <= 5, allocations  # current, shipped, copy arriving, copy kept, spare


def test_copies_between_the_persisted_and_the_newest_are_dropped():
    engine = SnapshotEngine(torch.device("cpu"))
    replicator = Replicator(BuddyNeverAcks(True), buddies=[1], owners=[1], pool=engine.pool)
    try:
        items = [[CaptureItem("x", "op", "active", torch.zeros(16))]]
        for wid in range(4):
            win = engine.begin_window(wid, wid, WindowLayout.build(items), {})
            engine.capture(win, 0, items[0], {})
            engine.seal(win)
            replicator.start_round(win)
            assert replicator.quiesce(10)
            if wid == 1:
                replicator.drop_older_than(1)  # window 1 persisted
            engine.release(win)
        assert replicator.held() == {1: [1, 3]}
    finally:
        replicator.close(10)


def test_coverage_is_the_contiguous_run_ending_at_the_newest_iteration():
    logs = LogStore(torch.device("cpu"))
    for it in (3, 4, 6, 7, 8):
        logs.log_send((it, 0, 0, "bwd"), torch.zeros(2))
    assert logs.coverage("bwd") == (6, 8)  # 5 is missing: 3-4 cannot be relied on


def _two_stage_plan(logs: LogStore, anchors):
    """Rank 1 (last stage) fails; rank 0 (first stage, paused) feeds it from ``logs``."""
    topo = Topology([RankInfo(0, 0, 0, (0, 1)), RankInfo(1, 1, 1, (0, 1))], 1)
    cover = {k: logs.coverage(k) for k in ("fwd", "bwd", "data", "record")}
    fault = max(logs.iterations("data"))  # failed in its last iteration (data logged)
    copies = {wid: (start, W) for wid, start in anchors}
    holdings = {0: Holdings(0, False, {}, {1: copies}, cover),
                1: Holdings(1, True)}
    return plan_recovery(topo, [1], fault, holdings), fault


def test_dropped_logs_make_the_planner_fall_back_or_pick_a_window_after_them():
    per_iteration = MICROBATCHES * SEND_NUMEL * 4 + 256 * 8
    cap_mb = (3 * W * SLOT_NUMEL * 4 + 5 * per_iteration) / (1 << 20)
    _, _, _, logs = _stalled_run(cap_mb, 40)
    floor = logs.floor
    # the only copy is of an early window: its replay needs rank 0's logs from iteration 2
    plan, fault = _two_stage_plan(logs, [(0, 1)])
    assert plan.fallback and not plan.transfers
    assert f"iterations 2-{fault - 1}" in plan.lost[1], plan.reason
    # a copy of a window that starts at the floor needs only what is held: localized replay
    plan, fault = _two_stage_plan(logs, [(0, 1), (7, floor)])
    assert not plan.fallback, plan.reason
    assert plan.anchor_window == 7 and plan.replaying == (1,)
    fwd = [t for t in plan.transfers if t.kind == "fwd"]
    assert fwd and fwd[0].iterations == (floor + 1, fault - 1)
    assert any(t.kind == "data" and t.src == 0 for t in plan.transfers)


def test_a_replaying_survivor_that_dropped_records_and_data_gets_them_from_others():
    # PP=2 x DP=2: rank 1 fails; rank 0 replays with it (same stage) but dropped its oldest
    # records and micro-batches (host-memory cap); rank 2 (its pipeline partner) has them
    topo = Topology([RankInfo(x, x // 2, 0, tuple(s * 2 + x % 2 for s in range(2)))
                     for x in range(4)], 2)
    full = {k: (1, 12) for k in ("fwd", "bwd", "data", "record")}
    windows = {1: (5, 3)}
    holdings = {x: Holdings(x, False, dict(windows), {o: dict(windows) for o in topo.owners(x)},
                            dict(full)) for x in range(4)}
    holdings[0] = Holdings(0, False, dict(windows), {o: dict(windows) for o in topo.owners(0)},
                           {**full, "record": (9, 12), "data": (9, 12)})
    holdings[1] = Holdings(1, True)
    plan = plan_recovery(topo, [1], 11, holdings)
    assert not plan.fallback, plan.reason
    kinds = {(t.kind, t.src, t.dst) for t in plan.transfers}
    assert ("data", 2, 0) in kinds and ("data", 3, 1) in kinds
    assert any(k == "record" and d == 0 and s != 0 for k, s, d in kinds)
    # nobody can supply them: fall back, naming what is missing
    for x in (2, 3):
        holdings[x] = Holdings(x, False, dict(windows),
                               {o: dict(windows) for o in topo.owners(x)},
                               {**full, "data": (9, 12)})
    plan = plan_recovery(topo, [1], 11, holdings)
    assert plan.fallback and "micro-batches it read in iterations 6-11" in plan.reason


def test_data_copies_cover_contiguous_iterations_and_truncate_with_the_floor():
    from megatron_moetion.replication import DataCopies
    from megatron_moetion.upstream_log import LogStore

    logs = LogStore(torch.device("cpu"))
    copies = DataCopies()
    for it in (3, 4, 5, 7, 8):  # iteration 6's round failed
        logs.log_data(it, 0, {"tokens": torch.full((2,), it)})
        copies.put(owner=1, iteration=it, blob=logs.export("data", [it]))
    assert copies.coverage(1) == (7, 8) and copies.coverage(2) is None  # the newest run only
    got = LogStore.decode(copies.export(1, range(3, 6)))
    assert sorted(got) == [(3, 0), (4, 0), (5, 0)] and got[(4, 0)]["tokens"].tolist() == [4, 4]
    assert copies.peak_iteration_bytes == max(len(b) for b in copies.blobs[1].values())
    copies.truncate(7)
    assert sorted(copies.blobs[1]) == [8] and copies.nbytes() == len(copies.blobs[1][8])
    copies.clear()
    assert copies.nbytes() == 0 and copies.coverage(1) is None
