"""Liveness over real gloo ranks in separate processes (no launcher that tears the job down,
as on a multi-node job where the dead rank's node is gone): one rank is SIGKILLed inside a
loop of all-reduces; every survivor ends with the verdict naming that rank alone, including
those whose all-reduce failed under them, within a bounded time."""

import json
import os
import signal
import sys
import time

import pytest

from megatron_moetion.testing.dist import RanksFailed, run_ranks

pytestmark = pytest.mark.distributed

EXIT_VERDICT = 75


def _train_until_a_rank_dies(rank, world, victim, out):
    import torch
    import torch.distributed as dist

    from megatron_moetion.liveness import Liveness, wait_for_verdict_on_collective_errors

    def on_failure(verdict):
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump({"dead": verdict.dead, "declared_by": verdict.declared_by,
                       "waited_after_error": lv.waiting_after,
                       "seconds": time.monotonic() - started}, f)
        lv.settle(verdict)  # as the session does: rank 0 hosts the store here
        os._exit(EXIT_VERDICT)

    lv = Liveness(dist.distributed_c10d._get_default_store(), rank, world, 0.1, 1.0, on_failure)
    wait_for_verdict_on_collective_errors(lv, 5.0)
    lv.start()
    dist.barrier()
    started = time.monotonic()
    t = torch.ones(1024)
    for step in range(2000):
        if rank == victim and step == 30:
            os.kill(os.getpid(), signal.SIGKILL)
        try:
            dist.all_reduce(t)
        except Exception:
            sys.excepthook(*sys.exc_info())  # what an uncaught exception would do
            raise
        time.sleep(0.005)
    return "survived without a verdict"


def test_every_survivor_learns_who_died(tmp_path):
    with pytest.raises(RanksFailed) as info:
        run_ranks(_train_until_a_rank_dies, 4, 2, str(tmp_path), timeout_s=40)
    failures = info.value.failures
    assert failures[2] == "process exited with code -9"
    verdicts = {}
    for r in (0, 1, 3):
        assert failures[r] == f"process exited with code {EXIT_VERDICT}", failures[r]
        verdicts[r] = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert verdicts[r]["dead"] == [2] and verdicts[r]["declared_by"] == 1
        assert verdicts[r]["seconds"] < 10
    # at least one survivor's all-reduce failed under it, and it still waited for the verdict
    assert any(v["waited_after_error"] for v in verdicts.values()), verdicts
