"""Parallel layouts beyond the demo's PP=2 x EP=2 x DP=2, each recovered bitwise under the
oracle (the README's layout table lists them with their cells).

PP = 1 (DP=4, EP=2): no pipeline partner reads a rank's micro-batches, so each rank reads an
iteration's micro-batches ahead and ships them to its buddies; a failed rank replays the window
with every other rank (no boundaries to localize on) from its buddies' copies, in memory,
instead of a global rollback to the persistent checkpoint. Negative control: a buddy that sends
its own micro-batches instead of the failed rank's must fail the oracle.
"""

import pytest

from megatron_moetion.demo.runner import RunConfig, run_pretrain
from megatron_moetion.metrics import read_metrics
from megatron_moetion.oracle import compare_dumps

pytestmark = [pytest.mark.megatron, pytest.mark.distributed, pytest.mark.timeout(400)]

PP1 = RunConfig(train_iters=12, moetion=True, window=3, pp=1, dp=4, ep=2)
LOSE = "rank=2,iter=9,phase=bwd,kind=lose_state"


def rank0_reports(out, kind):
    return [r for recs in read_metrics(out / "metrics").values() for r in recs
            if r.get("kind") == kind and r["rank"] == 0]


def _read_ahead(rank, world):
    from megatron_moetion.testing import cpu_support

    cpu_support.install(training=False)
    import torch

    from megatron_moetion.adapter.upstream import UpstreamLog
    from megatron_moetion.errors import UnsupportedConfigurationError

    up = UpstreamLog(torch.device("cpu"), log_boundary=True)
    up.begin(5)
    source = iter([{"tokens": torch.full((2,), i)} for i in range(10)])
    ahead = up.read_ahead(source, 3)
    logged = [v["tokens"].tolist() for v in up.store.data_for(5)]  # before the schedule ran
    served = [next(ahead)["tokens"].tolist() for _ in range(3)]
    try:
        next(ahead)
        extra = None
    except UnsupportedConfigurationError as e:
        extra = str(e)
    return {"logged": logged, "served": served, "read": up.items_read(),
            "left": next(source)["tokens"].tolist(), "extra": extra}


def test_reading_ahead_logs_first_serves_in_order_and_refuses_more():
    from megatron_moetion.testing.dist import run_ranks

    (out,) = run_ranks(_read_ahead, 1, timeout_s=120)
    assert out["logged"] == out["served"] == [[0, 0], [1, 1], [2, 2]]
    assert out["read"] == 3 and out["left"] == [3, 3]  # exactly one item per micro-batch
    assert "--pipeline-model-parallel-size 1" in out["extra"] and "asked for more" in out["extra"]


@pytest.mark.extended  # as TP2's (make test keeps its time; the recoveries below stay)
def test_pp1_reading_ahead_changes_nothing(run_cache):
    result = compare_dumps(run_cache.get(PP1.replace(moetion=False)) / "oracle",
                           run_cache.get(PP1) / "oracle")
    assert result.identical, result


def test_pp1_failure_recovers_in_memory_on_every_rank(run_cache, run_ok, tmp_path):
    out = run_ok(PP1.replace(fault_plan=LOSE), tmp_path)
    result = compare_dumps(run_cache.get(PP1) / "oracle", out / "oracle")
    assert result.identical, result
    (rec,) = rank0_reports(out, "recovery")
    assert rec["outcome"] == "recover_in_memory" and rec["failed"] == [2]
    assert rec["ranks_replaying"] == [0, 1, 2, 3] and rec["ranks_paused"] == []
    assert "PP = 1" in rec["scope"]
    assert rec["conversion_iterations"] == 2 and rec["replayed_iterations"] >= 2
    # a global rollback from the start of training would have cost more
    assert rec["rank_iterations_replayed"] < rec["global_rollback_rank_iterations"]
    iters = [r for recs in read_metrics(out / "metrics").values() for r in recs
             if r.get("kind") != "recovery" and r.get("data_bytes_shipped") is not None]
    assert iters and max(r["data_bytes_shipped"] for r in iters) > 0
    assert all(r["data_round_failures"] == 0 for r in iters)


def test_pp1_buddy_sending_the_wrong_micro_batches_fails_the_oracle(run_cache, run_ok,
                                                                      tmp_path):
    out = run_ok(PP1.replace(fault_plan=LOSE).with_flags(
        "--moetion-negative-control", "buddy_sends_own_data"), tmp_path)
    result = compare_dumps(run_cache.get(PP1) / "oracle", out / "oracle")
    assert not result.identical
    assert "iteration 9" in result.first_difference, result.first_difference


@pytest.mark.extended
def test_pp1_survivors_check_catches_the_wrong_micro_batches(tmp_path):
    result = run_pretrain(PP1.replace(fault_plan=LOSE).with_flags(
        "--moetion-negative-control", "buddy_sends_own_data,keep_checks"), tmp_path,
        timeout_s=300)
    assert result.returncode != 0
    assert "replay diverged on surviving rank" in result.log_path.read_text()


# TP=2 x PP=2 x EP=2 (ETP=1) with sequence parallel (ranks 0, 1: stage 0; 2, 3: stage 1; TP
# rank 0 of each stage reads the micro-batches and broadcasts them to TP rank 1)
TP2 = RunConfig(train_iters=12, moetion=True, window=3, tp=2, pp=2, dp=1, ep=2)


@pytest.mark.parametrize("rank, phase", [
    (1, "bwd"),
    pytest.param(2, "fwd", marks=pytest.mark.extended),
], ids=["tp_rank1_reads_no_data", "tp_rank0_of_last_stage"])
def test_tp2_sp_failure_replays_its_stage(run_cache, run_ok, tmp_path, rank, phase):
    out = run_ok(TP2.replace(fault_plan=f"rank={rank},iter=9,phase={phase},kind=lose_state"),
                 tmp_path)
    result = compare_dumps(run_cache.get(TP2) / "oracle", out / "oracle")
    assert result.identical, result
    (rec,) = rank0_reports(out, "recovery")
    stage = [0, 1] if rank < 2 else [2, 3]
    assert rec["failed"] == [rank] and rec["ranks_replaying"] == stage
    assert rec["ranks_paused"] == [r for r in range(4) if r not in stage]
    assert rec["conversion_iterations"] == 2


@pytest.mark.extended
def test_tp2_sp_without_faults_changes_nothing(run_cache):
    result = compare_dumps(run_cache.get(TP2.replace(moetion=False)) / "oracle",
                           run_cache.get(TP2) / "oracle")
    assert result.identical, result


# expert tensor parallel: TP=2 x PP=2, EP=1 with ETP=2 (every expert split over both TP ranks)
ETP2 = TP2.replace(ep=1, etp=2)


def test_etp2_failure_replays_its_stage(run_cache, run_ok, tmp_path):
    out = run_ok(ETP2.replace(fault_plan="rank=3,iter=9,phase=step,kind=lose_state"), tmp_path)
    result = compare_dumps(run_cache.get(ETP2) / "oracle", out / "oracle")
    assert result.identical, result
    (rec,) = rank0_reports(out, "recovery")
    assert rec["failed"] == [3] and rec["ranks_replaying"] == [2, 3]


@pytest.mark.extended
def test_pp1_killed_rank_is_replaced_and_reads_its_data_from_its_buddies(run_cache, run_ok,
                                                                         tmp_path):
    """Under --inprocess-restart: the reserve rank re-reads the interrupted iteration from its
    rebuilt data iterator; the iterations before it come from the dead rank's buddies."""
    from test_inprocess_restart import recoveries, restarts, run_restarted

    out, records = run_restarted(run_ok, tmp_path, "rank=1,iter=10,phase=bwd,kind=kill",
                                 base=PP1, external_stores=True)
    result = compare_dumps(run_cache.get(PP1) / "oracle", out / "oracle")
    assert result.identical, result
    assert {r["rank"] for r in restarts(records)} == {0, 2, 3}
    rec = recoveries(records)[0]
    assert rec["failed"] == [1] and rec["ranks_replaying"] == [0, 1, 2, 3]
    assert "PP = 1" in rec["scope"]


# interleaved (virtual) pipelines: the pipeline is a ring (the first stage receives its second
# chunk's activations from the last stage), logs are numbered per neighbour and direction
VPP_PP2 = RunConfig(train_iters=12, moetion=True, window=3, pp=2, dp=2, ep=2, vpp=2)
VPP_PP4 = RunConfig(train_iters=12, moetion=True, window=3, pp=4, dp=1, ep=1, vpp=2,
                    num_layers=8)


@pytest.mark.parametrize("base, faults, replaying", [
    (VPP_PP2, [(1, "bwd")], [0, 1]),
    # PP = 4 cells in make test-extended (make test keeps its time; the ring is in pp2's)
    pytest.param(VPP_PP4, [(0, "bwd")], [0], marks=pytest.mark.extended),
    pytest.param(VPP_PP4, [(2, "fwd")], [2], marks=pytest.mark.extended),
    pytest.param(VPP_PP4, [(3, "step")], [3], marks=pytest.mark.extended),
    pytest.param(VPP_PP4, [(0, "fwd"), (1, "bwd")], [0, 1], marks=pytest.mark.extended),
], ids=["pp2_first_stage", "pp4_first_stage", "pp4_middle_stage", "pp4_last_stage",
        "pp4_first_two_stages"])
def test_interleaved_failure_replays_its_stages(run_cache, run_ok, tmp_path, base, faults,
                                                replaying):
    plan = ";".join(f"rank={r},iter=9,phase={p},kind=lose_state" for r, p in faults)
    out = run_ok(base.replace(fault_plan=plan), tmp_path)
    result = compare_dumps(run_cache.get(base) / "oracle", out / "oracle")
    assert result.identical, result
    (rec,) = rank0_reports(out, "recovery")
    assert rec["ranks_replaying"] == replaying
    assert rec["ranks_paused"] == [r for r in range(4) if r not in replaying]
    assert rec["conversion_iterations"] == 2


@pytest.mark.extended
def test_interleaved_stale_operators_fail_the_oracle(run_cache, run_ok, tmp_path):
    out = run_ok(VPP_PP4.replace(fault_plan="rank=2,iter=9,phase=bwd,kind=lose_state")
                 .with_flags("--moetion-negative-control", "skip_conversion"), tmp_path)
    assert not compare_dumps(run_cache.get(VPP_PP4) / "oracle", out / "oracle").identical
