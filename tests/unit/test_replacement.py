"""Warm spares and generations over a store: who replaces whom, and when nobody can."""

import threading

import pytest
from test_liveness import MemoryStore

from megatron_moetion.replacement import Decision, Membership, membership_from_env

RESUME = {"iteration": 10, "consumed_train_samples": 72, "flops": 0.0,
          "last_checkpoint_iteration": 8}


def survivors_decide(store, world, spares, dead, states, generation=0):
    """Every survivor hands off and decides concurrently, as the ranks do."""
    out, threads = {}, []

    def one(rank):
        m = Membership(store, rank, world, spares, poll_s=0.001)
        m.hand_off(generation, rank, {"resume": states[rank]})
        out[rank] = m.decide(generation, rank, dead, timeout_s=5)

    for rank in states:
        threads.append(threading.Thread(target=one, args=(rank,)))
        threads[-1].start()
    for t in threads:
        t.join()
    return out


def test_dead_rank_gets_the_next_spare_and_every_survivor_reads_the_same_decision():
    store = MemoryStore()
    decisions = survivors_decide(store, 4, 2, [2], {r: dict(RESUME) for r in (0, 1, 3)})
    assert {d.to_json() for d in decisions.values()} == {decisions[0].to_json()}
    d = decisions[0]
    assert d.generation == 1 and d.replaced_by == {2: 4} and d.resume == RESUME
    assert not d.fallback
    spare = Membership(store, 4, 4, 2)
    assignment = spare.wait_for_assignment(timeout_s=1)
    assert (assignment.generation, assignment.rank, assignment.resume) == (1, 2, RESUME)


def test_second_failure_takes_the_second_spare_then_none_is_left():
    store = MemoryStore()
    survivors_decide(store, 4, 2, [2], {r: dict(RESUME) for r in (0, 1, 3)})
    later = dict(RESUME, iteration=20)
    # each failure is a generation of its own (the keys of the first stay in the store)
    d = survivors_decide(store, 4, 2, [0], {r: dict(later) for r in (1, 2, 3)}, generation=1)[1]
    assert d.replaced_by == {0: 5}
    d = survivors_decide(store, 4, 2, [3], {r: dict(later) for r in (0, 1, 2)}, generation=2)[0]
    assert d.fallback.startswith("no warm spare left for rank 3") and not d.replaced_by


def test_survivors_at_different_points_fall_back():
    states = {0: dict(RESUME), 1: dict(RESUME, iteration=11), 3: dict(RESUME)}
    d = survivors_decide(MemoryStore(), 4, 1, [2], states)[0]
    assert "stopped at different points" in d.fallback and not d.replaced_by


def test_survivor_after_an_optimizer_step_falls_back():
    states = {0: dict(RESUME), 1: {"iteration": 11, "after_step": True}, 3: dict(RESUME)}
    d = survivors_decide(MemoryStore(), 4, 1, [2], states)[0]
    assert "ranks [1] stopped after an optimizer step" in d.fallback


def test_idle_spare_leaves_when_the_job_is_done():
    store = MemoryStore()
    Membership(store, 0, 2, 1).finish()
    assert Membership(store, 2, 2, 1).wait_for_assignment(timeout_s=1) is None


def test_decision_round_trips_through_json():
    d = Decision(3, [1, 2], {1: 5, 2: 6}, dict(RESUME))
    assert Decision.from_json(d.to_json()) == d


def test_environment(monkeypatch):
    monkeypatch.delenv("MOETION_PROCESS_ID", raising=False)
    assert membership_from_env(lambda: pytest.fail("no store without spares")) is None
    monkeypatch.setenv("MOETION_PROCESS_ID", "5")
    monkeypatch.setenv("MOETION_ACTIVE_WORLD_SIZE", "4")
    monkeypatch.setenv("MOETION_SPARES", "1")
    with pytest.raises(ValueError, match=r"MOETION_PROCESS_ID=5 must be in \[0, "):
        membership_from_env(MemoryStore)
    monkeypatch.setenv("MOETION_SPARES", "two")
    with pytest.raises(ValueError, match="must be integers"):
        membership_from_env(MemoryStore)
    monkeypatch.setenv("MOETION_SPARES", "2")
    m = membership_from_env(MemoryStore)
    assert m.is_spare and m.world_size == 4
