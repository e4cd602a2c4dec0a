"""Real process failures on real Megatron-Core under torchrun: a rank SIGKILLed, or SIGSTOPped
(it stops answering), in the middle of training. Every surviving rank learns of it within the
detect timeout, and the job restarts from the last persistent checkpoint (a global rollback:
torchrun's agent stops every local worker when one dies; with reserve ranks under
--inprocess-restart the dead rank is replaced in place instead, test_inprocess_restart.py) and
ends bitwise identical to the fault-free run. No test leaves a process behind.

Cells: hang of a middle rank at backward (detected by its ring watcher, fenced); kill of a middle
stage (PP=4) at the optimizer step; a hang without a checkpoint (a clear error in bounded time);
with `make test-extended` also: kill in the first stage at forward, in the last stage while it
replicates, and during conversion (a recovery in progress).
"""

import os
import re
from pathlib import Path

import pytest

from megatron_moetion.demo.runner import RunConfig, run_pretrain
from megatron_moetion.metrics import read_metrics
from megatron_moetion.oracle import compare_dumps

pytestmark = [pytest.mark.megatron, pytest.mark.distributed, pytest.mark.timeout(400)]

DEMO = RunConfig(train_iters=12, moetion=True, window=3)  # test_recovery's: one baseline run
PP4 = DEMO.replace(pp=4, dp=1, ep=1)  # ranks 0..3 are stages 0..3
DETECT = ("--moetion-heartbeat-interval-s", "0.2", "--moetion-detect-timeout-s", "2")


def processes_mentioning(path: Path) -> list[int]:
    """Live processes whose command line names ``path`` (a run's output directory)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if str(path).encode() in f.read():
                        found.append(int(entry))
            except OSError:
                pass
    return found


def run_with(run_cache, run_ok, tmp_path, plan, base=DEMO):
    cfg = base.replace(fault_plan=plan, save_interval=4, extra_flags=DETECT)
    out = run_ok(cfg, tmp_path, max_restarts=1)
    assert processes_mentioning(tmp_path) == []
    result = compare_dumps(run_cache.get(base) / "oracle", out / "oracle")
    assert result.identical, result
    records = [r for recs in read_metrics(out / "metrics").values() for r in recs]
    restarts = [r for r in records if r.get("kind") == "restart"]
    assert restarts and {r["checkpoint_iteration"] for r in restarts} == {8}
    assert restarts[0]["faults_fired_before"] == sorted(plan.split(";"))
    return [r for r in records if r.get("cause") == "process_failure"]


def test_rank_that_stops_answering_is_detected_fenced_and_rolled_back(run_cache, run_ok,
                                                                       tmp_path):
    reports = run_with(run_cache, run_ok, tmp_path, "rank=2,iter=10,phase=bwd,kind=hang")
    assert {r["rank"] for r in reports} == {0, 1, 3}  # every survivor reported it
    for r in reports:
        assert r["failed"] == [2] and r["declared_by"] == 1  # rank 2's ring watcher
        assert 2.0 <= r["detection_s"] < 10
        assert r["checkpoint_iteration"] == 8 and r["fault_iteration"] == 10


@pytest.mark.extended
@pytest.mark.parametrize("plan", [
    "rank=0,iter=10,phase=fwd,kind=kill",
    "rank=3,iter=10,phase=replication,kind=kill",  # the round that starts at iteration 11
], ids=["first_stage_forward", "last_stage_replication"])
def test_killed_rank_rolls_back_to_the_checkpoint(run_cache, run_ok, tmp_path, plan):
    run_with(run_cache, run_ok, tmp_path, plan)


@pytest.mark.extended
def test_killed_middle_stage_at_the_optimizer_step(run_cache, run_ok, tmp_path):
    run_with(run_cache, run_ok, tmp_path, "rank=2,iter=10,phase=step,kind=kill", base=PP4)


@pytest.mark.extended
def test_kill_during_conversion(run_cache, run_ok, tmp_path):
    # rank 1 loses its state; while ranks 0 and 1 replay, rank 0's process is killed
    run_with(run_cache, run_ok, tmp_path,
             "rank=1,iter=9,phase=bwd,kind=lose_state;rank=0,iter=9,phase=recovery,kind=kill")


def test_hang_without_a_checkpoint_is_a_clear_error_in_bounded_time(tmp_path):
    cfg = DEMO.replace(fault_plan="rank=1,iter=6,phase=step,kind=hang", extra_flags=DETECT)
    result = run_pretrain(cfg, tmp_path, timeout_s=300)
    assert result.returncode != 0 and not result.timed_out
    log = result.log_path.read_text()
    # its last heartbeat may predate iteration 6 (it beats every 0.2 s)
    assert re.search(r"RecoveryError: rank 1 \(last seen in iteration [56], phase \w+\) "
                     r"stopped answering: no heartbeat for", log), log[-3000:]
    assert "no persistent checkpoint to fall back to" in log
    assert processes_mentioning(tmp_path) == []
