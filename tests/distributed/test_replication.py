"""Buddy replication over real gloo ranks: byte-identical copies, corruption caught, never
persisted, memory reused."""

import pytest
import torch

from megatron_moetion.testing.dist import run_ranks

pytestmark = pytest.mark.distributed


def _make_window(engine, rank, window_id, nbytes=3000):
    from megatron_moetion.snapshot import CaptureItem, WindowLayout

    gen = torch.Generator().manual_seed(1000 * rank + window_id)
    a = torch.randn(nbytes // 8, generator=gen)
    b = torch.randint(0, 100, (nbytes // 16,), generator=gen, dtype=torch.int64)
    slots = [[CaptureItem("x", "op0", "active", a)], [CaptureItem("y", "op1", "frozen", b)]]
    layout = WindowLayout.build(slots)
    win = engine.begin_window(window_id, 10 * window_id, layout, {"rank": rank})
    for k, items in enumerate(slots):
        engine.capture(win, k, items, {"iteration": win.iteration_of(k)})
    engine.seal(win)
    return win


def _replicate(rank, world, corrupt_rank, windows, chunk_bytes):
    import torch.distributed as dist

    from megatron_moetion.replication import Replicator, new_group_for
    from megatron_moetion.snapshot import SnapshotEngine
    from megatron_moetion.topology import RankInfo, Topology
    from megatron_moetion.transport import ProcessGroupTransport

    topo = Topology([RankInfo(r, 0, 0, (r,)) for r in range(world)], replication_factor=2)
    group = new_group_for(backend="gloo", timeout_s=30)
    engine = SnapshotEngine(torch.device("cpu"))
    rep = Replicator(ProcessGroupTransport(group, chunk_bytes), topo.buddies(rank),
                     topo.owners(rank), engine.pool)
    own = {}
    allocations = []
    for wid in range(windows):
        win = _make_window(engine, rank, wid)
        own[wid] = win
        rep.start_round(win, corrupt=(rank == corrupt_rank and wid == 1))
        assert rep.quiesce(30)
        rep.drop_older_than(wid)  # keep the newest copy only
        if wid >= 1:
            engine.release(own.pop(wid - 1))
        allocations.append(engine.pool.allocations)
    finished, acked = rep.status()
    held = {o: [bytes(rep.replica(o, w).buffer[:rep.replica(o, w).layout.total_bytes].numpy())
                for w in ids] for o, ids in rep.held().items()}
    mine = bytes(own[windows - 1].buffer[:own[windows - 1].layout.total_bytes].numpy())
    dist.barrier()
    rep.close()
    return {"finished": finished, "acked": acked, "history": [(h.window_id, h.ok)
                                                              for h in rep.history],
            "held": held, "mine": mine, "corrupt": rep.corrupt_detected,
            "allocations": allocations, "buddies": topo.buddies(rank)}


def test_buddies_hold_byte_identical_copies_and_corruption_is_caught():
    outs = run_ranks(_replicate, 4, 2, 4, 1000, timeout_s=90)
    for rank, out in enumerate(outs):
        assert out["finished"] == 3
        # every buddy holds exactly the owner's bytes of the newest window
        for buddy in out["buddies"]:
            assert outs[buddy]["held"][rank] == [out["mine"]]
    # rank 2 corrupted what it sent to its first buddy (rank 3) in window 1
    assert outs[3]["corrupt"] == 1 and sum(o["corrupt"] for o in outs) == 1
    assert (1, False) in outs[2]["history"]
    assert all(ok for wid, ok in outs[2]["history"] if wid != 1)
    assert all(all(ok for _, ok in o["history"]) for r, o in enumerate(outs) if r != 2)
    assert outs[2]["acked"] == 3  # later windows still get acked


def test_host_memory_is_reused_after_warm_up():
    outs = run_ranks(_replicate, 4, -1, 6, 1 << 20, timeout_s=90)
    for out in outs:
        warm = out["allocations"][2]
        assert out["allocations"][-1] == warm, out["allocations"]


def _ship_data(rank, world):
    import torch.distributed as dist

    from megatron_moetion.replication import Replicator, new_group_for
    from megatron_moetion.snapshot import SnapshotEngine
    from megatron_moetion.topology import RankInfo, Topology
    from megatron_moetion.transport import ProcessGroupTransport
    from megatron_moetion.upstream_log import LogStore

    topo = Topology([RankInfo(r, 0, 0, (r,)) for r in range(world)], replication_factor=2)
    group = new_group_for(backend="gloo", timeout_s=30)
    engine = SnapshotEngine(torch.device("cpu"))
    rep = Replicator(ProcessGroupTransport(group, 1 << 20), topo.buddies(rank),
                     topo.owners(rank), engine.pool)
    logs = LogStore(torch.device("cpu"))
    for it in range(1, 7):
        for mb in range(2):
            logs.log_data(it, mb, {"tokens": torch.full((4,), 100 * rank + 10 * it + mb)})
        rep.ship_data(it, logs.export("data", [it]))
    assert rep.quiesce(30)
    rep.truncate_data(2)
    held = rep.data_held()
    def plain(blob):  # tensors do not cross the result queue of exited processes
        return {k: v["tokens"].tolist() for k, v in LogStore.decode(blob).items()}

    got = {o: plain(rep.data_export(o, range(3, 7))) for o in held}
    mine = plain(logs.export("data", range(3, 7)))
    dist.barrier()
    rep.close()
    return {"held": held, "got": got, "mine": mine, "buddies": topo.buddies(rank),
            "failures": rep.data_failures}


def test_data_rounds_give_each_buddy_the_owners_micro_batches():
    outs = run_ranks(_ship_data, 3, timeout_s=90)
    for rank, out in enumerate(outs):
        assert out["failures"] == 0
        for buddy in out["buddies"]:
            assert outs[buddy]["held"][rank] == (3, 6)  # 1 and 2 truncated
            assert outs[buddy]["got"][rank] == out["mine"]
            assert sorted(out["mine"]) == [(it, mb) for it in range(3, 7) for mb in range(2)]
