"""gloo has no abort: a survivor leaving a failed generation shuts its peer connections down
(``replacement.shut_down_peer_connections``), so a peer blocked on it fails at once instead of
waiting out the group's timeout, even while an operation still pending on this side keeps the
group (and its sockets) alive. The store's connection is left alone."""

import os
import time

import pytest

from megatron_moetion.testing.dist import run_ranks

pytestmark = pytest.mark.distributed


def _blocked_peer(rank, world):
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    from megatron_moetion.replacement import shut_down_peer_connections

    group = dist.new_group(backend="gloo", timeout=timedelta(seconds=60))
    if rank == 0:
        start = time.monotonic()
        try:
            dist.recv(torch.zeros(4), src=1, group=group)
            return ("received", time.monotonic() - start)
        except RuntimeError as exc:
            return ("failed", time.monotonic() - start, str(exc)[:120])
    pending = dist.irecv(torch.zeros(4), src=0, group=group)  # keeps the group alive
    time.sleep(1.0)
    count = shut_down_peer_connections(int(os.environ["MASTER_PORT"]))
    store = dist.distributed_c10d._get_default_store()
    store.set("still-connected", "yes")  # the store's own connection survived
    time.sleep(0.5)
    del pending
    return ("shut down", count)


def test_peer_blocked_on_a_departed_rank_fails_at_once():
    blocked, departed = run_ranks(_blocked_peer, 2, timeout_s=30)
    assert blocked[0] == "failed" and blocked[1] < 10, blocked  # not the 60 s timeout
    assert departed[0] == "shut down" and departed[1] >= 1
