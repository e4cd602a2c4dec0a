"""Recovery planning: slices, anchor choice, log transfers, fallbacks with reasons."""

from megatron_moetion.recovery_plan import Holdings, plan_recovery
from megatron_moetion.topology import RankInfo, Topology


def topo(pp=2, dp=2, r=2):
    return Topology([RankInfo(x, x // dp, 0, tuple(s * dp + x % dp for s in range(pp)))
                     for x in range(pp * dp)], r)


def holdings(t, failed, windows=((0, 2, 3), (1, 5, 3)), logs=(1, 12), drop=None):
    """Every rank holds windows ``(id, start, W)``, copies of its owners' windows, and logs."""
    out = {}
    for x in range(t.world_size):
        lost = x in failed
        own = {} if lost else {w: (s, n) for w, s, n in windows}
        reps = {} if lost else {o: {w: (s, n) for w, s, n in windows} for o in t.owners(x)}
        lg = {} if lost else {k: logs for k in ("fwd", "bwd", "data", "record")}
        out[x] = Holdings(x, lost, own, reps, lg)
    if drop:
        out = drop(out)
    return out


def test_single_failure_replays_its_stage_only():
    t = topo()
    plan = plan_recovery(t, [1], 11, holdings(t, [1]))
    assert not plan.fallback, plan.reason
    assert plan.replaying == (0, 1) and plan.paused == (2, 3)
    assert plan.anchor_window == 1 and plan.anchor_start == 5 and plan.window == 3
    assert list(plan.conversion) == [6, 7] and list(plan.catch_up) == [8, 9, 10]
    kinds = [(x.kind, x.src, x.dst) for x in plan.transfers]
    assert ("window", 2, 1) in kinds  # rank 1's first buddy is rank 2
    assert ("bwd", 2, 0) in kinds and ("bwd", 3, 1) in kinds  # from the paused next stage
    assert ("data", 3, 1) in kinds  # rank 1's pipeline partner is rank 3
    assert ("record", 0, 1) in kinds
    assert not any(x.kind == "fwd" for x in plan.transfers)  # first stage has no prev


def test_middle_stage_gets_both_directions():
    t = topo(pp=3, dp=1, r=1)
    plan = plan_recovery(t, [1], 9, holdings(t, [1]))
    kinds = {(x.kind, x.src, x.dst) for x in plan.transfers}
    assert ("fwd", 0, 1) in kinds and ("bwd", 2, 1) in kinds
    assert not any(x.kind == "data" for x in plan.transfers)  # middle stages read no data


def test_consecutive_stages_replay_together_and_talk_directly():
    t = topo(pp=4, dp=1, r=2)
    plan = plan_recovery(t, [1, 2], 9, holdings(t, [1, 2]))
    assert plan.replaying == (1, 2)
    kinds = {(x.kind, x.src, x.dst) for x in plan.transfers}
    assert ("fwd", 0, 1) in kinds and ("bwd", 3, 2) in kinds
    assert ("bwd", 2, 1) not in kinds and ("fwd", 1, 2) not in kinds


def test_newer_window_without_copies_falls_back_to_older_window():
    t = topo()

    def drop(h):  # nobody holds a copy of rank 0's window 1 any more
        for hold in h.values():
            if 0 in hold.replicas:
                hold.replicas[0].pop(1)
        return h

    assert plan_recovery(t, [0], 11, holdings(t, [0])).anchor_window == 1
    plan = plan_recovery(t, [0], 11, holdings(t, [0], drop=drop))
    assert plan.anchor_window == 0 and plan.anchor_start == 2
    assert list(plan.conversion) == [3, 4] and list(plan.catch_up) == list(range(5, 11))


def test_rank_and_all_buddies_lost_falls_back_naming_what_was_lost():
    t = topo(r=1)
    plan = plan_recovery(t, [0, 1], 11, holdings(t, [0, 1]))
    assert plan.fallback and 0 in plan.lost and "every copy of its window" in plan.lost[0]


def test_rank_and_one_buddy_lost_uses_the_remaining_copy():
    t = topo(r=2)
    plan = plan_recovery(t, [0, 1], 11, holdings(t, [0, 1]))
    assert not plan.fallback, plan.reason
    assert {(x.src, x.dst) for x in plan.transfers if x.kind == "window"} == {(2, 0), (2, 1)}


def test_missing_neighbour_logs_force_fallback():
    t = topo()

    def drop(h):
        for x in (2, 3):
            h[x].logs["bwd"] = (9, 12)
        return h

    plan = plan_recovery(t, [1], 11, holdings(t, [1], drop=drop))
    assert plan.fallback and "rank 3's bwd logs for iterations 6-10 are gone" in plan.reason


def test_whole_pipeline_lost_cannot_recover_its_data():
    t = topo()
    plan = plan_recovery(t, [0, 2], 11, holdings(t, [0, 2]))
    assert plan.fallback and "micro-batches" in plan.reason


def test_nothing_persisted_yet():
    t = topo()
    plan = plan_recovery(t, [1], 3, holdings(t, [1], windows=()))
    assert plan.fallback and "no window" in plan.reason


def test_without_upstream_logging_everyone_replays():
    t = topo()
    plan = plan_recovery(t, [1], 11, holdings(t, [1]), upstream_logging=False)
    assert plan.replaying == (0, 1, 2, 3) and plan.paused == ()
    assert not any(x.kind in ("fwd", "bwd") for x in plan.transfers)


def test_a_rank_recovered_earlier_in_the_same_recovery_is_never_its_own_source():
    """A fault during recovery restarts it with the old failed ranks still failed; one that
    already pulled its window and logs uses them, and never 'sends' to itself."""
    t = topo()

    def drop(h):  # rank 1 was recovered in a first attempt; rank 0 then lost its state
        h[1] = Holdings(1, False, {1: (5, 3)}, {}, {"record": (6, 8), "data": (6, 9)})
        return h

    plan = plan_recovery(t, [0, 1], 9, holdings(t, [0], drop=drop))
    assert not plan.fallback, plan.reason
    assert all(x.src != x.dst for x in plan.transfers)
    assert not any(x.dst == 1 and x.kind in ("window", "data", "record") for x in plan.transfers)
    assert any(x.dst == 0 and x.kind == "record" and x.src == 1 for x in plan.transfers)


def single_stage_holdings(t, failed, data_copies=(1, 12), drop_from=None):
    """PP = 1: every rank also holds the micro-batches its owners shipped it."""
    h = holdings(t, failed)
    out = {}
    for x, hold in h.items():
        copies = {} if hold.lost else {o: data_copies for o in t.owners(x)}
        if drop_from is not None and x == drop_from:
            copies = {}
        out[x] = Holdings(x, hold.lost, hold.windows, hold.replicas, hold.logs,
                          data_partner_ok=False, data_replicas=copies)
    return out


def test_pp1_every_rank_replays_and_the_failed_rank_reads_its_data_from_a_buddy():
    t = topo(pp=1, dp=4, r=2)
    assert t.single_stage and not topo().single_stage
    plan = plan_recovery(t, [2], 11, single_stage_holdings(t, [2]))
    assert not plan.fallback, plan.reason
    assert plan.replaying == (0, 1, 2, 3) and plan.paused == ()
    data = [x for x in plan.transfers if x.kind == "data"]
    assert [(x.src, x.dst, x.owner, x.iterations) for x in data] == [(3, 2, 2, (6, 11))]
    assert not any(x.kind in ("fwd", "bwd") for x in plan.transfers)


def test_pp1_falls_back_when_no_buddy_holds_the_data():
    t = topo(pp=1, dp=4, r=1)
    plan = plan_recovery(t, [2], 11, single_stage_holdings(t, [2], drop_from=3))
    assert plan.fallback and "none of its buddies [3] holds them all" in plan.lost[2]
    short = single_stage_holdings(t, [2], data_copies=(8, 12))  # iterations 6, 7 are gone
    assert plan_recovery(t, [2], 11, short).fallback


def test_a_rank_that_reads_no_data_needs_none():
    """TP > 1: only TP rank 0 reads micro-batches; the others get them by broadcast."""
    t = topo()
    h = holdings(t, [1])
    h = {x: Holdings(x, v.lost, v.windows, v.replicas, v.logs, reads_data=(x != 1 and x != 3))
         for x, v in h.items()}
    h[3] = Holdings(3, False, h[3].windows, h[3].replicas,
                    {k: v for k, v in h[3].logs.items() if k != "data"}, reads_data=False)
    plan = plan_recovery(t, [1], 11, h)
    assert not plan.fallback, plan.reason
    assert not any(x.kind == "data" for x in plan.transfers)


def test_interleaved_pipeline_is_a_ring_so_every_stage_has_both_neighbours():
    t = Topology([RankInfo(x, x, 0, (0, 1, 2, 3)) for x in range(4)], 2, ring=True)
    assert t.prev_rank(0) == 3 and t.next_rank(3) == 0
    assert topo(pp=4, dp=1).prev_rank(0) is None  # not interleaved: a line
    plan = plan_recovery(t, [0], 9, holdings(t, [0]))
    kinds = {(x.kind, x.src, x.dst) for x in plan.transfers}
    assert ("fwd", 3, 0) in kinds and ("bwd", 1, 0) in kinds  # later chunks come from rank 3
    plan = plan_recovery(t, [3, 0], 9, holdings(t, [3, 0]))
    assert plan.fallback  # the two data readers: nobody else read their micro-batches
    plan = plan_recovery(t, [0, 1], 9, holdings(t, [0, 1]))
    kinds = {(x.kind, x.src, x.dst) for x in plan.transfers}
    assert ("fwd", 3, 0) in kinds and ("bwd", 2, 1) in kinds
    assert ("bwd", 1, 0) not in kinds and ("fwd", 0, 1) not in kinds  # both replay: live
