"""Liveness: heartbeats, the ring watch, one verdict per job, a store that dies (no threads)."""

import threading

import pytest

from megatron_moetion.liveness import Liveness, Verdict


class MemoryStore:
    """The subset of ``torch.distributed.Store`` that ``Liveness`` uses, in memory."""

    def __init__(self):
        self.data, self.broken, self.lock = {}, False, threading.Lock()

    def _alive(self):
        if self.broken:
            raise RuntimeError("Connection reset by peer")

    def set(self, key, value):
        self._alive()
        self.data[key] = value

    def get(self, key):
        self._alive()
        return self.data[key].encode()

    def add(self, key, amount):
        self._alive()
        with self.lock:
            self.data[key] = str(int(self.data.get(key, "0")) + amount)
            return int(self.data[key])

    def check(self, keys):
        self._alive()
        return all(k in self.data for k in keys)

    def compare_set(self, key, expected, desired):
        self._alive()
        with self.lock:
            current = self.data.get(key, "")
            if current == expected:
                self.data[key] = desired
                return desired.encode()
            return current.encode()


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def make(world, store=None, timeout=3.0):
    store, clock = store or MemoryStore(), Clock()
    seen = {r: [] for r in range(world)}
    declared = []
    ranks = [Liveness(store, r, world, 1.0, timeout, seen[r].append, declared.append,
                      clock=clock, wall=clock) for r in range(world)]
    return store, clock, ranks, seen, declared


def tick(ranks, clock, alive, seconds=1.0):
    clock.t += seconds
    for r in alive:
        ranks[r].tick()


def test_all_alive_no_verdict():
    _, clock, ranks, seen, _ = make(4)
    for _ in range(10):
        tick(ranks, clock, range(4))
    assert not any(seen.values())


def test_silent_rank_is_declared_once_and_everyone_learns_within_a_tick():
    _, clock, ranks, seen, declared = make(4)
    tick(ranks, clock, range(4))
    for r in range(4):
        ranks[r].progress(7, "bwd")
    tick(ranks, clock, range(4))
    for _ in range(5):  # rank 2 silent for over 3 s: its watcher, rank 1, declares
        tick(ranks, clock, [0, 1, 3])
    assert len(declared) == 1 and declared[0].dead == [2] and declared[0].declared_by == 1
    assert declared[0].last_seen[2]["iteration"] == 7 and declared[0].last_seen[2]["phase"] == "bwd"
    tick(ranks, clock, [0, 1, 3])
    for r in (0, 1, 3):
        assert len(seen[r]) == 1 and seen[r][0].dead == [2]
    assert "rank 2 (last seen in iteration 7, phase bwd) stopped answering" in seen[0][0].describe()


def test_survivors_acknowledge_before_they_exit():
    _, clock, ranks, seen, declared = make(3)
    tick(ranks, clock, range(3))
    for _ in range(5):
        tick(ranks, clock, [0, 1])
    (verdict,) = declared
    assert ranks[0].settle(verdict, wait_s=0.2) == 1  # alone: waits a bounded time, goes
    assert ranks[1].settle(verdict, wait_s=0.2) == 2


def test_the_verdict_is_published_even_if_acting_on_it_fails():
    store, clock = MemoryStore(), Clock()
    seen = {r: [] for r in range(3)}

    def broken_declare(verdict):
        raise OSError("checkpoint directory is read-only")

    ranks = [Liveness(store, r, 3, 1.0, 3.0, seen[r].append, broken_declare, clock=clock,
                      wall=clock) for r in range(3)]
    tick(ranks, clock, range(3))
    for _ in range(6):
        tick(ranks, clock, [0, 1])
    assert [v.dead for v in seen[0]] == [[2]] and [v.dead for v in seen[1]] == [[2]]


def test_two_silent_neighbours_are_both_named():
    _, clock, ranks, seen, declared = make(4)
    tick(ranks, clock, range(4))
    for _ in range(5):
        tick(ranks, clock, [0, 3])
    (verdict,) = declared
    assert verdict.dead == [1, 2] and verdict.declared_by == 0


def test_a_finished_rank_is_not_dead():
    _, clock, ranks, seen, declared = make(3)
    tick(ranks, clock, range(3))
    ranks[2].stop(finished=True)
    for _ in range(6):
        tick(ranks, clock, [0, 1])
    assert not declared and not any(seen.values())


def test_a_slow_rank_within_the_timeout_is_not_dead():
    _, clock, ranks, seen, declared = make(2)
    for _ in range(5):
        tick(ranks, clock, [0], seconds=1.0)
        tick(ranks, clock, [0, 1], seconds=1.5)  # rank 1 beats every 2.5 s < 3 s
    assert not declared


def test_a_store_that_stops_answering_is_a_verdict():
    store, clock, ranks, seen, _ = make(2)
    tick(ranks, clock, range(2))
    store.broken = True
    tick(ranks, clock, [0], seconds=2.0)
    assert seen[0] == []  # a hiccup shorter than the timeout is not a verdict
    tick(ranks, clock, [0], seconds=2.0)
    assert seen[0] == []
    tick(ranks, clock, [0], seconds=2.0)  # failing for 4 s > 3 s
    (verdict,) = seen[0]
    assert verdict.dead == [] and "rendezvous store stopped answering" in verdict.describe()


def test_a_store_that_recovers_is_not_a_verdict():
    store, clock, ranks, seen, _ = make(2)
    tick(ranks, clock, range(2))
    store.broken = True
    tick(ranks, clock, range(2), seconds=2.0)
    store.broken = False
    for _ in range(5):
        tick(ranks, clock, range(2), seconds=1.0)
    assert not any(seen.values())


def test_verdict_round_trips_through_json():
    v = Verdict([3], {3: {"iteration": 5, "phase": "fwd", "host": "h", "pid": 9}}, 1, 2.5, 7.0)
    assert Verdict.from_json(v.to_json()) == v


@pytest.mark.parametrize("argv, message", [
    (["--moetion-detect-timeout-s", "1", "--moetion-heartbeat-interval-s", "1"],
     "--moetion-detect-timeout-s must be at least twice --moetion-heartbeat-interval-s (2); "
     "got 1"),
])
def test_detect_timeout_must_cover_two_heartbeats(argv, message):
    import argparse

    from megatron_moetion import config
    from megatron_moetion.errors import ConfigError

    args = config.add_arguments(argparse.ArgumentParser()).parse_args(["--moetion", *argv])
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config.from_args(args)
