"""Topology: buddies on other nodes, owners, slices, neighbours and data partners."""

import pytest

from megatron_moetion.topology import RankInfo, Topology, assign_buddies


def table(pp=2, dp=2, ranks_per_node=None):
    """Megatron's default order (tp-cp-ep-dp-pp): ranks of one stage are contiguous."""
    world = pp * dp
    per_node = ranks_per_node or world
    infos = []
    for r in range(world):
        stage, d = divmod(r, dp)
        infos.append(RankInfo(r, stage, r // per_node, tuple(s * dp + d for s in range(pp))))
    return infos


def test_single_node_ring():
    topo = Topology(table(), replication_factor=2)
    assert [topo.buddies(r) for r in range(4)] == [[1, 2], [2, 3], [3, 0], [0, 1]]
    assert topo.owners(0) == [3, 2] and not topo.capped


def test_buddies_live_on_other_nodes():
    topo = Topology(table(pp=2, dp=4, ranks_per_node=2), replication_factor=2)
    for r in range(8):
        assert all(topo.infos[b].node != topo.infos[r].node for b in topo.buddies(r))
        assert len(set(topo.buddies(r))) == 2
    for r in range(8):  # owners invert buddies
        for j, o in enumerate(topo.owners(r)):
            assert topo.buddies(o)[j] == r


def test_replication_factor_is_capped_by_the_world():
    topo = Topology(table(pp=2, dp=1), replication_factor=5)
    assert topo.num_buddies == 1 and topo.capped
    two_nodes = Topology(table(pp=2, dp=2, ranks_per_node=2), replication_factor=3)
    assert two_nodes.num_buddies == 1 and two_nodes.capped


def test_no_replication():
    topo = Topology(table(), replication_factor=0)
    assert topo.buddies(0) == [] and topo.owners(0) == []


def test_slices_neighbours_and_partners():
    topo = Topology(table(pp=3, dp=2), replication_factor=1)
    assert topo.affected_slice([3]) == [2, 3]
    assert topo.affected_slice([0, 5]) == [0, 1, 4, 5]
    assert topo.prev_rank(2) == 0 and topo.next_rank(2) == 4
    assert topo.prev_rank(0) is None and topo.next_rank(5) is None
    assert topo.data_partner(0) == 4 and topo.data_partner(5) == 1 and topo.data_partner(2) is None


def test_rank_table_must_be_complete():
    with pytest.raises(ValueError, match="must cover ranks"):
        Topology([i for i in table() if i.rank != 2], 1)


def test_unequal_nodes_still_give_distinct_owners():
    out = assign_buddies([0, 0, 0, 1], 2)
    for j in range(2):
        assert len({b[j] for b in out}) == 4


def test_rack_order_puts_a_nodes_next_nodes_in_other_racks():
    from megatron_moetion.topology import rack_order

    racks = {f"n{i}": f"rack{i // 4}" for i in range(12)}  # 3 racks of 4 nodes
    order = rack_order(racks)
    assert sorted(order) == sorted(racks)
    for i, node in enumerate(order):  # the next two nodes ring-wise: two other racks
        nxt = {racks[order[(i + j) % len(order)]] for j in (1, 2)}
        assert racks[node] not in nxt and len(nxt) == 2
    assert rack_order({"b": "", "a": ""}) == ["a", "b"]  # racks unknown: sorted, as before
    # unequal racks: every node once, still alternating while both racks have nodes
    assert rack_order({"a": "x", "b": "x", "c": "x", "d": "y"}) == ["a", "d", "b", "c"]


def test_buddies_over_rack_ordered_nodes_survive_a_rack_failure():
    from megatron_moetion.topology import rack_order

    racks = {i: f"rack{i // 4}" for i in range(12)}  # node index -> rack, 3 racks of 4
    order = rack_order({str(n).zfill(2): r for n, r in racks.items()})
    position = {int(n): i for i, n in enumerate(order)}
    infos = [RankInfo(r, 0, position[r // 2], (r,)) for r in range(24)]  # 2 ranks per node
    topo = Topology(infos, 2)
    node_of = {p: n for n, p in position.items()}
    for r in range(24):
        own = racks[node_of[topo.infos[r].node]]
        assert all(racks[node_of[topo.infos[b].node]] != own for b in topo.buddies(r))
