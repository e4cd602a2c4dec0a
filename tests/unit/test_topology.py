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
