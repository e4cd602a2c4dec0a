"""The scale simulation's logic at small sizes, and the two-phase recursive-doubling agreement
(threads over queues at many world sizes; one gloo run on 3 processes)."""

import queue
import threading

import pytest

from megatron_moetion.agreement import Agreement, agree_over, allreduce_max, max_rounds
from megatron_moetion.bench import scale
from megatron_moetion.errors import ConfigError
from megatron_moetion.testing.dist import run_ranks
from megatron_moetion.topology import RankInfo, Topology


class QueueExchange:
    """``agreement.Exchange`` between threads; counts the messages this rank sends."""

    def __init__(self, boxes, rank):
        self.boxes, self.rank, self.sent = boxes, rank, 0

    def send(self, peer, values):
        self.sent += 1
        self.boxes[(self.rank, peer)].put(list(values))

    def recv(self, peer, length):
        got = self.boxes[(peer, self.rank)].get(timeout=10)
        assert len(got) == length
        return got

    def sendrecv(self, peer, values):
        self.send(peer, values)
        return self.recv(peer, len(values))


def run_threads(world, fn):
    boxes = {(a, b): queue.Queue() for a in range(world) for b in range(world)}
    out, errors = [None] * world, []

    def body(r):
        try:
            out[r] = fn(QueueExchange(boxes, r), r)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=body, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert not errors, errors
    return out


@pytest.mark.parametrize("world", [1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 13, 16, 17])
def test_allreduce_max_gives_every_rank_the_max(world):
    values = {r: [r * 7 % 5, -r, 100 - r] for r in range(world)}
    want = [max(v[i] for v in values.values()) for i in range(3)]
    assert run_threads(world, lambda ex, r: allreduce_max(ex, world, r, values[r])) == \
        [want] * world


@pytest.mark.parametrize("world", [1, 3, 8, 11])
def test_agreement_two_phases(world):
    lost = {r for r in range(world) if r % 4 == 1}

    def one(ex, r):
        got = agree_over(ex, world, r, lost=r in lost, finished_round=10 + r,
                         acked_window=5 + (r % 3), window_proposal=2 + (r % 2))
        return got, ex.sent

    results = run_threads(world, one)
    want = Agreement(tuple(sorted(lost)), 10, 5 if world > 1 else 5, 3 if world > 1 else 2)
    assert all(got == want for got, _ in results)
    # the second phase runs (on every rank alike) only when some rank lost state
    phases = 2 if lost else 1
    assert max(sent for _, sent in results) <= phases * max_rounds(world)


def test_no_second_phase_without_a_loss():
    results = run_threads(6, lambda ex, r: (agree_over(
        ex, 6, r, lost=False, finished_round=3, acked_window=2, window_proposal=4), ex.sent))
    assert {a for a, _ in results} == {Agreement((), 3, 2, 4)}
    assert max(sent for _, sent in results) <= max_rounds(6)


def test_max_rounds():
    assert [max_rounds(p) for p in (1, 2, 3, 4, 5, 8, 16384)] == [0, 1, 3, 2, 4, 3, 14]


def _agree_on_gloo(rank, world):
    from megatron_moetion.agreement import agree

    first = agree(None, world, rank, lost=False, finished_round=7 + rank, acked_window=4,
                  window_proposal=rank)
    second = agree(None, world, rank, lost=rank == 2, finished_round=9, acked_window=5 - rank,
                   window_proposal=1)
    return first, second


@pytest.mark.distributed
def test_agree_over_gloo_three_ranks():
    results = run_ranks(_agree_on_gloo, 3, timeout_s=60)
    assert results == [(Agreement((), 7, 4, 2), Agreement((2,), 9, 3, 1))] * 3


def test_models():
    assert scale.ring_allreduce_s(1, 100) == 0.0
    ring = scale.ring_allreduce_s(4, 800, alpha=1e-5, bandwidth=1e9)
    assert ring == pytest.approx(6e-5 + 1.5 * 800 / 1e9)
    assert scale.doubling_allreduce_s(16, 32, alpha=1e-5, bandwidth=1e9) == \
        pytest.approx(4 * (1e-5 + 32e-9))


def test_liveness_ops_are_counted_on_the_real_code():
    assert scale.liveness_ops_per_tick() == 3  # set hb; check failure; get the peer's hb


def test_rank_table_and_buddies_on_a_small_world():
    preset = scale.scaled_preset(1024)  # PP16 DP64 (EP64 needs DP >= 64): 128 nodes
    infos = scale.rank_table(preset)
    assert infos[65].stage == 1 and infos[65].node == 8 and infos[65].pipeline == tuple(
        1 + 64 * s for s in range(16))
    topo = Topology(infos, 2)
    other_node, other_rack, lost = scale.buddy_placement(topo, 4)
    assert other_node == 1.0
    assert other_rack == pytest.approx(3 / 8)  # rack positions 0,1,2,3 -> 0,0,1,2 of 2 copies
    assert lost == pytest.approx(0.5)
    assert scale.buddy_placement(topo, 1) == (1.0, 1.0, 0.0)  # racks of one node


def test_owners_inverts_buddies():
    for nodes in ([0, 0, 1, 1, 2, 2], [0, 0, 0, 1], [0, 0, 0]):
        topo = _topology(nodes)
        for r in range(len(nodes)):
            for j, o in enumerate(topo.owners(r)):
                assert topo.buddies(o)[j] == r


def _topology(nodes):
    return Topology([scale.RankInfo(r, 0, n, (r,)) for r, n in enumerate(nodes)], 2)


def test_simulate_world_small():
    row = scale.simulate_world(1024, repeats=1, ops_per_tick=5)
    assert (row.world, row.nodes, row.racks) == (1024, 128, 32)
    assert row.agree_bytes_before == 1027 * 8 and row.agree_bytes_after == 32
    assert row.agree_s_after < row.agree_s_before
    assert row.store_ops_s == 1024 * 5 / row.heartbeat_interval_s
    assert row.store_ops_s_before == 1024 * scale.BEFORE_OPS_PER_TICK / 1.0
    assert row.replaying == 64  # one node = 8 DP ranks of one stage: that stage replays
    assert row.detection_s > 30 and row.plan_transfers > 0
    text = scale.format_table([row])
    assert "| 1024 ranks |" in text and "agreement ms, before" in text


def test_scaled_preset_rejects_a_bad_world():
    with pytest.raises(ConfigError, match="world"):
        scale.scaled_preset(1000)


def test_report_and_plot(tmp_path):
    rows = [scale.simulate_world(w, repeats=1, ops_per_tick=5) for w in (1024, 2048)]
    png = scale.plot_scale(rows, tmp_path / "img" / "scale.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = scale.report(rows)
    assert "img/scale.png" in text and "2048 ranks" in text


def test_rack_ids_leave_every_rank_a_copy_outside_its_rack():
    infos = [RankInfo(r, 0, r // 2, (r,)) for r in range(32)]  # 16 nodes of 2, racks of 4
    before = scale.buddy_placement(Topology(infos, 2), 4)
    aware, rack_of = scale.rack_aware(infos, 4)
    after = scale.buddy_placement(Topology(aware, 2), 4, rack_of)
    assert before[2] > 0 and after[1] == 1.0 and after[2] == 0.0


def test_the_heartbeat_interval_scales_so_the_store_stays_within_its_budget():
    from megatron_moetion.liveness import OPS_PER_TICK, STORE_BUDGET_OPS_S, scaled_interval

    assert scaled_interval(1.0, 1024) == 1.0
    big = scaled_interval(1.0, 16384)
    assert big > 1.0 and 16384 * OPS_PER_TICK / big == pytest.approx(STORE_BUDGET_OPS_S)
    row = scale.simulate_world(16384, repeats=1)
    assert row.store_utilisation <= 0.5 < row.store_utilisation_before
    assert row.detection_s > row.detection_s_before  # the price: a later detection
